"""OSBP: open set domain adaptation by backpropagation (Saito et al., ECCV 2018).

In open-set DA the target also holds classes the source never saw. OSBP's classifier C has K + 1
outputs: the source's K classes and `unknown`. C learns the source classes by cross-entropy and, on
each target sample, sets the unknown probability p(unknown | x_t) to t (0.5) by the binary
cross-entropy

    L_adv(x_t) = -t log p(unknown | x_t) - (1 - t) log(1 - p(unknown | x_t)).

A gradient reversal layer between the feature extractor G and C makes G maximise that same loss: G
moves each target sample away from the boundary C draws at t, towards a known class
(p(unknown) < t) or towards unknown (p(unknown) > t). One backward pass trains both:

    min_C  CE(C(G(x_s)), y_s) + trade_off * L_adv(C(G(x_t)))
    min_G  CE(C(G(x_s)), y_s) - lambda * trade_off * L_adv(C(G(x_t)))

where lambda is the `grl` schedule's value (the paper and Transfer-Learning-Library reverse with a
constant 1: `grl=constant`). A sample's prediction is the argmax over all K + 1 outputs: label K is
`unknown`, which is the label an open-set pair gives the target's unseen classes (da_runner/tasks.py).
A closed or partial pair evaluates the K known outputs only.

Options (configs/method/osbp.yaml): unknown_target (t), trade_off, ramp_trade_off.
"""

import torch
import torch.nn.functional as F

from da_runner.errors import UserError
from da_runner.methods.base import Batch, Method, StepContext
from da_runner.methods.registry import register
from da_runner.nn.grl import grad_reverse
from da_runner.nn.losses import in_float32


@in_float32
def unknown_bce(logits_t: torch.Tensor, t: float) -> torch.Tensor:
    """OSBP's loss on target logits (N, K + 1), the last output `unknown`: the mean over the rows of the
    binary cross-entropy of p(unknown) against t. log p and log(1 - p) are taken from the logits
    (log-sum-exp of the unknown output and of the known ones), which stays finite for any logits."""
    log_all = torch.logsumexp(logits_t, dim=1)
    log_p_unknown = logits_t[:, -1] - log_all
    log_p_known = torch.logsumexp(logits_t[:, :-1], dim=1) - log_all
    return -(t * log_p_unknown + (1.0 - t) * log_p_known).mean()


@register("osbp")
class OSBP(Method):
    def __init__(self, cfg, input_shape, num_classes):
        super().__init__(cfg, input_shape, num_classes + 1)  # the K known classes and unknown (label K)
        self.unknown_target = float(cfg.method.get("unknown_target", 0.5))
        if not 0.0 < self.unknown_target < 1.0:
            raise UserError(f"method.unknown_target must be in (0, 1), got {self.unknown_target}")
        self.setup_optimizers()

    def step(self, batch: Batch, ctx: StepContext):
        n_s = len(batch.x_s)
        f = self.apply_per_domain(self.features, torch.cat([batch.x_s, batch.x_t]), n_s)
        logits_s = self.classifier(f[:n_s])
        logits_t = self.classifier(grad_reverse(f[n_s:], ctx.grl_lambda))
        loss_cls = F.cross_entropy(logits_s, batch.y_s)
        loss_unknown = unknown_bce(logits_t, self.unknown_target)
        loss = loss_cls + self.trade_off(ctx) * loss_unknown
        self.optimizer_step(self.optimizers["main"], loss)
        p_unknown = F.softmax(logits_t.detach().float(), dim=1)[:, -1]
        return {"loss": loss.detach(), "loss_cls": loss_cls.detach(), "loss_unknown": loss_unknown.detach(),
                "target_unknown_prob": p_unknown.mean(), "target_unknown_frac": (p_unknown > 0.5).float().mean()}
