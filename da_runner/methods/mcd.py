"""MCD: maximum classifier discrepancy (Saito et al., CVPR 2018).

Two classifiers C1, C2 on one feature extractor G. Each iteration makes three updates:

    A. G, C1, C2 minimise the source loss CE(C1(G(x_s)), y_s) + CE(C2(G(x_s)), y_s);
    B. G fixed: C1, C2 minimise  source loss - trade_off * d(C1(G(x_t)), C2(G(x_t)))  (they
       disagree as much as they can on target samples while staying right on source);
    C. C1, C2 fixed: G minimises  trade_off * d(C1(G(x_t)), C2(G(x_t))), `num_k` times (paper: 4),

with d the mean absolute difference of the two classifiers' probabilities. Target features that
lie outside the source support are where the classifiers can disagree; C moves them inside.
Updates A and B also add, for each classifier, `balance_weight` times the class-balance term
-mean_k log(mean_i p_ik) of its target predictions (Transfer-Learning-Library's digits recipe: 0.03),
which keeps the classifiers from drifting onto a few classes. The feature extractor's optimizer
uses `feature_momentum` (reference: plain SGD), the classifiers' the `optim` group's momentum.

Evaluation reports the ensemble (mean probability of the two classifiers; it chooses `best.pt`)
and each classifier (`eval/target_acc_c1`, `eval/target_acc_c2`). The `train/loss` of this method
is the source loss of update A. Options (configs/method/mcd.yaml): num_k, trade_off, ramp_trade_off,
balance_weight, feature_momentum.
"""

import torch
import torch.nn.functional as F

from omegaconf import OmegaConf

from da_runner.errors import UserError
from da_runner.methods.base import Batch, Method, StepContext, build_optimizer
from da_runner.methods.registry import register
from da_runner.nn.heads import label_head
from da_runner.nn.losses import class_balance_loss, classifier_discrepancy


@register("mcd")
class MCD(Method):
    def __init__(self, cfg, input_shape, num_classes):
        super().__init__(cfg, input_shape, num_classes)  # self.classifier is C1
        self.classifier2 = label_head(cfg.backbone, self.features.out_features, num_classes)
        self.num_k = int(cfg.method.num_k)
        if self.num_k < 1:
            raise UserError(f"method.num_k must be >= 1, got {self.num_k}")
        self.balance_weight = float(cfg.method.get("balance_weight", 0.0))
        feature_optim = cfg.optim
        if cfg.method.get("feature_momentum") is not None and "momentum" in cfg.optim:
            feature_optim = OmegaConf.merge(cfg.optim, {"momentum": float(cfg.method.feature_momentum)})
        self.optimizers = {
            "features": build_optimizer(self.param_groups(self.features), feature_optim),
            "classifiers": build_optimizer(self.param_groups(self.classifier, self.classifier2), cfg.optim),
        }

    def source_loss(self, f_s: torch.Tensor, y_s: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.classifier(f_s), y_s) + F.cross_entropy(self.classifier2(f_s), y_s)

    def balance(self, f_t: torch.Tensor) -> torch.Tensor:
        """The class-balance terms of both classifiers on target features, weighted (0 when off)."""
        if self.balance_weight <= 0:
            return torch.zeros((), device=f_t.device)
        return self.balance_weight * (class_balance_loss(self.classifier(f_t)) + class_balance_loss(self.classifier2(f_t)))

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
        """A: features and both classifiers learn the source labels (and keep target predictions balanced)."""
        if self.balance_weight > 0:
            f = self.features(torch.cat([batch.x_s, batch.x_t]))
            f_s, f_t = f[: len(batch.x_s)], f[len(batch.x_s):]
        else:
            f_s, f_t = self.features(batch.x_s), None
        loss = self.source_loss(f_s, batch.y_s)
        self._update(loss if f_t is None else loss + self.balance(f_t), "features", "classifiers")
        return loss.detach()

    def update_classifiers(self, batch: Batch, weight: float) -> torch.Tensor:
        """B: the classifiers maximise their discrepancy on target, keeping the source loss low."""
        with torch.no_grad():  # the features are fixed in this update
            f = self.features(torch.cat([batch.x_s, batch.x_t]))
        n_s = len(batch.x_s)
        discrepancy = self.discrepancy(f[n_s:])
        self._update(self.source_loss(f[:n_s], batch.y_s) + self.balance(f[n_s:]) - weight * discrepancy, "classifiers")
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
