"""AFN: adaptive feature norm (Xu et al., ICCV 2019).

Target features of small norm carry little information for the classifier; AFN enlarges the
feature norms of both domains. Stepwise AFN (the paper's main variant, default) asks every sample's
norm to be delta_r larger than it is now, at every step; hard AFN (`radius: R`) pulls all norms to
a fixed R:

    L = CE(C(G(x_s)), y_s) + trade_off * sum_domains mean_i (||f_i||.detach() + delta_r - ||f_i||)^2  (stepwise)
    L = CE(C(G(x_s)), y_s) + trade_off * sum_domains mean_i (R - ||f_i||)^2                          (hard)

summed over the source and the target batch, as the reference implementations do, on a BatchNorm
bottleneck with L2-preserved dropout, each domain in its own forward pass (configs/method/afn.yaml).
Entropy minimisation of the target predictions (`entropy_weight`) makes it the paper's SAFN+ENT
(tllib's digits lines: 0.03); the default is SAFN alone.

The stepwise term's value is always delta_r^2 (its gradient does the work), so the mean feature norm
of each domain is logged too (`train/feature_norm_s`, `train/feature_norm_t`).
Options (configs/method/afn.yaml): trade_off (paper: 0.05), delta_r (paper: 1.0 on Office, 0.1-0.3 on
digits), radius (null = stepwise), entropy_weight.
"""

from da_runner.methods.base import LossTermMethod
from da_runner.methods.registry import register
from da_runner.nn.losses import afn_loss


@register("afn")
class AFN(LossTermMethod):
    def adaptation_term(self, f_s, f_t, logits_s, logits_t):
        options = self.cfg.method
        radius = options.get("radius")
        delta_r, radius = float(options.delta_r), None if radius is None else float(radius)
        loss_afn = afn_loss(f_s, delta_r, radius) + afn_loss(f_t, delta_r, radius)
        return loss_afn, {"loss_afn": loss_afn, "feature_norm_s": f_s.detach().norm(dim=1).mean(),
                          "feature_norm_t": f_t.detach().norm(dim=1).mean()}
