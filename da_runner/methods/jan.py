"""JAN: joint adaptation networks (Long et al., ICML 2017).

Minimises the joint MMD of the features and the softmax predictions: one kernel matrix per layer,
their elementwise product as the joint kernel, so the alignment is of the joint distribution
P(features, predictions) rather than of each layer separately:

    L = CE(C(G(x_s)), y_s) + trade_off * JMMD^2([G(x_s), softmax(C(G(x_s)))], [G(x_t), softmax(C(G(x_t)))])

Kernels: a Gaussian family around the mean distance for the features (`kernel_multipliers`, as in
DAN) and one Gaussian of fixed bandwidth for the predictions (`prediction_sigma`, 0.92 as in the
reference implementations). Like DANN, the paper ramps the trade-off from 0 with the progress
schedule (`ramp_trade_off: true`, the `grl` group's schedule).

Options (configs/method/jan.yaml): trade_off, ramp_trade_off, kernel_multipliers, prediction_sigma, linear.
"""

import torch.nn.functional as F

from da_runner.methods.base import LossTermMethod
from da_runner.methods.registry import register
from da_runner.nn.losses import joint_mmd


@register("jan")
class JAN(LossTermMethod):
    def adaptation_term(self, f_s, f_t, logits_s, logits_t):
        options = self.cfg.method
        g_s, g_t = F.softmax(logits_s, dim=1), F.softmax(logits_t, dim=1)
        loss_jmmd = joint_mmd([f_s, g_s], [f_t, g_t], [list(options.kernel_multipliers), float(options.prediction_sigma)],
                              bool(options.linear))
        return loss_jmmd, {"loss_jmmd": loss_jmmd}
