"""DANN: domain-adversarial neural networks (Ganin & Lempitsky, ICML 2015; Ganin et al., JMLR 2016).

A domain discriminator D learns to tell source features from target features; a gradient reversal
layer between the features and D makes the feature extractor G maximise that same loss, so one
backward pass solves

    min_{G, C} max_D   L_cls(C(G(x_s)), y_s)  -  lambda * L_dom(D(G(x)), d)

where d = 1 for source and 0 for target, and lambda comes from the `grl` schedule.

Options (configs/method/dann.yaml):
    domain_outputs: 1 -> D ends in one logit with binary cross-entropy (the paper's 100-1 head);
                    2 -> two logits with softmax cross-entropy (a 100-2 head).
    domain_weight:  weight of the domain loss, the mean over both domains' rows (1: the paper's; 2 sums
                    the two domains' mean losses, as the public BatchNorm reimplementations do).
    separate_forward: one pass per domain through the classifier and the discriminator, so that their
                    BatchNorm layers see one domain at a time (Method.forward_both).
    bsp_weight, bsp_k: batch spectral penalization (Chen et al., ICML 2019), 0 = off.
    entropy_weight, bnm_weight: entropy minimisation / batch nuclear-norm maximisation on the target
                    predictions as add-ons (0 = off).

The domain loss is one weighted loss for every adversarial method built on this class: the mean over
the batch of each sample's loss times its weight, w_s for the source rows and w_t for the target rows
(all 1 here). Subclasses change what D sees (`adversary_input`: CDAN) and the weights
(`domain_weights`: CDAN+E, PADA, IWAN); the step is shared.
"""

import torch

from da_runner.errors import UserError
from da_runner.methods.base import Batch, Method, StepContext
from da_runner.methods.registry import register
from da_runner.nn.grl import grad_reverse
from da_runner.nn.heads import domain_head
from da_runner.nn.losses import bsp_penalty, domain_labels, domain_loss_and_acc


@register("dann", "dann_bsp")
class DANN(Method):
    def __init__(self, cfg, input_shape, num_classes):
        super().__init__(cfg, input_shape, num_classes)
        outputs = int(cfg.method.get("domain_outputs", 1))
        if outputs not in (1, 2):
            raise UserError(f"method.domain_outputs must be 1 or 2, got {outputs}")
        self.domain_weight = float(cfg.method.get("domain_weight", 1.0))
        if self.domain_weight < 0:
            raise UserError(f"method.domain_weight must be >= 0, got {self.domain_weight}")
        self.bsp_weight = float(cfg.method.get("bsp_weight", 0.0))
        self.bsp_k = int(cfg.method.get("bsp_k", 1))
        if self.bsp_k < 1:
            raise UserError(f"method.bsp_k must be >= 1, got {self.bsp_k}")
        self.discriminator = domain_head(cfg.backbone, self.adversary_input_dim(), outputs)
        self.setup_optimizers()

    def adversary_input_dim(self) -> int:
        return self.features.out_features

    def adversary_input(self, f: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """What the discriminator sees (through the gradient reversal layer): the features."""
        return f

    def domain_weights(self, f: torch.Tensor, logits: torch.Tensor, batch: Batch,
                       ctx: StepContext) -> tuple[torch.Tensor | None, torch.Tensor | None, dict[str, torch.Tensor]]:
        """The per-sample weights of the domain loss for features f and logits (N_s + N_t rows, source
        first): (N_s + N_t,) = [w_s, w_t], or None for equal weights. Also returns the loss of whatever
        computes the weights, trained with the rest (IWAN's importance discriminator; None: none), and
        what to log about them."""
        return None, None, {}

    def step(self, batch: Batch, ctx: StepContext):
        n_s, f, logits, loss_cls = self.forward_both(batch)

        is_source = domain_labels(n_s, len(f) - n_s, f.device)
        domain_logits = self.apply_per_domain(self.discriminator,
                                              grad_reverse(self.adversary_input(f, logits), ctx.grl_lambda), n_s)
        weights, loss_weighting, terms = self.domain_weights(f, logits, batch, ctx)
        loss_domain, domain_acc = domain_loss_and_acc(domain_logits, is_source, weights)

        # lambda lives in the GRL: D minimises loss_domain, G receives -lambda times its gradient.
        loss = loss_cls + self.domain_weight * loss_domain
        if loss_weighting is not None:
            loss = loss + loss_weighting
        terms = {"loss_cls": loss_cls.detach(), "loss_domain": loss_domain.detach(), "domain_acc": domain_acc.detach(),
                 **terms}
        if self.bsp_weight > 0:
            loss_bsp = bsp_penalty(f[:n_s], f[n_s:], self.bsp_k)
            loss = loss + self.bsp_weight * loss_bsp
            terms["loss_bsp"] = loss_bsp.detach()
        loss_target_predictions, target_terms = self.target_prediction_terms(logits[n_s:], ctx, batch, logits[:n_s])
        loss = loss + loss_target_predictions
        terms.update(target_terms)
        self.optimizer_step(self.optimizers["main"], loss)
        return {"loss": loss.detach(), **terms}
