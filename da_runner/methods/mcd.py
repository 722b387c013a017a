"""MCD: maximum classifier discrepancy (Saito et al., CVPR 2018).

Two classifiers C1, C2 on one feature extractor G. Each iteration makes three updates:

    A. G, C1, C2 minimise the source loss CE(C1(G(x_s)), y_s) + CE(C2(G(x_s)), y_s);
    B. G fixed: C1, C2 minimise  source loss - trade_off * d(C1(G(x_t)), C2(G(x_t)))  (they
       disagree as much as they can on target samples while staying right on source);
    C. C1, C2 fixed: G minimises  trade_off * d(C1(G(x_t)), C2(G(x_t))), `num_k` times (paper: 4),

with d the mean absolute difference of the two classifiers' probabilities. Target features that
lie outside the source support are where the classifiers can disagree; C moves them inside.

Evaluation reports the ensemble (mean probability of the two classifiers; it chooses `best.pt`)
and each classifier (`eval/target_acc_c1`, `eval/target_acc_c2`). The `train/loss` of this method
is the source loss of update A. Options (configs/method/mcd.yaml): num_k, trade_off, ramp_trade_off.
"""

import torch
import torch.nn.functional as F

from da_runner.errors import UserError
from da_runner.methods.base import Batch, Method, StepContext, build_optimizer
from da_runner.methods.registry import register
from da_runner.nn.heads import mlp_head
from da_runner.nn.losses import classifier_discrepancy


@register("mcd")
class MCD(Method):
    def __init__(self, cfg, input_shape, num_classes):
        super().__init__(cfg, input_shape, num_classes)  # self.classifier is C1
        self.classifier2 = mlp_head(self.features.out_features, cfg.backbone.label_head, num_classes)
        self.num_k = int(cfg.method.num_k)
        if self.num_k < 1:
            raise UserError(f"method.num_k must be >= 1, got {self.num_k}")
        classifiers = [*self.classifier.parameters(), *self.classifier2.parameters()]
        self.optimizers = {
            "features": build_optimizer([{"params": self.features.parameters(), "lr_mult": 1.0}], cfg.optim),
            "classifiers": build_optimizer([{"params": classifiers, "lr_mult": 1.0}], cfg.optim),
        }

    def source_loss(self, f_s: torch.Tensor, y_s: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.classifier(f_s), y_s) + F.cross_entropy(self.classifier2(f_s), y_s)

    def discrepancy(self, f_t: torch.Tensor) -> torch.Tensor:
        return classifier_discrepancy(self.classifier(f_t), self.classifier2(f_t))

    def _update(self, loss: torch.Tensor, *names: str) -> None:
        """Backpropagate `loss` and step only the optimizers `names`; the others' gradients are dropped."""
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for name in names:
            self.optimizers[name].step()

    def update_source(self, batch: Batch) -> torch.Tensor:
        """A: features and both classifiers learn the source labels."""
        loss = self.source_loss(self.features(batch.x_s), batch.y_s)
        self._update(loss, "features", "classifiers")
        return loss.detach()

    def update_classifiers(self, batch: Batch, weight: float) -> torch.Tensor:
        """B: the classifiers maximise their discrepancy on target, keeping the source loss low."""
        with torch.no_grad():  # the features are fixed in this update
            f = self.features(torch.cat([batch.x_s, batch.x_t]))
        n_s = len(batch.x_s)
        discrepancy = self.discrepancy(f[n_s:])
        self._update(self.source_loss(f[:n_s], batch.y_s) - weight * discrepancy, "classifiers")
        return discrepancy.detach()

    def update_features(self, batch: Batch, weight: float) -> torch.Tensor:
        """C: the features minimise the classifiers' discrepancy on target (the classifiers fixed)."""
        discrepancy = self.discrepancy(self.features(batch.x_t))
        self._update(weight * discrepancy, "features")
        return discrepancy.detach()

    def step(self, batch: Batch, ctx: StepContext):
        weight = self.trade_off(ctx)
        loss_cls = self.update_source(batch)
        discrepancy_classifiers = self.update_classifiers(batch, weight)
        discrepancy = torch.stack([self.update_features(batch, weight) for _ in range(self.num_k)]).mean()
        return {"loss": loss_cls, "loss_cls": loss_cls, "discrepancy_classifiers": discrepancy_classifiers,
                "discrepancy": discrepancy}

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and the ensemble: log of the two classifiers' mean class probabilities."""
        f = self.features(x)
        return f, ((F.softmax(self.classifier(f), dim=1) + F.softmax(self.classifier2(f), dim=1)) / 2).log()

    @torch.no_grad()
    def predict_heads(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {"c1": self.classifier(f), "c2": self.classifier2(f)}
