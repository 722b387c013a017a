"""IWAN: importance weighted adversarial nets for partial domain adaptation (Zhang et al., CVPR 2018).

Two domain discriminators see the features:

- D, the importance discriminator, learns to tell source from target on features it cannot change
  (detached: no gradient reaches the feature extractor). A source sample that D thinks could be
  target, D(f_s) = p(source) low, probably belongs to a class the target holds. Its importance weight
  is w_s = 1 - D(f_s), normalised to mean 1 over the batch and detached.
- D0, DANN's discriminator behind the gradient reversal layer, plays the adversarial game with those
  weights on the source rows (w_t = 1), so the features align the target with the source classes
  it shares rather than with all of them.

Entropy minimisation of the target predictions (`entropy_weight`, the paper's gamma) makes the
classifier confident on the target, as in the paper.

As in Transfer-Learning-Library's IWAN, one feature extractor serves both domains and both
discriminators train with the rest in one step (the paper first trains a source network, then a
separate target feature extractor, ADDA-style); its loss is
    CE + importance_weight * L_D + domain_weight * L_D0(w_s) + entropy_weight * H(target),
with importance_weight 1.5 and domain_weight 1 by default (its 1.5 * trade_off and trade_off).

Options (configs/method/iwan.yaml): importance_weight, and DANN's (domain_weight, domain_outputs,
entropy_weight, ...). D has DANN's discriminator architecture (`backbone.domain_head`) with one output.
"""

import torch

from da_runner.errors import UserError
from da_runner.methods.base import Batch, StepContext
from da_runner.methods.dann import DANN
from da_runner.methods.registry import register
from da_runner.nn.heads import domain_head
from da_runner.nn.losses import domain_labels, domain_loss_and_acc


def importance_weights(p_source: torch.Tensor) -> torch.Tensor:
    """IWAN's source weights from D's probabilities p(source) (N,): 1 - p, scaled to mean 1."""
    w = 1.0 - p_source
    return w / w.mean().clamp_min(1e-6)


@register("iwan")
class IWAN(DANN):
    def __init__(self, cfg, input_shape, num_classes):
        super().__init__(cfg, input_shape, num_classes)
        self.importance_weight = float(cfg.method.get("importance_weight", 1.5))
        if self.importance_weight <= 0:
            raise UserError(f"method.importance_weight must be > 0 (it trains the importance discriminator), "
                            f"got {self.importance_weight}")
        self.importance_discriminator = domain_head(cfg.backbone, self.features.out_features, 1)
        self.setup_optimizers()  # again, now that the importance discriminator exists

    def domain_weights(self, f: torch.Tensor, logits: torch.Tensor, batch: Batch, ctx: StepContext):
        n_s = len(batch.x_s)
        is_source = domain_labels(n_s, len(f) - n_s, f.device)
        d_logits = self.apply_per_domain(self.importance_discriminator, f.detach(), n_s)
        loss_importance, importance_acc = domain_loss_and_acc(d_logits, is_source)
        w_s = importance_weights(torch.sigmoid(d_logits[:n_s].detach().float().squeeze(1)))
        weights = torch.cat([w_s, torch.ones(len(f) - n_s, device=f.device)])
        terms = {"loss_importance": loss_importance.detach(), "importance_acc": importance_acc.detach(),
                 "source_weight_min": w_s.min(), "source_weight_max": w_s.max()}
        return weights, self.importance_weight * loss_importance, terms
