"""Mean teacher / self-ensembling (French, Mackiewicz & Fisher, ICLR 2018, "Self-ensembling for visual
domain adaptation"), after the mean teacher of Tarvainen & Valpola (NeurIPS 2017).

A student network (the method's `features` + `classifier`) learns the labelled source and, on the
target, to agree with a teacher: a copy of the student whose weights are an exponential moving
average (EMA) of the student's, updated after every optimizer step and never by gradients. Student
and teacher see two independently augmented views of the same target images:

    L = CE(C(G(x_s)), y_s) + consistency_weight * ramp * (L_con + class_balance_weight * share * L_bal)
    L_con = mean_i m_i * mean_k (p_ik - q_ik)^2                        (squared difference of probabilities)
    m_i   = 1[max_k q_ik >= confidence_threshold],  share = mean_i m_i   (confidence thresholding)
    L_bal = sum_k BCE(mean_i p_ik, 1 / C)                               (class balance)
    p = softmax(student(view_1(x_t))),  q = softmax(teacher(view_2(x_t)))   (no gradient through q)
    teacher <- teacher_alpha * teacher + (1 - teacher_alpha) * student   (after each step)

The recipe, from the authors' code (github.com/Britefury/self-ensemble-visual-domain-adapt,
`experiment_domainadapt_meanteacher.py` unless stated):

- consistency: the `var` loss, (p - q)^2 averaged over the classes, times the mask, averaged over
  the whole batch (masked samples count as 0, the mean still divides by N); the mask keeps target
  samples whose teacher probability exceeds `confidence_thresh` 0.96837722. `unsup_weight` 3.
- class balance: binary cross-entropy between each class's mean student probability over the target
  batch and 1 / C (`robust_binary_crossentropy` in `network_architectures.py`, 1e-6 inside the logs),
  summed over the classes, times the mask's share, times `cls_balance` 0.005, inside the term that
  `unsup_weight` multiplies. The reference's MNIST <-> USPS command lines (`batch_search_exp.sh`) set
  `--cls_balance=0.0`, as do its SVHN -> MNIST lines except the `clsbal` variants; its MNIST -> SVHN
  lines keep 0.005.
- teacher: `teacher_alpha` 0.99; by default (`OldWeightEMA` in `optim_weight_ema.py`) only the
  parameters are averaged: the teacher's BatchNorm statistics come from its own passes, in training
  mode, over the target views it sees. This module does the same.
- student on source and on target in separate passes (the default, `combine_batches` off), teacher
  on the second target view; Adam at lr 1e-3 (configs/method/mean_teacher.yaml selects `optim=adam`).
- evaluation: the reference reports both networks' test errors and saves the teacher; `embed` (what
  da_runner evaluates and selects by) is the teacher's, the student is reported beside it
  (`predict_heads`: `eval/target_acc_student`).

Logged: `train/loss_cls`, `train/loss_consistency`, `train/loss_class_balance`,
`train/consistency_mask` (the share of target samples the teacher is confident about).
"""

import copy

import torch

from da_runner.methods.base import Batch, Method, StepContext, build_optimizer
from da_runner.methods.registry import register
from da_runner.nn.losses import class_balance_bce, consistency_loss


@register("mean_teacher")
class MeanTeacher(Method):
    def __init__(self, cfg, input_shape, num_classes):
        super().__init__(cfg, input_shape, num_classes)  # self.features + self.classifier: the student
        options = cfg.method
        self.alpha = float(options.teacher_alpha)
        self.threshold = float(options.confidence_threshold)
        # The teacher starts as an exact copy of the student (as the reference's EMA does). Its weights
        # are parameters that no optimizer holds and no gradient reaches: they live in the state dict,
        # so checkpoints hold the teacher and a resumed run continues its average exactly.
        self.teacher_features = copy.deepcopy(self.features).requires_grad_(False)
        self.teacher_classifier = copy.deepcopy(self.classifier).requires_grad_(False)
        self.optimizers = {"main": build_optimizer(self.param_groups(self.features, self.classifier), cfg.optim)}
        self._student = list(self.features.parameters()) + list(self.classifier.parameters())
        self._teacher = list(self.teacher_features.parameters()) + list(self.teacher_classifier.parameters())

    @property
    def extra_target_views(self) -> tuple[str, ...]:
        # The teacher's view: the same target images augmented again, at the student's level (data.augment).
        return (self.cfg.data.get("augment") or "none",)

    def step(self, batch: Batch, ctx: StepContext):
        # Student on source and on the first target view (separate passes with method.separate_forward, as
        # the reference's default runs them), the teacher on the second view, in training mode as in the
        # reference: its dropout and BatchNorm add their own noise to the targets.
        n_s, _, logits, loss_cls = self.forward_both(batch)
        logits_t = logits[n_s:]
        with torch.no_grad():
            logits_teacher = self.teacher_classifier(self.teacher_features(batch.x_t_views[0]))
        loss_con, mask = consistency_loss(logits_t, logits_teacher, self.threshold)
        share = mask.mean()
        loss_bal = class_balance_bce(logits_t)
        weight = float(self.cfg.method.consistency_weight) * self.ramp(ctx)
        unsupervised = loss_con + float(self.cfg.method.class_balance_weight) * share * loss_bal
        loss = loss_cls + weight * unsupervised
        self.optimizer_step(self.optimizers["main"], loss)
        self.update_teacher()
        return {"loss": loss.detach(), "loss_cls": loss_cls.detach(), "loss_consistency": loss_con.detach(),
                "loss_class_balance": loss_bal.detach(), "consistency_mask": share}

    @torch.no_grad()
    def update_teacher(self) -> None:
        """teacher <- alpha * teacher + (1 - alpha) * student, parameters only (BatchNorm statistics are
        the teacher's own, as in the reference's default EMA)."""
        torch._foreach_lerp_(self._teacher, self._student, 1.0 - self.alpha)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's features and logits: the network the paper evaluates."""
        f = self.teacher_features(x)
        return f, self.teacher_classifier(f)

    @torch.no_grad()
    def predict_heads(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The student, evaluated beside the teacher (`eval/target_acc_student`), as the reference reports both."""
        return {"student": self.classifier(self.features(x))}
