"""SHOT: source hypothesis transfer (Liang, Hu & Feng, ICML 2020, "Do We Really Need to Access the
Source Data? Source Hypothesis Transfer for Unsupervised Domain Adaptation").

Two stages in one run, switched by `ctx.step` (as ADDA):

1. steps [0, pretrain_steps): the network G = backbone + bottleneck and the classifier C learn the
   labelled source data with label-smoothed cross-entropy (`method.label_smoothing`, 0.1).
2. steps [pretrain_steps, max_steps): source-free. C, the source hypothesis, is frozen (eval mode,
   no gradient); G alone learns on target batches

       L = im_weight * (mean_i H(p_i) - H(mean_i p_i)) + pseudo_label_weight * CE(C(G(x_t)), yhat_t)

   information maximisation (confident and diverse predictions) plus cross-entropy to pseudo-labels
   yhat from class centroids (`centroid_pseudo_labels`), recomputed over the whole target training
   set at the start of stage 2 and every `method.pseudo_label_every` steps after (null: once per
   epoch of the target set, as the reference). The trainer serves that pass (`wants_target_pass`,
   `target_pass`); `batch.idx_t` picks each batch's labels. This stage never reads `batch.x_s` or
   `batch.y_s`.

Each stage has its own optimizer of the `optim` group (stage 2's over G only, with fresh momentum)
and runs the `optim` group's learning-rate schedule over its own length, as the reference's two training
functions do; the rate is logged as `train/stage_lr` (the trainer's `train/lr` follows the whole
run and does not apply). `pseudo_label_weight: 0` is SHOT-IM (no pass is made).

Reference recipe (tim-learn/SHOT, digit/uda_digit.py, digit/network.py, digit/loss.py): bottleneck
Linear(256) -> BatchNorm -> Dropout(0.5) without ReLU and a weight-normalised linear classifier
(configs/method/shot.yaml sets both); label smoothing 0.1; SGD lr 0.01, momentum 0.9, Nesterov,
weight decay 1e-3, lr0 * (1 + 10 i / max_iter) ** -0.75 per stage; batch 64; 30 epochs per stage;
entropy and diversity weight 1 (--ent_par); beta 0.1 on digits (digit/digit.sh, --cls_par 0.1;
0.3 for the object datasets). Resume is exact in either stage: the pseudo-labels are part of the
checkpoint (`checkpoint_state`).
"""

import torch
import torch.nn.functional as F

from da_runner.methods.base import Batch, Method, StepContext, build_optimizer
from da_runner.methods.registry import register
from da_runner.nn.losses import information_maximization_terms
from da_runner.schedules import lr_factor


@torch.no_grad()
def centroid_pseudo_labels(features: torch.Tensor, logits: torch.Tensor, rounds: int = 1) -> torch.Tensor:
    """SHOT's self-supervised pseudo-labels (the reference's digit/uda_digit.py, obtain_label).

    features (N, d) and logits (N, C) of the whole target set -> labels (N,) int64:

    1. each feature gets a constant 1 appended and is scaled to unit length;
    2. class centroids are the prediction-weighted means c_k = sum_i p_ik f_i / sum_i p_ik,
       p = softmax(logits), and each sample takes the class of the nearest centroid by cosine
       distance 1 - cos(f_i, c_k);
    3. `rounds` times more (the reference: once), the centroids are recomputed from those hard labels
       and the samples relabelled.

    A class with no weight in a round (no member in a hard round) has no centroid and takes no
    sample: the digits script would divide 0 by its 1e-8 and get a zero centroid, whose cosine
    distance is undefined; the object script (object/image_target.py) likewise keeps only classes
    with members (its `labelset`, threshold 0). Ties go to the lower class index, as argmin does.
    """
    f = torch.cat([features.float(), torch.ones(len(features), 1, device=features.device)], dim=1)
    f = F.normalize(f, dim=1)
    weights = F.softmax(logits.float(), dim=1)
    for _ in range(rounds + 1):
        mass = weights.sum(0)  # (C,)
        # The mean's scale does not change a cosine distance: the weighted sum's direction is the centroid's.
        centroids = F.normalize(weights.T @ f, dim=1)
        cosine = (f @ centroids.T).masked_fill(mass <= 0, float("-inf"))
        labels = cosine.argmax(1)  # = argmin of the cosine distance
        weights = F.one_hot(labels, logits.shape[1]).float()
    return labels


@register("shot")
class SHOT(Method):
    def __init__(self, cfg, input_shape, num_classes):
        super().__init__(cfg, input_shape, num_classes)
        options = cfg.method
        self.pretrain_steps = int(options.pretrain_steps)
        self.label_smoothing = float(options.label_smoothing)
        self.im_weight = float(options.im_weight)
        self.pseudo_label_weight = float(options.pseudo_label_weight)
        every = options.get("pseudo_label_every")
        self.pseudo_label_every = None if every is None else int(every)
        self.pseudo_label_rounds = int(options.pseudo_label_rounds)
        # (N_target,) int64 once stage 2 has made its first pass; saved by checkpoint_state. Not a
        # buffer: its size is the target set's, which the method learns only from the pass.
        self.pseudo_labels: torch.Tensor | None = None
        self.optimizers = {"source": self._stage_optimizer(self.features, self.classifier),
                           "target": self._stage_optimizer(self.features)}

    def _stage_optimizer(self, *modules) -> torch.optim.Optimizer:
        """An optimizer whose groups keep their `optim.lr_mult` under another key: without "lr_mult"
        the trainer leaves their rate alone, and `_set_stage_lr` schedules it per stage."""
        groups = self.param_groups(*modules)
        for group in groups:
            group["stage_lr_mult"] = group.pop("lr_mult")
        return build_optimizer(groups, self.cfg.optim)

    def _set_stage_lr(self, optimizer: torch.optim.Optimizer, step_in_stage: int, stage_steps: int) -> float:
        lr = float(self.cfg.optim.lr) * lr_factor(step_in_stage, max(stage_steps, 1), self.cfg.optim)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["stage_lr_mult"]
        return lr

    def wants_target_pass(self, ctx: StepContext) -> bool:
        if ctx.step < self.pretrain_steps or self.pseudo_label_weight <= 0:
            return False
        if self.pseudo_labels is None:
            return True
        # null: an epoch of the target stream, len // batch_size batches (EpochOrder drops the tail).
        every = self.pseudo_label_every or max(1, len(self.pseudo_labels) // int(self.cfg.trainer.batch_size))
        return (ctx.step - self.pretrain_steps) % every == 0

    def target_pass(self, batches) -> None:
        features, logits, indices = [], [], []
        for x_t, idx_t in batches:
            f_t = self.features(x_t)
            features.append(f_t)
            logits.append(self.classifier(f_t))
            indices.append(idx_t)
        index = torch.cat(indices)
        labels = torch.empty(len(index), dtype=torch.long, device=index.device)
        labels[index] = centroid_pseudo_labels(torch.cat(features), torch.cat(logits), self.pseudo_label_rounds)
        self.pseudo_labels = labels

    def step(self, batch: Batch, ctx: StepContext):
        if ctx.step < self.pretrain_steps:
            lr = self._set_stage_lr(self.optimizers["source"], ctx.step, self.pretrain_steps)
            logits_s = self.classifier(self.features(batch.x_s))
            loss_cls = F.cross_entropy(logits_s, batch.y_s, label_smoothing=self.label_smoothing)
            self.optimizer_step(self.optimizers["source"], loss_cls)
            return {"loss": loss_cls.detach(), "loss_cls": loss_cls.detach(), "stage": torch.tensor(1.0),
                    "stage_lr": torch.tensor(lr)}

        # Stage 2 reads the target batch only: SHOT adapts without the source data.
        lr = self._set_stage_lr(self.optimizers["target"], ctx.step - self.pretrain_steps,
                                ctx.max_steps - self.pretrain_steps)
        # The source hypothesis is a fixed function (the reference: netC.eval(), requires_grad False);
        # set every step, as evaluation puts the whole method back in training mode.
        self.classifier.eval()
        self.classifier.requires_grad_(False)
        logits_t = self.classifier(self.features(batch.x_t))
        loss_ent, loss_div = information_maximization_terms(logits_t)
        loss = self.im_weight * (loss_ent - loss_div)
        terms = {"loss_entropy": loss_ent.detach(), "loss_diversity": loss_div.detach()}
        if self.pseudo_label_weight > 0:
            if self.pseudo_labels is None or batch.idx_t is None:
                raise RuntimeError("SHOT's stage 2 needs pseudo-labels from a target pass (Method.target_pass) "
                                   "and batches that carry the target samples' indices (Batch.idx_t)")
            loss_pl = F.cross_entropy(logits_t, self.pseudo_labels[batch.idx_t])
            loss = loss + self.pseudo_label_weight * loss_pl
            terms["loss_pseudo_label"] = loss_pl.detach()
        self.optimizer_step(self.optimizers["target"], loss)
        return {"loss": loss.detach(), **terms, "stage": torch.tensor(2.0), "stage_lr": torch.tensor(lr)}

    def checkpoint_state(self) -> dict:
        return {**super().checkpoint_state(), "pseudo_labels": self.pseudo_labels}

    def load_checkpoint_state(self, state: dict) -> None:
        super().load_checkpoint_state(state)
        labels = state.get("pseudo_labels")
        self.pseudo_labels = None if labels is None else labels.to(next(self.parameters()).device)
