"""Class subsets of a pair, and the setting they make.

Any pair can keep some of its dataset's classes (`data.source_classes`, `data.target_classes`; null:
all) and relabels what it keeps:

    source  the i-th class of `data.source_classes` gets label i (0 .. K-1; K = the classifier's outputs);
    target  a class the source holds gets the source's label for it; a class the source does not hold
            (an open-set pair) gets the one shared `unknown` label K, which only evaluation reads.

A class is written as its index in the dataset (digits: 0-9; folders: the sorted folder names) or its
name. `data.target_classes` may also map target classes onto the source classes they stand for:
`{2: 0, 3: 1}` makes target digits 2 and 3 the target's versions of source digits 0 and 1 (the
MNIST 0/1 -> 2/3 pair of the same binary task).

The setting follows from the classes: `closed` (the target holds exactly the source's classes),
`partial` (a proper subset of them), `open_set` (classes the source never saw, whether or not it also
lacks some of the source's). `data.setting` may state it; a statement the classes contradict is an error.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from da_runner.errors import UserError

SETTINGS = ("closed", "partial", "open_set")
UNKNOWN = "unknown"  # the name of the open-set label shared by every class the source never saw


@dataclass(frozen=True)
class LabelSpace:
    """What the labels of a pair mean, for evaluation and for methods that depend on the setting (an
    open-set method adds an output for `unknown`, a partial one weights the source classes).

    class_names: the source's classes; label i is class_names[i] (the classifier has len() outputs).
    target_labels: the source labels that also occur in the target (its known classes).
    """

    setting: str
    class_names: tuple[str, ...]
    target_labels: tuple[int, ...]

    @classmethod
    def closed(cls, class_names: Sequence[str]) -> "LabelSpace":
        return cls("closed", tuple(class_names), tuple(range(len(class_names))))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def unknown_label(self) -> int | None:
        """The target label of every class outside the source's (open-set pairs), else None."""
        return self.num_classes if self.setting == "open_set" else None


def default_class_names(num_classes: int) -> tuple[str, ...]:
    return tuple(str(i) for i in range(num_classes))


@dataclass(frozen=True)
class ClassSelection:
    """Which dataset classes each domain keeps and the label each gets (dataset class -> label)."""

    source: dict[int, int]
    target: dict[int, int]
    label_space: LabelSpace

    @classmethod
    def from_config(cls, data, class_names: Sequence[str]) -> "ClassSelection | None":
        """The selection of `data.source_classes` / `data.target_classes` for a dataset with these
        classes; None when the pair keeps every class (a closed pair: labels unchanged)."""
        source_spec, target_spec = data.get("source_classes"), data.get("target_classes")
        declared = data.get("setting")
        if source_spec is None and target_spec is None:
            if declared not in (None, "closed"):
                raise UserError(f"data.setting={declared} but the pair keeps every class of both domains (a closed "
                                f"pair); choose classes with data.source_classes / data.target_classes")
            return None
        names = tuple(class_names)
        source = _class_list("data.source_classes", source_spec, names)
        if len(source) < 2:
            raise UserError(f"data.source_classes must keep at least 2 classes (a classifier needs two), "
                            f"got {list(source_spec)}")
        label_of = {raw: label for label, raw in enumerate(source)}
        if isinstance(target_spec, Mapping):
            stands_for = {_class_index("data.target_classes", key, names): _class_index("data.target_classes", value, names)
                          for key, value in target_spec.items()}
            strangers = sorted(names[raw] for raw in set(stands_for.values()) if raw not in label_of)
            if strangers:
                raise UserError(f"data.target_classes maps target classes onto {', '.join(strangers)}, which "
                                f"data.source_classes does not keep")
        else:
            stands_for = {raw: raw for raw in _class_list("data.target_classes", target_spec, names)}
        unknown = len(source)
        target = {raw: label_of.get(same, unknown) for raw, same in stands_for.items()}
        known = sorted(set(target.values()) - {unknown})
        if not known:
            raise UserError(f"data.target_classes ({', '.join(names[raw] for raw in target)}) holds none of the "
                            f"source's classes; a pair needs at least one class in common")
        setting = "open_set" if unknown in target.values() else "partial" if len(known) < len(source) else "closed"
        if declared is not None and declared != setting:
            raise UserError(f"data.setting={declared} but the classes make a {setting} pair: "
                            f"{_describe(setting, source, target, names)}")
        space = LabelSpace(setting, tuple(names[raw] for raw in source), tuple(known))
        return cls(label_of, target, space)

    def keep(self, labels: torch.Tensor, domain: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices of the samples of the kept classes, their new labels) for dataset labels (N,) of
        `domain` ("source" or "target")."""
        mapping = self.source if domain == "source" else self.target
        lookup = torch.full((int(labels.max()) + 1 if len(labels) else 1,), -1, dtype=torch.long)
        for raw, label in mapping.items():
            if raw < len(lookup):
                lookup[raw] = label
        new = lookup[labels.cpu()]
        index = torch.nonzero(new >= 0).flatten()
        return index, new[index]


def _class_index(key: str, entry, names: tuple[str, ...]) -> int:
    """A class given by index or name -> its index in the dataset."""
    if isinstance(entry, bool):
        raise UserError(f"{key}: {entry!r} is not a class")
    if isinstance(entry, int):
        if 0 <= entry < len(names):
            return entry
    elif str(entry) in names:
        return names.index(str(entry))
    shown = f"0-{len(names) - 1}" if names == default_class_names(len(names)) else ", ".join(names)
    raise UserError(f"{key}: {entry!r} is not a class of this dataset (classes: {shown})")


def _class_list(key: str, spec, names: tuple[str, ...]) -> list[int]:
    """The dataset classes of a list (null: all of them), in its order."""
    if spec is None:
        return list(range(len(names)))
    if isinstance(spec, (str, Mapping)) or not isinstance(spec, Sequence):
        raise UserError(f"{key} must be null or a list of classes, got {spec!r}")
    if len(spec) == 0:
        raise UserError(f"{key} must keep at least one class, got an empty list")
    classes = [_class_index(key, entry, names) for entry in spec]
    repeated = sorted({names[c] for c in classes if classes.count(c) > 1})
    if repeated:
        raise UserError(f"{key} lists {', '.join(repeated)} more than once")
    return classes


def _describe(setting: str, source: list[int], target: dict[int, int], names: tuple[str, ...]) -> str:
    unknown = len(source)
    if setting == "open_set":
        return "target classes " + ", ".join(names[raw] for raw, label in target.items() if label == unknown) + \
               " are not among the source's"
    missing = sorted(set(range(len(source))) - set(target.values()))
    if setting == "partial":
        return "the target lacks source classes " + ", ".join(names[source[label]] for label in missing)
    return "the target holds exactly the source's classes"


def select_classes(pair, data):
    """The pair restricted to the classes of `data.source_classes` / `data.target_classes` and
    relabelled, with its `label_space`; the pair itself when it keeps every class."""
    selection = ClassSelection.from_config(data, pair.label_space.class_names)
    if selection is None:
        return pair
    splits = {}
    for split in ("source_train", "source_val", "target_train", "target_test"):
        domain = getattr(pair, split)
        index, labels = selection.keep(domain.y, split.split("_")[0])
        if len(index) == 0:
            raise UserError(f"data={pair.name}: {split} holds no sample of the selected classes")
        splits[split] = domain.subset(index, labels)
    return replace(pair, **splits, num_classes=selection.label_space.num_classes, label_space=selection.label_space)
