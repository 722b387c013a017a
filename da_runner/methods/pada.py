"""PADA: partial adversarial domain adaptation (Cao et al., ECCV 2018).

In partial DA the target holds only some of the source's classes. Aligning the whole source with the
target (DANN) pulls target samples towards the source classes the target lacks. PADA estimates how
much each source class matters to the target from the classifier's predictions on the target,

    gamma = mean over target samples of softmax(logits / T),   gamma <- gamma / max(gamma),

and weights each source sample by gamma of its class, in the classification loss (a cross-entropy with
class weights gamma) and in DANN's domain loss (w_s = gamma[y_s]; every target sample gets the mean
of w_s). Classes the target lacks get small weights, so they are neither aligned nor emphasised.

gamma starts at 1 and is recomputed every `class_weight_update_every` steps from the target
predictions of the steps since the last update (the training batches' softmax at temperature
`temperature`, no extra pass over the target set; Transfer-Learning-Library's PADA predicts the whole
target set in eval mode every 500 steps instead). The accumulated predictions and gamma are buffers,
so they are in the checkpoint and a resumed run continues exactly.

Options (configs/method/pada.yaml): temperature (T, 0.1), class_weight_update_every (500), and DANN's.
The domain loss is the weighted mean (weights sum to the batch size), which is Transfer-Learning-
Library's weighted loss divided by the mean source weight: `domain_weight` absorbs the difference.
"""

import torch
import torch.nn.functional as F

from da_runner.errors import UserError
from da_runner.methods.base import Batch, StepContext
from da_runner.methods.dann import DANN
from da_runner.methods.registry import register


@register("pada")
class PADA(DANN):
    def __init__(self, cfg, input_shape, num_classes):
        super().__init__(cfg, input_shape, num_classes)
        self.temperature = float(cfg.method.get("temperature", 0.1))
        self.update_every = int(cfg.method.get("class_weight_update_every", 500))
        if self.temperature <= 0:
            raise UserError(f"method.temperature must be > 0, got {self.temperature}")
        if self.update_every < 1:
            raise UserError(f"method.class_weight_update_every must be >= 1, got {self.update_every}")
        self.register_buffer("class_weight", torch.ones(num_classes))
        # the sum of softmax(logits_t / T) over the target rows since the last update
        self.register_buffer("target_prediction_sum", torch.zeros(num_classes))

    def classification_loss(self, logits_s: torch.Tensor, y_s: torch.Tensor) -> torch.Tensor:
        # the mean of gamma[y_i] * CE_i over the batch divided by the mean of gamma[y_i], as torch's
        # class-weighted cross-entropy averages
        return F.cross_entropy(logits_s.float(), y_s, weight=self.class_weight)

    def domain_weights(self, f: torch.Tensor, logits: torch.Tensor, batch: Batch, ctx: StepContext):
        n_s = len(batch.x_s)
        self.accumulate_target_predictions(logits[n_s:].detach())
        w_s = self.class_weight[batch.y_s]
        w_t = w_s.mean().expand(len(logits) - n_s)
        terms = {"class_weight_mean": self.class_weight.mean(), "class_weight_min": self.class_weight.min()}
        if (ctx.step + 1) % self.update_every == 0:  # used from the next step on
            # the mean prediction over the largest mean is the sum over the largest sum; a new tensor,
            # not an in-place update: this step's loss still needs the old weights for its backward
            self.class_weight = self.target_prediction_sum / self.target_prediction_sum.max()
            self.target_prediction_sum.zero_()
        return torch.cat([w_s, w_t]), None, terms

    @torch.no_grad()
    def accumulate_target_predictions(self, logits_t: torch.Tensor) -> None:
        self.target_prediction_sum += F.softmax(logits_t.float() / self.temperature, dim=1).sum(0)
