"""BNM: batch nuclear-norm maximisation (Cui et al., CVPR 2020).

Maximising the nuclear norm of the (batch x classes) target prediction matrix raises both the
confidence (like entropy minimisation) and the diversity of the predictions (it rewards a
prediction matrix of high rank, so minority classes are not swallowed by majority ones):

    L = CE(C(G(x_s)), y_s) - bnm_weight * ||softmax(C(G(x_t)))||_* / min(N, C)

(the normalisation of the authors' code; the paper's text divides by N). As the authors' code, the
two domains go through the network in separate passes, here on a 256-d BatchNorm bottleneck, so the
BatchNorm layer normalises each domain with its own batch statistics (configs/method/bnm.yaml).
The same term is an add-on to other methods (`method.bnm_weight` on dann, cdan and the loss-term
methods). Options (configs/method/bnm.yaml): bnm_weight (paper: 1), ramp_trade_off, separate_forward.
"""

from da_runner.methods.base import LossTermMethod
from da_runner.methods.registry import register


@register("bnm")
class BNM(LossTermMethod):
    """No adaptation term of its own: the target-prediction add-on (`bnm_weight`) is the method."""
