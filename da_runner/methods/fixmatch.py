"""FixMatch (Sohn et al., NeurIPS 2020) as domain adaptation: self-training with pseudo-labels that a
weakly augmented view of each target image predicts confidently, learned on a strongly augmented view.

    L = CE(C(G(x_s)), y_s) + fixmatch_weight * mean_i 1[max p_i >= threshold] CE(C(G(A_strong(x_t,i))), argmax p_i)
    p_i = softmax(C(G(A_weak(x_t,i))))   (no gradient through p)

The weak view is the target training batch (data.augment, `weak` in configs/method/fixmatch.yaml),
the strong view the same images at data.augment's `strong` level (RandAugment ops + Cutout,
da_runner/data/augment.py). The term is `fixmatch_loss` in da_runner/nn/losses.py, applied by
`Method.target_prediction_terms`, so `method.fixmatch_weight` adds it to dann and cdan as well.
Options (configs/method/fixmatch.yaml): fixmatch_weight (lambda_u, 1), fixmatch_threshold (tau, 0.95).
"""

from da_runner.methods.base import LossTermMethod
from da_runner.methods.registry import register


@register("fixmatch")
class FixMatch(LossTermMethod):
    """No adaptation term of its own: the target-prediction add-on (`fixmatch_weight`) is the method."""
