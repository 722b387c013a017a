"""MCC: minimum class confusion (Jin et al., ECCV 2020).

Penalises how much the classifier confuses classes on the target batch: with temperature-scaled
target predictions Y = softmax(logits_t / T) and entropy-based sample weights (confident samples
count more), the class correlation matrix Y^T diag(W) Y is normalised per class and its off-diagonal
mass is minimised:

    L = CE(C(G(x_s)), y_s) + trade_off * MCC(logits_t)

No discriminator, no features of the source in the term. Options (configs/method/mcc.yaml):
temperature (paper: 2.5 for most tasks), trade_off (paper: 1), ramp_trade_off.
"""

from da_runner.methods.base import LossTermMethod
from da_runner.methods.registry import register
from da_runner.nn.losses import mcc_loss


@register("mcc")
class MCC(LossTermMethod):
    def adaptation_term(self, f_s, f_t, logits_s, logits_t):
        loss_mcc = mcc_loss(logits_t, float(self.cfg.method.temperature))
        return loss_mcc, {"loss_mcc": loss_mcc}
