"""Oracle: trains on *labelled target* data. Not domain adaptation: an upper bound for result
tables, showing how far a UDA method is from having the target labels.

It declares `uses_target_labels`, so the trainer gives it the target labels, warns at the start of
the run and records `"uses_target_labels": true` in metrics.json, and summaries mark its rows.
The source data is not used.
"""

from da_runner.methods.base import Batch, Method, StepContext
from da_runner.methods.registry import register


@register("oracle")
class Oracle(Method):
    tasks = ("classification", "segmentation")  # per-pixel logits and labels work unchanged
    uses_target_labels = True

    def __init__(self, cfg, input_shape, num_classes):
        super().__init__(cfg, input_shape, num_classes)
        self.setup_optimizers()

    def step(self, batch: Batch, ctx: StepContext):
        loss_cls_t = self.classification_loss(self.classifier(self.features(batch.x_t)), batch.y_t)
        self.optimizer_step(self.optimizers["main"], loss_cls_t)
        return {"loss": loss_cls_t.detach(), "loss_cls_target": loss_cls_t.detach()}
