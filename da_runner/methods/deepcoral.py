"""Deep CORAL (Sun & Saenko, ECCV 2016 workshops): align the second-order statistics of the features.

    L = CE(C(G(x_s)), y_s) + trade_off * (||Cov(G(x_s)) - Cov(G(x_t))||_F^2 / (4 d^2)
                                          + mean_weight * mean_k (mean G(x_s)_k - mean G(x_t)_k)^2)

G(x) here is the layer `method.layer` names: `logits` (the paper's choice: the last classification
layer, fc8) or `features` (the backbone's output, as DomainBed does). The paper picks the weight so
that the two losses are of similar size at the end of training. The paper matches covariances
only; Transfer-Learning-Library's loss also matches the means (`mean_weight`; its loss is 4 times
this one with mean_weight 1/4). Options (configs/method/deepcoral.yaml): layer, trade_off,
mean_weight, ramp_trade_off.
"""

from da_runner.errors import UserError
from da_runner.methods.base import LossTermMethod
from da_runner.methods.registry import register
from da_runner.nn.losses import coral_loss


@register("deepcoral")
class DeepCORAL(LossTermMethod):
    LAYERS = ("logits", "features")

    def __init__(self, cfg, input_shape, num_classes):
        super().__init__(cfg, input_shape, num_classes)
        self.layer = cfg.method.get("layer", "features")
        if self.layer not in self.LAYERS:
            raise UserError(f"method.layer must be one of {', '.join(self.LAYERS)}, got {self.layer!r}")

    def adaptation_term(self, f_s, f_t, logits_s, logits_t):
        mean_weight = float(self.cfg.method.get("mean_weight", 0.0))
        z_s, z_t = (logits_s, logits_t) if self.layer == "logits" else (f_s, f_t)
        loss_coral = coral_loss(z_s, z_t, mean_weight)
        return loss_coral, {"loss_coral": loss_coral}
