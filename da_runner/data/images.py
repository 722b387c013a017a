"""Image datasets read from files under `data.root`, in the layouts of their official releases:

    <root>/office31/{amazon,dslr,webcam}/images/<class>/*.jpg                 domain_adaptation_images.tar.gz
    <root>/office_home/{Art,Clipart,Product,Real_World}/<class>/*.jpg         OfficeHomeDataset_10072016.zip
                                                                              ("Real World", its name there, works too)
    <root>/visda2017/{train,validation}/image_list.txt + the images listed    train.tar, validation.tar
    <root>/domainnet/<domain>/<class>/*.jpg + <root>/domainnet/<domain>_{train,test}.txt
    data=image_folder: data.source_dir, data.target_dir, each <dir>/<class>/<images>

Classes of folder layouts are the sorted class folder names (torchvision's ImageFolder order); the
list files of VisDA-2017 and DomainNet carry their labels.

Splits. None of these datasets has an official source validation split: the labelled source images
are shuffled with `data.seed` and `data.source_val_fraction` of them are held out for label-free
model selection (as for the digits), so the source trains on the rest. The target's unlabelled
training data and its test set are:
    Office-31, Office-Home, image_folder: the whole target domain, both (the standard protocol);
    VisDA-2017: the validation set, both;
    DomainNet: the target's official train split and its official test split.
"""

from pathlib import Path

import numpy as np
import torch

from da_runner.data.classes import LabelSpace
from da_runner.data.domain import DomainPair, validation_size
from da_runner.data.files import ImageFileDomain, default_num_workers
from da_runner.errors import MissingDataError, UserError, missing_data_message

OFFICE31_DOMAINS = ("amazon", "dslr", "webcam")
OFFICE_HOME_DOMAINS = ("Art", "Clipart", "Product", "Real_World")
VISDA2017_DOMAINS = ("train", "validation")  # synthetic renderings, real photos (COCO crops)
DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
VISDA2017_CLASSES = 12
DOMAINNET_CLASSES = 345

# What to put where, when files are missing ({root}: data.root). No automatic download: these
# datasets come from the authors' pages, under their terms.
HINTS = {
    "office31": "Office-31: download domain_adaptation_images.tar.gz (https://faculty.cc.gatech.edu/~judy/domainadapt/) "
                "and extract it into {root}/office31/ (amazon/, dslr/, webcam/, each with images/<class>/).",
    "office_home": "Office-Home: download OfficeHomeDataset_10072016.zip (https://www.hemanthdv.org/officeHomeDataset.html) "
                   "and put its folders Art, Clipart, Product and Real World into {root}/office_home/.",
    "visda2017": "VisDA-2017: download train.tar and validation.tar of the classification track "
                 "(http://ai.bu.edu/visda-2017/, github.com/VisionLearningGroup/taskcv-2017-public) and extract both "
                 "into {root}/visda2017/ (train/ and validation/, each with its image_list.txt).",
    "domainnet": "DomainNet: download each domain's zip and its <domain>_train.txt and <domain>_test.txt split files "
                 "(http://ai.bu.edu/M3SDA/) into {root}/domainnet/ and extract the zips there.",
    "image_folder": "data=image_folder: data.source_dir and data.target_dir are folders with one subfolder of images "
                    "per class, the same class names in both.",
}

Samples = list[tuple[str, int]]  # (image path, label)


def _check_domains(cfg, dataset: str, domains: tuple[str, ...]) -> None:
    for key in ("source", "target"):
        if cfg[key] not in domains:
            raise UserError(f"data.{key} must be one of {', '.join(domains)} for {dataset}, got {cfg[key]!r}")


def _require(dataset: str, root: Path, paths: list[Path]) -> None:
    """One error naming every path of `paths` that does not exist, and where to get the data."""
    missing = list(dict.fromkeys(p for p in paths if not p.exists()))  # source = target lists a path once
    if missing:
        hint = HINTS[dataset].format(root=root)
        raise MissingDataError(missing_data_message(root, {dataset: missing}, [hint]))


def _class_names(source_dir: Path, target_dir: Path) -> list[str]:
    """The class folder names, which must be the same in both domains."""
    names = {}
    for folder in (source_dir, target_dir):
        names[folder] = sorted(entry.name for entry in folder.iterdir() if entry.is_dir())
        if not names[folder]:
            raise UserError(f"{folder} has no class folders; expected one subfolder of images per class")
    source, target = names[source_dir], names[target_dir]
    if source != target:
        only_source, only_target = sorted(set(source) - set(target)), sorted(set(target) - set(source))
        raise UserError(f"source and target must have the same class folders: only in {source_dir}: "
                        f"{', '.join(only_source) or '-'}; only in {target_dir}: {', '.join(only_target) or '-'}")
    return source


def _folder_samples(folder: Path, classes: list[str]) -> Samples:
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    try:
        return make_dataset(folder, {name: i for i, name in enumerate(classes)}, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as err:  # a class folder without images
        raise UserError(f"{folder}: {err}") from err


def _list_samples(list_file: Path, base: Path, num_classes: int) -> Samples:
    """The lines `<path relative to base> <label>` of an official split file."""
    samples = []
    for number, line in enumerate(list_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].isdigit() or int(parts[1]) >= num_classes:
            raise UserError(f"{list_file}, line {number}: expected '<image path> <label in 0..{num_classes - 1}>', "
                            f"got {line!r}")
        samples.append((str(base / parts[0]), int(parts[1])))
    if not samples:
        raise UserError(f"{list_file} lists no images")
    return samples


def _domain(cfg, samples: Samples) -> ImageFileDomain:
    num_workers = default_num_workers() if cfg.num_workers == "auto" else int(cfg.num_workers)
    return ImageFileDomain(np.array([path for path, _ in samples], dtype=str),
                           torch.tensor([label for _, label in samples], dtype=torch.long),
                           image_size=int(cfg.image_size), resize=int(cfg.resize), num_workers=num_workers,
                           pin_memory=bool(cfg.pin_memory))


def _pair(cfg, source: Samples, target_train: Samples, target_test: Samples, num_classes: int,
          class_names: list[str] | None = None) -> DomainPair:
    """The labelled source shuffled with data.seed, data.source_val_fraction of it held out."""
    order = np.random.default_rng(int(cfg.seed)).permutation(len(source))
    source = [source[i] for i in order]
    n_val = validation_size(len(source), float(cfg.source_val_fraction))
    return DomainPair(name=cfg.name, source_train=_domain(cfg, source[n_val:]), source_val=_domain(cfg, source[:n_val]),
                      target_train=_domain(cfg, target_train), target_test=_domain(cfg, target_test),
                      num_classes=num_classes, label_space=LabelSpace.closed(class_names) if class_names else None)


def _folder_pair(cfg, source_dir: Path, target_dir: Path) -> DomainPair:
    """Two folders of class folders; the whole target is both its training data and its test set."""
    classes = _class_names(source_dir, target_dir)
    target = _folder_samples(target_dir, classes)
    return _pair(cfg, _folder_samples(source_dir, classes), target, target, len(classes), classes)


def build_office31(cfg) -> DomainPair:
    _check_domains(cfg, "office31", OFFICE31_DOMAINS)
    root = Path(cfg.root).expanduser()
    source_dir, target_dir = (root / "office31" / domain / "images" for domain in (cfg.source, cfg.target))
    _require("office31", root, [source_dir, target_dir])
    return _folder_pair(cfg, source_dir, target_dir)


def build_office_home(cfg) -> DomainPair:
    _check_domains(cfg, "office_home", OFFICE_HOME_DOMAINS)
    root = Path(cfg.root).expanduser()

    def folder(domain: str) -> Path:
        path = root / "office_home" / domain
        release_name = path.with_name(domain.replace("_", " "))  # the release zip calls it "Real World"
        return release_name if not path.exists() and release_name.exists() else path

    source_dir, target_dir = folder(cfg.source), folder(cfg.target)
    _require("office_home", root, [source_dir, target_dir])
    return _folder_pair(cfg, source_dir, target_dir)


def build_image_folder(cfg) -> DomainPair:
    if not cfg.get("source_dir") or not cfg.get("target_dir"):
        raise UserError("data=image_folder needs data.source_dir=<folder> and data.target_dir=<folder>, each with one "
                        "subfolder of images per class")
    dirs = {key: Path(cfg[key]).expanduser() for key in ("source_dir", "target_dir")}
    missing = [f"  data.{key}={path}" for key, path in dirs.items() if not path.is_dir()]
    if missing:
        raise MissingDataError("\n".join(["image folders not found:", *missing, HINTS["image_folder"]]))
    return _folder_pair(cfg, dirs["source_dir"], dirs["target_dir"])


def build_visda2017(cfg) -> DomainPair:
    _check_domains(cfg, "visda2017", VISDA2017_DOMAINS)
    root = Path(cfg.root).expanduser()
    lists = {domain: root / "visda2017" / domain / "image_list.txt" for domain in (cfg.source, cfg.target)}
    _require("visda2017", root, list(lists.values()))
    # image_list.txt names each image relative to its own folder (train/ or validation/)
    source, target = (_list_samples(lists[d], lists[d].parent, VISDA2017_CLASSES) for d in (cfg.source, cfg.target))
    return _pair(cfg, source, target, target, VISDA2017_CLASSES)


def build_domainnet(cfg) -> DomainPair:
    _check_domains(cfg, "domainnet", DOMAINNET_DOMAINS)
    root = Path(cfg.root).expanduser()
    base = root / "domainnet"
    source_list, target_train_list, target_test_list = (
        base / f"{cfg.source}_train.txt", base / f"{cfg.target}_train.txt", base / f"{cfg.target}_test.txt")
    _require("domainnet", root, [base / cfg.source, source_list, base / cfg.target, target_train_list, target_test_list])
    # the split files name each image relative to the dataset folder: `clipart/<class>/<file>.jpg <label>`
    source, target_train, target_test = (_list_samples(path, base, DOMAINNET_CLASSES)
                                         for path in (source_list, target_train_list, target_test_list))
    return _pair(cfg, source, target_train, target_test, DOMAINNET_CLASSES)
