"""DANN: domain-adversarial neural networks (Ganin & Lempitsky, ICML 2015; Ganin et al., JMLR 2016).

A domain discriminator D learns to tell source features from target features; a gradient reversal
layer between the features and D makes the feature extractor G maximise that same loss, so one
backward pass solves

    min_{G, C} max_D   L_cls(C(G(x_s)), y_s)  -  lambda * L_dom(D(G(x)), d)

where d = 1 for source and 0 for target, and lambda comes from the `grl` schedule.

Options (configs/method/dann.yaml):
    domain_outputs: 1 -> D ends in one logit with binary cross-entropy (the paper's 100-1 head);
                    2 -> two logits with softmax cross-entropy (a 100-2 head).
"""

import torch
import torch.nn.functional as F

from da_runner.errors import UserError
from da_runner.methods.base import Batch, Method, StepContext
from da_runner.methods.registry import register
from da_runner.nn.grl import grad_reverse
from da_runner.nn.heads import mlp_head


def domain_loss_and_acc(logits: torch.Tensor, is_source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Discriminator loss and accuracy.

    logits: (N, 1) for a single-logit head or (N, 2) for a two-way softmax head.
    is_source: (N,) float, 1 for source rows and 0 for target rows.
    """
    if logits.shape[1] == 1:
        logits = logits.squeeze(1)
        loss = F.binary_cross_entropy_with_logits(logits, is_source)
        correct = (logits > 0).float() == is_source
    else:
        target = is_source.long()
        loss = F.cross_entropy(logits, target)
        correct = logits.argmax(1) == target
    return loss, correct.float().mean()


@register("dann")
class DANN(Method):
    def __init__(self, cfg, input_shape, num_classes):
        super().__init__(cfg, input_shape, num_classes)
        outputs = int(cfg.method.domain_outputs)
        if outputs not in (1, 2):
            raise UserError(f"method.domain_outputs must be 1 or 2, got {outputs}")
        self.discriminator = mlp_head(self.features.out_features, cfg.backbone.domain_head, outputs)
        self.setup_optimizers()

    def step(self, batch: Batch, ctx: StepContext):
        n_s = len(batch.x_s)
        # One forward pass over source and target together (half the kernel launches of two passes).
        f = self.features(torch.cat([batch.x_s, batch.x_t]))
        f_s = f[:n_s]
        loss_cls = F.cross_entropy(self.classifier(f_s), batch.y_s)

        is_source = torch.zeros(len(f), device=f.device)
        is_source[:n_s] = 1.0
        domain_logits = self.discriminator(grad_reverse(f, ctx.grl_lambda))
        loss_domain, domain_acc = domain_loss_and_acc(domain_logits, is_source)

        # lambda lives in the GRL: D minimises loss_domain, G receives -lambda times its gradient.
        loss = loss_cls + loss_domain
        self.optimizer_step(self.optimizers["main"], loss)
        return {
            "loss": loss.detach(),
            "loss_cls": loss_cls.detach(),
            "loss_domain": loss_domain.detach(),
            "domain_acc": domain_acc.detach(),
        }
