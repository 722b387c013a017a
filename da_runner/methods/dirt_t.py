"""DIRT-T: decision-boundary iterative refinement training with a teacher (Shu, Bui, Narui & Ermon,
ICLR 2018, "A DIRT-T Approach to Unsupervised Domain Adaptation").

VADA (method=vada) leaves a model whose target decision boundaries may still cross target clusters,
because it keeps fitting the source. DIRT-T starts from that model and trains on the target alone:
it keeps the cluster-assumption terms and trades them off against staying close to a teacher, a
frozen copy of an earlier model, by a KL penalty (a natural-gradient-like step in function space):

    min_{G,C}  beta * KL(teacher(x_t) || C(G(x_t))) + lambda_t * (H(C(G(x_t))) + VAT(x_t))

Every `method.teacher_every` steps the teacher becomes an exponential moving average of the model
(decay `method.average_decay`), the "EMA model" of the authors' code. Defaults (configs/method/dirt_t.yaml)
are the authors' (`run_dirtt.py`): beta 1e-2, lambda_t 1e-2, VAT radius 3.5, teacher every 5,000 steps,
average decay 0.998, Adam lr 1e-3 with beta1 0.5; there the KL term is the cross-entropy to the
teacher's probabilities, which differs from the KL by a constant, as here.

`method.init_from` names the finished VADA run directory (its checkpoints/last.pt) or a checkpoint
file. The model starts from its raw weights; the average and the first teacher from its weight
average when that run kept one (`trainer.ema`), else from the raw weights too. Source batches are
drawn by the trainer but never used.
"""

import copy
from pathlib import Path

import torch
from torch import nn

from da_runner import checkpoint
from da_runner.errors import UserError
from da_runner.methods.base import Batch, Method, StepContext
from da_runner.methods.registry import register
from da_runner.methods.vada import ClusterAssumptionMixin
from da_runner.nn.losses import soft_cross_entropy


def vada_weights(path: str) -> tuple[dict, dict]:
    """The raw weights and the weight average (the raw ones again when there is none) of the
    classifier in a VADA run directory or checkpoint file, as state dicts of `Classifier`."""
    file = Path(path).expanduser()
    if file.is_dir():
        file = file / "checkpoints" / "last.pt"
    state = checkpoint.load(file)

    def classifier_part(weights: dict) -> dict:
        return {k: v for k, v in weights.items() if k.startswith(("features.", "classifier."))}

    raw = classifier_part(state["method"]["modules"])
    if not raw:
        raise UserError(f"method.init_from={path}: {file} holds no features/classifier weights")
    average = classifier_part(state["ema"]["average"]) if state.get("ema") else raw
    return raw, average


@register("dirt_t")
class DIRTT(ClusterAssumptionMixin, Method):
    def __init__(self, cfg, input_shape, num_classes):
        super().__init__(cfg, input_shape, num_classes)
        options = cfg.method
        self.teacher_every = int(options.teacher_every)
        if self.teacher_every < 1:
            raise UserError(f"method.teacher_every must be a positive number of steps, got {options.teacher_every}")
        self.average_decay = float(options.average_decay)
        if not 0 < self.average_decay < 1:
            raise UserError(f"method.average_decay must lie in (0, 1), got {options.average_decay}")
        student = self.student()
        # The average and the teacher are modules of the method, so they move with it (device, memory
        # format) and live in its state dict. Neither is trained; the teacher runs in eval mode (no
        # dropout, running BatchNorm statistics), as the authors' code runs it.
        self.average = copy.deepcopy(student).requires_grad_(False)
        self.teacher = copy.deepcopy(student).requires_grad_(False)
        if options.get("init_from"):  # null only when a checkpoint replaces every weight (resume, da-eval)
            raw, average = vada_weights(str(options.init_from))
            try:
                student.load_state_dict(raw)
                self.average.load_state_dict(average)
                self.teacher.load_state_dict(average)
            except RuntimeError as err:
                detail = " ".join(str(err).split()[:40])
                raise UserError(f"method.init_from={options.init_from} holds another network than backbone="
                                f"{cfg.backbone.name} builds for this data ({detail})") from err
        self.setup_optimizers()

    def param_groups(self, *modules: nn.Module) -> list[dict]:
        return super().param_groups(*(modules or (self.features, self.classifier)))

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    @torch.no_grad()
    def update_average(self) -> None:
        """average <- decay * average + (1 - decay) * model, every floating-point tensor (BatchNorm's
        running statistics too; its batch counter is copied)."""
        live, average = self.student().state_dict(), self.average.state_dict()
        floats = [name for name, tensor in live.items() if tensor.is_floating_point()]
        torch._foreach_lerp_([average[n] for n in floats], [live[n] for n in floats], 1.0 - self.average_decay)
        for name, tensor in live.items():
            if not tensor.is_floating_point():
                average[name].copy_(tensor)

    def step(self, batch: Batch, ctx: StepContext):
        options = self.cfg.method
        logits_t = self.classify(batch.x_t)
        with torch.no_grad():
            teacher_logits = self.teacher(batch.x_t)
        terms = {"loss_teacher": soft_cross_entropy(teacher_logits, logits_t),
                 **self.cluster_terms(batch.x_t, logits_t)}
        loss = (float(options.teacher_weight) * terms["loss_teacher"]
                + float(options.target_weight) * (terms["loss_entropy"] + terms["loss_vat_target"]))
        self.optimizer_step(self.optimizers["main"], loss)
        self.update_average()
        if (ctx.step + 1) % self.teacher_every == 0:
            self.teacher.load_state_dict(self.average.state_dict())
        return {"loss": loss.detach(), **{name: value.detach() for name, value in terms.items()}}
