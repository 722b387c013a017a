"""The method contract: what the trainer may call, and nothing else.

A method owns its modules and optimizers. The trainer calls `step(batch, ctx)` once per training
iteration and `embed(x)` (features and logits; `predict_heads(x)` for extra classifiers) for
evaluation, sets the learning rate of every param group that has an
`lr_mult` (to the scheduled lr times it; groups without one keep their own constant lr) and saves
`checkpoint_state()`. It never looks at which method it is running.

A method that needs the whole unlabelled target training set now and then (SHOT's pseudo-labels come
from class centroids over all of it) says so per step with `wants_target_pass(ctx)`; before such a
step the trainer hands `target_pass` every target training input, in order with its dataset index,
in eval mode and without gradients. Each training batch carries the dataset indices of its target
samples (`Batch.idx_t`), so per-sample results of the pass line up with the batches.
"""

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from da_runner.distributed import average_gradients
from da_runner.errors import UserError
from da_runner.nn.backbones import FeatureExtractor, build_features
from da_runner.nn.heads import label_head
from da_runner.nn.losses import (IGNORE_INDEX, bnm_loss, class_balance_loss, entropy_loss, fixmatch_loss,
                                 label_frequencies)


@dataclass(frozen=True)
class StepContext:
    """What a method may know about where training stands."""

    step: int  # 0-based index of this iteration
    max_steps: int
    progress: float  # step / max_steps in [0, 1)
    grl_lambda: float  # gradient-reversal coefficient from the `grl` schedule
    lr: float  # base learning rate from the `optim` schedule (already applied to the optimizers)


@dataclass(frozen=True)
class Batch:
    """One training batch: labelled source and unlabelled target.

    Target labels (y_t) reach only a method that declares `uses_target_labels` (the oracle); for
    every UDA method they are None. `x_t_views` holds further augmented views of the same target
    samples as x_t, one per level of the method's `extra_target_views` and in that order (FixMatch's
    strong view, mean teacher's second view); it is empty for every other method. `idx_t` (N_t,)
    int64 holds the target samples' indices in the target training split, the indices
    `Method.target_pass` sees (None where no stream stands behind the batch, e.g. a hand-made batch
    in a test).
    """

    x_s: torch.Tensor
    y_s: torch.Tensor
    x_t: torch.Tensor
    y_t: torch.Tensor | None = None
    x_t_views: tuple[torch.Tensor, ...] = ()
    idx_t: torch.Tensor | None = None


def build_optimizer(param_groups, cfg) -> torch.optim.Optimizer:
    """The optimizer of the `optim` config node for `param_groups` (a list of dicts with "params")."""
    lr, weight_decay = float(cfg.lr), float(cfg.weight_decay)
    if cfg.name == "sgd":
        group_momentum = cfg.get("group_momentum") or {}
        for group in param_groups:  # e.g. AFN's reference: no momentum on the backbone, 0.9 on the rest
            if "group" in group and group_momentum.get(group["group"]) is not None:
                group["momentum"] = float(group_momentum[group["group"]])
        return torch.optim.SGD(param_groups, lr=lr, momentum=float(cfg.momentum), weight_decay=weight_decay,
                               nesterov=bool(cfg.nesterov))
    if cfg.name == "adam":
        return torch.optim.Adam(param_groups, lr=lr, betas=tuple(float(b) for b in cfg.betas), weight_decay=weight_decay)
    raise UserError(f"unknown optimizer {cfg.name!r}; available: adam, sgd")


LR_GROUPS = ("backbone", "bottleneck", "heads")


def lr_param_groups(modules, lr_mult) -> list[dict]:
    """The parameters of `modules` in up to three param groups, each with its `lr_mult` (the trainer
    sets lr = scheduled lr * lr_mult): the backbone and the bottleneck of every FeatureExtractor
    among them, and everything else ("heads": classifiers, discriminators, ...). Fine-tuning a
    pretrained backbone at a tenth of the heads' rate is `optim.lr_mult.backbone=0.1`."""
    role = {}
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, FeatureExtractor):
                role.update({id(p): "backbone" for p in sub.backbone.parameters()})
                role.update({id(p): "bottleneck" for p in sub.bottleneck.parameters()})
    grouped: dict[str, list] = {name: [] for name in LR_GROUPS}
    seen = set()
    for module in modules:
        for param in module.parameters():
            if id(param) not in seen:
                seen.add(id(param))
                grouped[role.get(id(param), "heads")].append(param)
    mult = lr_mult if lr_mult is not None else {}
    return [{"params": params, "lr_mult": float(mult.get(name, 1.0)), "group": name}
            for name, params in grouped.items() if params]


class Method(nn.Module):
    """Base class: a feature extractor + label classifier, one optimizer over all parameters.

    Subclasses add their own modules in `__init__` *before* calling `self.setup_optimizers()`,
    and implement `step`.
    """

    # True only for upper-bound baselines that train on target labels: the trainer then passes them
    # in the batch and marks the run's metrics as not UDA.
    uses_target_labels = False
    # The kinds of pair the method trains on (da_runner/tasks.py): image or vector classification, and
    # semantic segmentation (per-pixel logits (N, C, H, W) from a dense backbone, e.g. backbone=fcn_digits).
    tasks: tuple[str, ...] = ("classification",)

    def __init__(self, cfg, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.features = build_features(cfg.backbone, input_shape)  # G: backbone + bottleneck
        # A dense backbone's feature maps get a convolutional head that upsamples to the input's size.
        self.classifier = label_head(cfg.backbone, self.features.out_features, num_classes, self.features.output_stride)
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        # trainer.precision=fp16 replaces it with an enabled one; disabled, it passes losses and steps through.
        self.grad_scaler = torch.amp.GradScaler(enabled=False)

    @property
    def extra_target_views(self) -> tuple[str, ...]:
        """The augmentation levels (data.augment's: none, weak, strong) of the further views of each
        target batch that the method trains on. The trainer draws the batch's images once more per
        level, each view with random draws of its own, and hands them over as `Batch.x_t_views` in
        this order. Empty for most methods; ("strong",) while FixMatch's term is on; mean teacher
        overrides it with its teacher's view."""
        return ("strong",) if float(self.cfg.method.get("fixmatch_weight", 0.0)) > 0 else ()

    def wants_target_pass(self, ctx: StepContext) -> bool:
        """True when the method needs a pass over the whole target training set before the step of
        `ctx` (asked once per step; SHOT: at the start of its second stage and every
        `method.pseudo_label_every` steps after). Most methods never do."""
        return False

    def target_pass(self, batches) -> None:
        """Called by the trainer before a step for which `wants_target_pass` is true, with the method
        in eval mode and gradients off. `batches` yields (x_t, idx_t): every input of the target
        training split once, unaugmented (the evaluation's view) and without labels, with the
        samples' dataset indices (N,) int64, the indices `Batch.idx_t` carries in training. What the
        method keeps from it must reach `checkpoint_state` for resume to be exact."""
        raise NotImplementedError(f"{type(self).__name__} asked for a target pass but does not take one")

    def param_groups(self, *modules: nn.Module) -> list[dict]:
        """Param groups of `modules` (default: the whole method) with `optim.lr_mult`'s multipliers."""
        return lr_param_groups(modules or (self,), self.cfg.optim.get("lr_mult"))

    def setup_optimizers(self) -> None:
        self.optimizers = {"main": build_optimizer(self.param_groups(), self.cfg.optim)}

    def step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        """One training iteration. Returns scalar terms, logged as `train/<key>`.

        Values may be 0-dim tensors: the trainer converts them to floats only when it logs, so a GPU
        is not forced to synchronise on every step.
        """
        raise NotImplementedError

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (N, d) and class logits (N, num_classes) of the model used for evaluation (the
        validators and analyses read the features). A segmentation network's logits are per pixel,
        (N, num_classes, H, W), and its feature maps (N, d, h, w) are averaged over positions to (N, d)."""
        f = self.features(x)
        logits = self.classifier(f)
        return (f.flatten(2).mean(2) if f.dim() == 4 else f), logits

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, num_classes) for inputs x."""
        return self.embed(x)[1]

    @torch.no_grad()
    def predict_heads(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Further named predictions to evaluate besides `predict` (MCD's two classifiers): logits
        (N, num_classes) by name, reported as `eval/<domain>_acc_<name>`. Most methods have none."""
        return {}

    def forward_both(self, batch: Batch) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The features and logits of source and target, in one forward pass over both (half the
        kernel launches of two passes), or, with `method.separate_forward: true`, in one pass per
        domain through the whole classifier (backbone, bottleneck and label head), so that every
        BatchNorm layer normalises each domain with its own batch statistics, as the public DANN
        reimplementations with BatchNorm networks and Transfer-Learning-Library's DAN and AFN do.
        Without BatchNorm the two are the same function.

        Returns n_s (the number of source rows), the features f (N_s + N_t, d), the logits
        (N_s + N_t, C) and the source classification loss (`classification_loss`).
        """
        n_s = len(batch.x_s)
        if batch.x_s.shape[1:] != batch.x_t.shape[1:]:
            raise UserError(f"method={self.cfg.method.name} puts source and target through the network together, but "
                            f"their inputs differ in size ({tuple(batch.x_s.shape[1:])} and {tuple(batch.x_t.shape[1:])}); "
                            f"give both domains one size (segmentation pairs: data.crop)")
        f = self.apply_per_domain(self.features, torch.cat([batch.x_s, batch.x_t]), n_s)
        logits = self.apply_per_domain(self.classifier, f, n_s)
        return n_s, f, logits, self.classification_loss(logits[:n_s], batch.y_s)

    def classification_loss(self, logits_s: torch.Tensor, y_s: torch.Tensor) -> torch.Tensor:
        """The source classification loss: cross-entropy (PADA weights it by class); per pixel for
        segmentation logits (N, C, H, W), where pixels labelled 255 (void) count nowhere."""
        return F.cross_entropy(logits_s, y_s, ignore_index=IGNORE_INDEX if logits_s.dim() == 4 else -100)

    @property
    def separate_forward(self) -> bool:
        return bool(self.cfg.method.get("separate_forward", False))

    def apply_per_domain(self, module: nn.Module, x: torch.Tensor, n_s: int) -> torch.Tensor:
        """module(x) for a batch whose first n_s rows are source: one call, or with
        `method.separate_forward` one call per domain (a method's own heads use it too, so that every
        BatchNorm layer sees one domain at a time)."""
        if self.separate_forward:
            return torch.cat([module(x[:n_s]), module(x[n_s:])])
        return module(x)

    def ramp(self, ctx: StepContext) -> float:
        """The `grl` schedule's current value when `method.ramp_trade_off` is true, else 1: the
        progressive warm-up of DANN's schedule, for methods whose papers ramp their weight and for
        networks trained from scratch, whose random initial features and predictions an adaptation
        term at full weight can lock in before the classifier has learned anything."""
        return ctx.grl_lambda if self.cfg.method.get("ramp_trade_off", False) else 1.0

    def trade_off(self, ctx: StepContext) -> float:
        """The weight of the method's adaptation term: `method.trade_off` times `ramp(ctx)`."""
        return float(self.cfg.method.get("trade_off", 1.0)) * self.ramp(ctx)

    def target_prediction_terms(self, logits_t: torch.Tensor, ctx: StepContext, batch: Batch | None = None,
                                logits_s: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Entropy minimisation, BNM, the class-balance (diversity) term and FixMatch's term on the
        target predictions, weighted by `method.entropy_weight`, `method.bnm_weight`,
        `method.balance_weight` and `method.fixmatch_weight` (0 or absent = off) times `ramp(ctx)`.
        Entropy plus balance is information maximisation (IM); on per-pixel logits the balance aims at
        the source batch's pixel-class shares instead of uniform ones. FixMatch's term (`fixmatch_loss`)
        takes the pseudo-labels from `logits_t` and trains the classifier on the strong view,
        `batch.x_t_views[0]` (the first of `extra_target_views`); AdaMatch's distribution alignment
        and relative threshold (`method.fixmatch_align`, `method.fixmatch_relative`) read the
        source batch's logits `logits_s`.
        Returns the weighted sum to add to the loss and the unweighted terms to log (`loss_entropy`,
        `loss_bnm`, `loss_balance`, `loss_fixmatch` and `fixmatch_mask`, the share of target samples
        confident enough to be pseudo-labelled)."""
        total, terms = torch.zeros((), device=logits_t.device), {}
        balance = class_balance_loss
        if logits_t.dim() == 4 and batch is not None:
            # Per pixel, the balance aims at the source batch's share of each class among its labelled
            # pixels: a uniform aim would push the background's share (most pixels) down towards 1 / C.
            prior = label_frequencies(batch.y_s, logits_t.shape[1])
            balance = functools.partial(class_balance_loss, prior=prior)
        for name, weight_key, loss_fn in (("loss_entropy", "entropy_weight", entropy_loss),
                                          ("loss_bnm", "bnm_weight", bnm_loss),
                                          ("loss_balance", "balance_weight", balance)):
            weight = float(self.cfg.method.get(weight_key, 0.0))  # >= 0: checked by config.validate
            if weight > 0:  # the configured weight: a ramp at 0 still logs the term from the first step
                term = loss_fn(logits_t)
                total = total + weight * self.ramp(ctx) * term
                terms[name] = term.detach()
        fixmatch_weight = float(self.cfg.method.get("fixmatch_weight", 0.0))
        if fixmatch_weight > 0:
            logits_strong = self.classifier(self.features(batch.x_t_views[0]))
            term, kept = fixmatch_loss(logits_t, logits_strong, float(self.cfg.method.fixmatch_threshold), logits_s,
                                       align=bool(self.cfg.method.get("fixmatch_align", False)),
                                       relative=bool(self.cfg.method.get("fixmatch_relative", False)))
            total = total + fixmatch_weight * self.ramp(ctx) * term
            terms.update(loss_fixmatch=term.detach(), fixmatch_mask=kept)
        return total, terms

    def checkpoint_state(self) -> dict:
        return {"modules": self.state_dict(), "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "grad_scaler": self.grad_scaler.state_dict()}  # {} unless fp16

    def load_checkpoint_state(self, state: dict) -> None:
        self.load_state_dict(state["modules"])
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
        if state.get("grad_scaler") and self.grad_scaler.is_enabled():
            self.grad_scaler.load_state_dict(state["grad_scaler"])

    def backward(self, loss: torch.Tensor) -> None:
        """`loss.backward()` outside autocast, through the grad scaler. Under `trainer.precision=bf16` or
        `fp16` the trainer runs `step` under autocast; the backward pass must not: each op's gradient is
        computed in the dtype its forward op used, as torch's autocast documentation prescribes. With
        fp16 the loss is multiplied by the scaler's factor first, so that small gradients do not
        underflow float16's range; `step_optimizers` divides it out again."""
        with torch.autocast(loss.device.type, enabled=False):
            self.grad_scaler.scale(loss).backward()

    def step_optimizers(self, *optimizers: torch.optim.Optimizer) -> None:
        """Step `optimizers` on the gradients of the last `backward`, then let the grad scaler adapt its
        factor. Under fp16 a step whose gradients hold an inf or a NaN is skipped and the factor
        halved; call this once per backward, with every optimizer that backward feeds. In a run on
        several processes the gradients are first averaged over the ranks (da_runner/distributed.py),
        so every rank takes the same step."""
        average_gradients(p for optimizer in optimizers for group in optimizer.param_groups for p in group["params"])
        for optimizer in optimizers:
            self.grad_scaler.step(optimizer)
        self.grad_scaler.update()

    def optimizer_step(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        """zero_grad, backward and step of one optimizer on `loss`."""
        optimizer.zero_grad(set_to_none=True)
        self.backward(loss)
        self.step_optimizers(optimizer)


class LossTermMethod(Method):
    """Methods that adapt through a loss term on one forward pass of both domains (DAN, JAN, Deep
    CORAL, MCC, AFN, MinEnt, BNM):

        L = CE(C(G(x_s)), y_s) + trade_off * term(f_s, f_t, logits_s, logits_t) + target-prediction add-ons

    Subclasses implement `adaptation_term` (or leave it None, as MinEnt and BNM do, whose term is the
    add-on itself).
    """

    def __init__(self, cfg, input_shape, num_classes):
        super().__init__(cfg, input_shape, num_classes)
        self.setup_optimizers()

    def adaptation_term(self, f_s: torch.Tensor, f_t: torch.Tensor, logits_s: torch.Tensor,
                        logits_t: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """The unweighted adaptation term and what to log about it (`{"loss_<name>": value, ...}`)."""
        return None

    def step(self, batch: Batch, ctx: StepContext):
        n_s, f, logits, loss_cls = self.forward_both(batch)
        loss, terms = loss_cls, {"loss_cls": loss_cls.detach()}
        adaptation = self.adaptation_term(f[:n_s], f[n_s:], logits[:n_s], logits[n_s:])
        if adaptation is not None:
            term, logs = adaptation
            loss = loss + self.trade_off(ctx) * term
            terms.update({k: v.detach() for k, v in logs.items()})
        loss_target_predictions, target_terms = self.target_prediction_terms(logits[n_s:], ctx, batch, logits[:n_s])
        loss = loss + loss_target_predictions
        terms.update(target_terms)
        self.optimizer_step(self.optimizers["main"], loss)
        return {"loss": loss.detach(), **terms}
