"""What depends on a pair's setting, in one place: how predictions are read from a classifier's
logits, which target metrics each evaluation reports, and which label-free validators apply.

The trainer, evaluation and `da-eval` ask the task of the pair (`build_task(pair, cfg.data)`) and
never the setting itself, so a new kind of task (semantic segmentation: mIoU) is one more class here.

    closed, partial  target_acc (accuracy), target_mean_class_acc (mean over the target's classes of
                     the per-class accuracy; in a partial pair the classes the target lacks do not count)
    open_set         the classifier knows the source's K classes; a target sample whose largest softmax
                     probability is below `data.unknown_threshold` is predicted `unknown` (label K). A
                     method with an output of its own for unknown (OSBP: K + 1 logits) predicts the
                     argmax over all K + 1, the threshold unused.
                     target_os (mean per-class accuracy over the target's known classes and unknown),
                     target_os_star (over the known classes only), target_unk (accuracy on unknown),
                     target_h_score (2 OS* UNK / (OS* + UNK)), target_acc (accuracy over all target
                     samples, unknown counting as one class)

Closed and partial pairs read the K known-class logits only (an OSBP classifier trained on them keeps
its unknown output, which these pairs have no label for); so do the source accuracy and the validators
in every setting.

Segmentation pairs (`data.task: segmentation`, da_runner/data/segmentation.py) label every pixel:
labels (N, H, W), logits (N, C, H, W); pixels labelled IGNORE_INDEX (255, Cityscapes' "void") count
nowhere. SegmentationTask reports target_acc (pixel accuracy), target_miou (the mean over classes of
the intersection over union TP / (TP + FP + FN), over the classes present in the labels or predicted)
and target_iou_<class> per class; target_miou names the oracle.

Validators by setting (every one reads target inputs only):
    closed    source_acc, entropy, im, snd, dev
    partial   source_acc, entropy, snd, dev: not im, whose diversity term rewards spreading the
              target's predictions over every source class, the ones the target lacks included
    open_set  source_acc, entropy, snd, dev (on the K known-class outputs): not im, which likewise
              rewards spreading the unknown samples over the known classes
    segmentation  source_acc (source pixel accuracy), entropy (mean pixel entropy): im's diversity term
              would reward predicting the rare classes as often as the background, and snd and dev
              compare samples, not pixels
"""

import logging

import torch
import torch.nn.functional as F

from da_runner.data.classes import UNKNOWN, LabelSpace
from da_runner.errors import UserError
from da_runner.nn.losses import IGNORE_INDEX
from da_runner.validators import VALIDATORS

log = logging.getLogger(__name__)

CLASSIFICATION_VALIDATORS = {
    "closed": VALIDATORS,
    "partial": tuple(v for v in VALIDATORS if v != "im"),
    "open_set": tuple(v for v in VALIDATORS if v != "im"),
}


def accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of correct predictions: (N,), (N,) or, per pixel, (N, H, W), (N, H, W) -> float."""
    return (predicted == labels).sum().item() / labels.numel()


def per_class_accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> dict[int, float]:
    """Recall of each class that occurs in `labels`: {class: correct / samples of the class}."""
    return {int(c): (predicted[labels == c] == c).float().mean().item() for c in labels.unique()}


def mean_of(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def h_score(os_star: float, unk: float) -> float:
    """Harmonic mean of the known-class and the unknown accuracy: high only when both are."""
    return 2 * os_star * unk / (os_star + unk) if os_star + unk > 0 else 0.0


def open_set_metrics(predicted: torch.Tensor, labels: torch.Tensor, unknown: int) -> dict[str, float]:
    """OS, OS*, UNK and the H-score of predictions (N,) against labels (N,) where `unknown` is the
    label of every class outside the source's."""
    recall = per_class_accuracy(predicted, labels)
    unk = recall.get(unknown, float("nan"))
    os_star = mean_of(value for c, value in recall.items() if c != unknown)
    return {"target_os": mean_of(recall.values()), "target_os_star": os_star, "target_unk": unk,
            "target_h_score": h_score(os_star, unk)}


class ClassificationTask:
    """Closed and partial pairs: the classifier's argmax over the source's classes."""

    # trainer.analysis: proxy A-distance, t-SNE and ARI over one feature vector and one label per sample
    feature_analysis = True

    def __init__(self, label_space: LabelSpace):
        self.label_space = label_space
        self.setting = label_space.setting
        # the keys each evaluation adds for the target test split; target_acc first
        self.metric_names: tuple[str, ...] = ("target_acc", "target_mean_class_acc")
        self.primary_metric = "target_acc"  # the oracle's: the best evaluation by target labels

    @property
    def class_names(self) -> tuple[str, ...]:
        """The name of each label that evaluation may see (predictions and target labels)."""
        return self.label_space.class_names

    def known_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits of the source's K classes: (N, K) or (N, K + 1) with an unknown output -> (N, K)."""
        return logits[:, :self.label_space.num_classes]

    def predict_known(self, logits: torch.Tensor) -> torch.Tensor:
        """The argmax over the K known classes: (N, K) or (N, K + 1) logits -> (N,) labels. The source's
        prediction in every setting (the source holds the known classes only)."""
        return self.known_logits(logits).argmax(1)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """The target prediction: (N, K) logits (or (N, K + 1): the unknown output is ignored) -> (N,) labels."""
        return self.predict_known(logits)

    def target_metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        predicted = self.predict(logits)
        return {"target_acc": accuracy(predicted, labels),
                "target_mean_class_acc": mean_of(per_class_accuracy(predicted, labels).values())}

    def target_accuracy(self, logits: torch.Tensor, labels: torch.Tensor) -> float:
        """Accuracy of one further head (MCD's classifiers) under the same prediction rule."""
        return accuracy(self.predict(logits), labels)

    def evaluate(self, method, data, validators, batch_size: int) -> dict[str, float]:
        """One evaluation record from the outputs of every split, held at once (da_runner/evaluation.py)."""
        from da_runner.evaluation import classification_record

        return classification_record(method, data, self, validators, batch_size)

    def validators(self, names, select: str) -> list[str]:
        """The validators of `names` that apply to this setting; the one choosing best.pt must."""
        valid = CLASSIFICATION_VALIDATORS[self.setting]
        if select not in valid:
            raise UserError(f"trainer.select={select} does not apply to {self.setting} pairs; "
                            f"choose one of {', '.join(valid)} (docs/settings.md)")
        skipped = [name for name in names if name not in valid]
        if skipped:
            log.info("validators %s do not apply to %s pairs: not computed", ", ".join(skipped), self.setting)
        return [name for name in names if name in valid]

    def check_method(self, method) -> None:
        """Refuse a method the setting cannot train."""
        if "classification" not in method.tasks:
            raise UserError(f"method={method.cfg.method.name} trains segmentation networks only; this pair is a "
                            f"classification pair")

    def evaluation_images(self, method, pair) -> dict[str, torch.Tensor]:
        """Pictures to log at every evaluation, by TensorBoard tag: none for classification."""
        return {}


class OpenSetTask(ClassificationTask):
    """Open-set pairs: a closed-set classifier says `unknown` when it is not confident enough."""

    def __init__(self, label_space: LabelSpace, unknown_threshold: float):
        super().__init__(label_space)
        self.unknown_threshold = unknown_threshold
        self.metric_names = ("target_acc", "target_os", "target_os_star", "target_unk", "target_h_score")

    @property
    def class_names(self) -> tuple[str, ...]:
        return (*self.label_space.class_names, UNKNOWN)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] == self.label_space.num_classes + 1:  # the method's own unknown output (label K)
            return logits.argmax(1)
        confidence, predicted = F.softmax(logits.float(), dim=1).max(1)
        return torch.where(confidence < self.unknown_threshold, self.label_space.unknown_label, predicted)

    def target_metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        predicted = self.predict(logits)
        return {"target_acc": accuracy(predicted, labels),
                **open_set_metrics(predicted, labels, self.label_space.unknown_label)}

    def check_method(self, method) -> None:
        super().check_method(method)
        if method.uses_target_labels:
            raise UserError(f"method={method.cfg.method.name} trains on target labels, which an open-set pair gives "
                            f"only for evaluation (its unknown classes have no source label)")


def confusion_matrix(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     ignore_index: int | None = None) -> torch.Tensor:
    """counts[i, j]: samples (or pixels) of class i predicted as j, leaving out those labelled
    `ignore_index`. (N,) or (N, H, W) predictions and labels -> (C, C) int64."""
    keep = labels != ignore_index if ignore_index is not None else torch.ones_like(labels, dtype=torch.bool)
    index = labels[keep].long() * num_classes + predicted[keep].long()
    return torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes)


def pixel_accuracy(counts: torch.Tensor) -> float:
    """The share of counted pixels predicted right: trace / sum of a confusion matrix (C, C)."""
    return counts.diagonal().sum().item() / max(1, int(counts.sum()))


def intersection_over_union(counts: torch.Tensor) -> torch.Tensor:
    """Per-class IoU TP / (TP + FP + FN) of a confusion matrix (C, C) -> (C,), NaN for a class that is
    neither labelled nor predicted (no union)."""
    counts = counts.double()
    true_positive = counts.diagonal()
    union = counts.sum(0) + counts.sum(1) - true_positive
    return torch.where(union > 0, true_positive / union.clamp(min=1), torch.full_like(union, float("nan")))


# Colours of the label maps in TensorBoard (ignored pixels: black): background dark grey, then one per class.
PALETTE = torch.tensor([[64, 64, 64], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                        [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212],
                        [0, 128, 128], [220, 190, 255], [170, 110, 40], [255, 250, 200], [128, 0, 0],
                        [170, 255, 195], [128, 128, 0], [255, 215, 180], [0, 0, 128]], dtype=torch.float32) / 255


def colorize(labels: torch.Tensor) -> torch.Tensor:
    """Label maps (N, H, W) -> RGB images (N, 3, H, W) in [0, 1]; IGNORE_INDEX black."""
    labels = labels.long().cpu()
    palette = torch.cat([PALETTE, torch.zeros(1, 3)])
    index = torch.where(labels == IGNORE_INDEX, len(PALETTE), labels % len(PALETTE))
    return palette[index].permute(0, 3, 1, 2)


class SegmentationTask:
    """Semantic segmentation: every pixel is labelled with one of the source's classes (background
    included); metrics from the confusion matrix over all target test pixels."""

    setting = "closed"  # every target class is a source class
    validator_names = ("source_acc", "entropy")
    image_count = 8  # target test samples pictured at every evaluation
    feature_analysis = False  # trainer.analysis needs one feature vector and one label per sample; maps have many

    def __init__(self, label_space: LabelSpace):
        self.label_space = label_space
        self.num_classes = label_space.num_classes
        self.iou_names = tuple(f"target_iou_{name}" for name in label_space.class_names)
        self.metric_names = ("target_acc", "target_miou", *self.iou_names)
        self.primary_metric = "target_miou"

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.label_space.class_names

    def known_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def predict_known(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) logits -> (N, H, W) labels."""
        return logits.argmax(1)

    predict = predict_known

    def target_metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        return self.metrics_of(confusion_matrix(self.predict(logits), labels, self.num_classes, IGNORE_INDEX))

    def metrics_of(self, counts: torch.Tensor) -> dict[str, float]:
        """The target metrics of a confusion matrix (C, C) over the target test pixels."""
        iou = intersection_over_union(counts)
        return {"target_acc": pixel_accuracy(counts), "target_miou": iou.nanmean().item(),
                **{name: value for name, value in zip(self.iou_names, iou.tolist())}}

    @torch.no_grad()
    def evaluate(self, method, data, validators, batch_size: int) -> dict[str, float]:
        """One evaluation record, batch by batch: a segmentation split's logits (C values per pixel) are
        too large to hold at once (Cityscapes' 500 validation images at 1024x512: 20 GB in float32), so
        only confusion matrices and entropy sums are kept."""
        was_training = method.training
        method.eval()
        counts_s = self.confusion_over(method, data.pair.source_val, batch_size)
        counts_t = self.confusion_over(method, data.pair.target_test, batch_size)
        record = {"source_acc": pixel_accuracy(counts_s), **self.metrics_of(counts_t)}
        if "entropy" in validators:  # mean pixel entropy over the unlabelled target sample (labels not read)
            total, pixels = 0.0, 0
            for x, _ in data.target_sample.batches(batch_size):
                p = F.softmax(method.predict(x).float(), dim=1)
                total += -(p * (p + 1e-8).log()).sum(1).sum().item()
                pixels += p[:, 0].numel()
            record["entropy"] = total / pixels
        method.train(was_training)
        return record

    def confusion_over(self, method, domain, batch_size: int) -> torch.Tensor:
        """The confusion matrix (C, C) of `method`'s predictions over every labelled pixel of `domain`."""
        counts = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)
        for x, labels in domain.batches(batch_size):
            counts += confusion_matrix(self.predict(method.predict(x)), labels, self.num_classes, IGNORE_INDEX).cpu()
        return counts

    def target_accuracy(self, logits: torch.Tensor, labels: torch.Tensor) -> float:
        return accuracy(self.predict(logits), labels)

    def validators(self, names, select: str) -> list[str]:
        if select not in self.validator_names:
            raise UserError(f"trainer.select={select} does not apply to segmentation pairs; choose one of "
                            f"{', '.join(self.validator_names)}")
        skipped = [name for name in names if name not in self.validator_names]
        if skipped:
            log.info("validators %s do not apply to segmentation pairs: not computed", ", ".join(skipped))
        return [name for name in names if name in self.validator_names]

    def check_method(self, method) -> None:
        if "segmentation" not in method.tasks:
            raise UserError(f"method={method.cfg.method.name} does not train segmentation networks; on "
                            f"segmentation pairs use one of source_only, minent, advent, oracle")

    @torch.no_grad()
    def evaluation_images(self, method, pair) -> dict[str, torch.Tensor]:
        """The first `image_count` target test samples: input, prediction and ground truth, one row each."""
        x, labels = next(pair.target_test.batches(self.image_count))
        was_training = method.training
        method.eval()
        predicted = self.predict(method.predict(x))
        method.train(was_training)
        return {"eval/target_segmentation": torch.cat([pair.target_test.unnormalize(x).float().cpu(),
                                                       colorize(predicted), colorize(labels)])}


def build_task(pair, data) -> ClassificationTask | SegmentationTask:
    """The task of a pair: `data.task` (classification | segmentation), then its label space's setting,
    with `data.unknown_threshold` for open-set pairs."""
    if data.get("task") == "segmentation":  # data.task and data.augment are checked by config.validate
        return SegmentationTask(pair.label_space)
    if pair.label_space.setting == "open_set":
        return OpenSetTask(pair.label_space, float(data.get("unknown_threshold", 0.5)))
    return ClassificationTask(pair.label_space)
