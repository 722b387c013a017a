"""MinEnt: entropy minimisation on the target (Grandvalet & Bengio, NeurIPS 2004), the simplest
use of unlabelled target data: push target predictions to be confident.

    L = CE(C(G(x_s)), y_s) + entropy_weight * mean H(softmax(C(G(x_t))))

The same term is an add-on to other methods (`method.entropy_weight` on dann, cdan and the
loss-term methods). Options (configs/method/minent.yaml): entropy_weight.
"""

from da_runner.methods.base import LossTermMethod
from da_runner.methods.registry import register


@register("minent")
class MinEnt(LossTermMethod):
    """No adaptation term of its own: the target-prediction add-on (`entropy_weight`) is the method."""

    tasks = ("classification", "segmentation")  # per-pixel logits and labels work unchanged

