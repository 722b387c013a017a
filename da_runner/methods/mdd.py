"""MDD: margin disparity discrepancy (Zhang et al., ICML 2019).

An auxiliary classifier f' (same shape as the label classifier f) measures the disparity between
domains: it learns to agree with f's predicted labels on source data and to disagree with them on
target data; the feature extractor, through a gradient reversal layer, works against it, which
minimises the margin disparity discrepancy bound:

    min_{G, f}  CE(f(G(x_s)), y_s) + trade_off * D_gamma     max_{f'} D_gamma
    D_gamma = E_t[log(1 - softmax(f'(G(x_t)))[h_f(x_t)])] + gamma * E_s[log softmax(f'(G(x_s)))[h_f(x_s)]]

where h_f is f's argmax label and gamma the margin. `train/loss_mdd` logs -D_gamma, the loss f'
minimises. The reversal coefficient is `reversal_scale` times the `grl` schedule's value: a warm
start from 0 that saturates at 0.1 by default, the value public MDD implementations use (e.g. the
Transfer-Learning-Library); at 1 the features overpower the auxiliary classifier (embedded pair,
seed 0: 0.507 target accuracy against 0.626 at 0.1). Options (configs/method/mdd.yaml): margin
(paper: 4 for digits and Office-31), reversal_scale (0.1), trade_off (paper: 1), ramp_trade_off.
"""


from da_runner.methods.base import Batch, Method, StepContext
from da_runner.methods.registry import register
from da_runner.nn.grl import grad_reverse
from da_runner.nn.heads import label_head
from da_runner.nn.losses import mdd_adversary_loss


@register("mdd")
class MDD(Method):
    def __init__(self, cfg, input_shape, num_classes):
        super().__init__(cfg, input_shape, num_classes)
        self.adversary = label_head(cfg.backbone, self.features.out_features, num_classes)  # f', shaped as f
        self.setup_optimizers()

    def step(self, batch: Batch, ctx: StepContext):
        n_s, f, logits, loss_cls = self.forward_both(batch)
        predicted = logits.argmax(1)  # h_f: labels only, no gradient flows through them
        reversed_f = grad_reverse(f, float(self.cfg.method.reversal_scale) * ctx.grl_lambda)
        logits_adv = self.apply_per_domain(self.adversary, reversed_f, n_s)
        loss_mdd = mdd_adversary_loss(logits_adv[:n_s], logits_adv[n_s:], predicted[:n_s], predicted[n_s:],
                                      float(self.cfg.method.margin))
        loss = loss_cls + self.trade_off(ctx) * loss_mdd
        loss_target_predictions, target_terms = self.target_prediction_terms(logits[n_s:], ctx, batch, logits[:n_s])
        loss = loss + loss_target_predictions
        self.optimizer_step(self.optimizers["main"], loss)
        return {"loss": loss.detach(), "loss_cls": loss_cls.detach(), "loss_mdd": loss_mdd.detach(), **target_terms}
