"""BNM: batch nuclear-norm maximisation (Cui et al., CVPR 2020).

Maximising the nuclear norm of the (batch x classes) target prediction matrix raises both the
confidence (like entropy minimisation) and the diversity of the predictions (it rewards a
prediction matrix of high rank, so minority classes are not swallowed by majority ones):

    L = CE(C(G(x_s)), y_s) - bnm_weight * ||softmax(C(G(x_t)))||_* / N

The same term is an add-on to other methods (`method.bnm_weight` on dann, cdan and the loss-term
methods). Options (configs/method/bnm.yaml): bnm_weight (paper: 1).
"""

from da_runner.methods.base import LossTermMethod
from da_runner.methods.registry import register


@register("bnm")
class BNM(LossTermMethod):
    """No adaptation term of its own: the target-prediction add-on (`bnm_weight`) is the method."""
