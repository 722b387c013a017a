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

    def heads(self, batch: Batch, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Both classifiers, each run once over the features f of the source and target batch together
        (as the reference implementation does, so BatchNorm in the heads normalises one batch of both
        domains): the source cross-entropy of both, their weighted class-balance terms on target
        (0 when off) and their discrepancy on target."""
        n_s = len(batch.x_s)
        logits_1, logits_2 = self.classifier(f), self.classifier2(f)
        source = F.cross_entropy(logits_1[:n_s], batch.y_s) + F.cross_entropy(logits_2[:n_s], batch.y_s)
        balance = torch.zeros((), device=f.device)
        if self.balance_weight > 0:
            balance = self.balance_weight * (class_balance_loss(logits_1[n_s:]) + class_balance_loss(logits_2[n_s:]))
        return source, balance, classifier_discrepancy(logits_1[n_s:], logits_2[n_s:])

    def _update(self, loss: torch.Tensor, *names: str) -> None:
        """Backpropagate `loss` and step only the optimizers `names`; the others' gradients are dropped."""
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        self.backward(loss)
        self.step_optimizers(*(self.optimizers[name] for name in names))

    def both(self, batch: Batch) -> torch.Tensor:
        return torch.cat([batch.x_s, batch.x_t])

    def update_source(self, batch: Batch) -> torch.Tensor:
        """A: features and both classifiers learn the source labels (and keep target predictions balanced)."""
        source, balance, _ = self.heads(batch, self.features(self.both(batch)))
        self._update(source + balance, "features", "classifiers")
        return source.detach()

    def update_classifiers(self, batch: Batch, weight: float) -> torch.Tensor:
        """B: the classifiers maximise their discrepancy on target, keeping the source loss low."""
        with torch.no_grad():  # the features are fixed in this update
            f = self.features(self.both(batch))
        source, balance, discrepancy = self.heads(batch, f)
        self._update(source + balance - weight * discrepancy, "classifiers")
        return discrepancy.detach()

    def update_features(self, batch: Batch, weight: float) -> torch.Tensor:
        """C: the features minimise the classifiers' discrepancy on target (the classifiers fixed)."""
        _, _, discrepancy = self.heads(batch, self.features(self.both(batch)))
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
