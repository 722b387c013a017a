"""Source only: train on labelled source data, ignore the target (the lower-bound baseline)."""

from da_runner.methods.base import Batch, Method, StepContext
from da_runner.methods.registry import register


@register("source_only")
class SourceOnly(Method):
    tasks = ("classification", "segmentation")  # per-pixel logits and labels work unchanged

    def __init__(self, cfg, input_shape, num_classes):
        super().__init__(cfg, input_shape, num_classes)
        self.setup_optimizers()

    def step(self, batch: Batch, ctx: StepContext):
        logits_s = self.classifier(self.features(batch.x_s))
        loss_cls = self.classification_loss(logits_s, batch.y_s)
        self.optimizer_step(self.optimizers["main"], loss_cls)
        return {"loss": loss_cls.detach(), "loss_cls": loss_cls.detach()}
