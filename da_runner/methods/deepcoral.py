"""Deep CORAL (Sun & Saenko, ECCV 2016 workshops): align the second-order statistics of the features.

    L = CE(C(G(x_s)), y_s) + trade_off * ||Cov(G(x_s)) - Cov(G(x_t))||_F^2 / (4 d^2)

The paper picks the weight so that the two losses are of similar size at the end of training; the
default is 1 (configs/method/deepcoral.yaml: trade_off, ramp_trade_off).
"""

from da_runner.methods.base import LossTermMethod
from da_runner.methods.registry import register
from da_runner.nn.losses import coral_loss


@register("deepcoral")
class DeepCORAL(LossTermMethod):
    def adaptation_term(self, f_s, f_t, logits_s, logits_t):
        loss_coral = coral_loss(f_s, f_t)
        return loss_coral, {"loss_coral": loss_coral}
