"""DAN: deep adaptation networks (Long et al., ICML 2015).

Minimises the multi-kernel maximum mean discrepancy (MK-MMD) between source and target features
next to the source classification loss:

    L = CE(C(G(x_s)), y_s) + trade_off * MK-MMD^2(G(x_s), G(x_t))

with a family of Gaussian kernels whose squared bandwidths are `kernel_multipliers` times the mean
squared distance between the batch's features (equal kernel weights), estimated with the quadratic
estimator or, with `linear: true`, the paper's linear-time estimator.

Options (configs/method/dan.yaml): trade_off, ramp_trade_off, kernel_multipliers, linear.
"""

from da_runner.methods.base import LossTermMethod
from da_runner.methods.registry import register
from da_runner.nn.losses import mk_mmd


@register("dan")
class DAN(LossTermMethod):
    def adaptation_term(self, f_s, f_t, logits_s, logits_t):
        options = self.cfg.method
        loss_mmd = mk_mmd(f_s, f_t, list(options.kernel_multipliers), bool(options.linear))
        return loss_mmd, {"loss_mmd": loss_mmd}
