"""`gta5_cityscapes`: GTA5 -> Cityscapes semantic segmentation (the ADVENT benchmark, Vu et al., CVPR
2019), read from the official release layouts under `data.root`:

    <root>/gta5/images/*.png                                               GTA5 (Richter et al., ECCV 2016,
    <root>/gta5/labels/*.png            (same file names)                  "Playing for Data"), 24,966 frames
    <root>/cityscapes/leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png         leftImg8bit_trainvaltest.zip
    <root>/cityscapes/gtFine/{train,val}/<city>/<name>_gtFine_labelIds.png          gtFine_trainvaltest.zip

Splits:
    source_train, source_val   every GTA5 frame, shuffled with data.seed, data.source_val_fraction held
                               out for label-free model selection (GTA5 has no official split)
    target_train               Cityscapes train (2,975 images; their labels are never used for training)
    target_test                Cityscapes val (500 images), labelled

Labels. Both datasets store Cityscapes *label ids* (0-33, cityscapesScripts' labels table); GTA5's
label PNGs are palette images whose indices are those ids. A 256-entry lookup table maps them to the
19 *train ids* of the benchmark, every other id (void, and the classes the benchmark leaves out) to
IGNORE_INDEX (255), which counts nowhere.

Transforms (torchvision transforms v2, image and label map together as a `tv_tensors.Mask`, so any
geometric draw moves both; masks are resized with nearest neighbours, never blended):

    training, augment=none   resize to data.source_size / data.target_size ([W, H]; ADVENT: GTA5 at
                             1280x720, Cityscapes at 1024x512)
    training, augment=weak   the resize, a random crop to data.crop (when set), a horizontal flip
    evaluation               the resize of the domain (the target test at data.target_size), labels
                             resized with it

Evaluation differs from ADVENT's on purpose: ADVENT upsamples its predictions to the full 2048x1024
label maps and scores there; here the label maps are resized (nearest) to the evaluation input size, so
a batch is (images, labels) of one size, like every other pair. mIoU at 1024x512 labels is close to,
not identical with, the full-resolution figure.

Decoding, exact resume and the device side follow the classification file domains (files.py): DataLoader
workers decode PNGs into uint8 tensors (images (3, H, W), train-id maps (H, W): an eighth of int64's
bytes), batches travel in page-locked memory to the GPU, images are normalised there with ImageNet's
mean and std, and label maps become int64. Each training sample's crop and flip are drawn from a seed
given by its place in the stream, so a stream restored from its `state_dict()` delivers the same crops
and flips as one that never stopped.
"""

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from da_runner.data.augment import NO_INVERSION, Inversion, check_level
from da_runner.data.classes import LabelSpace
from da_runner.data.domain import DomainPair, validation_size
from da_runner.data.files import FileBatchStream, FileDomain, ImageFiles, default_num_workers
from da_runner.errors import MissingDataError, UserError, missing_data_message
from da_runner.tasks import IGNORE_INDEX

# The 19 classes of the benchmark, in train-id order (cityscapesScripts' labels table, the labels whose
# trainId is 0-18).
CLASS_NAMES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
               "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
               "bicycle")
NUM_CLASSES = len(CLASS_NAMES)

# The label id of each train id, from the official table:
# https://github.com/mcordts/cityscapesScripts/blob/master/cityscapesscripts/helpers/labels.py
# (road 7, sidewalk 8, building 11, wall 12, fence 13, pole 17, traffic light 19, traffic sign 20,
# vegetation 21, terrain 22, sky 23, person 24, rider 25, car 26, truck 27, bus 28, train 31,
# motorcycle 32, bicycle 33); ADVENT's GTA5 and Cityscapes loaders use the same map.
LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)


def train_id_table() -> np.ndarray:
    """(256,) uint8: table[label id] = train id, IGNORE_INDEX for every id outside LABEL_IDS (void,
    ego vehicle, ..., and classes the benchmark leaves out: parking, guard rail, caravan, ...)."""
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    table[list(LABEL_IDS)] = np.arange(NUM_CLASSES, dtype=np.uint8)
    return table


TRAIN_IDS = train_id_table()

# Where the data comes from ({root}: data.root). No automatic download: GTA5 is a large archive on the
# authors' server, and Cityscapes needs an account.
HINTS = {
    "gta5": "GTA5: download the images and labels archives of 'Playing for Data' "
            "(https://download.visinf.tu-darmstadt.de/data/from_games/) and extract them into {root}/gta5/ "
            "(images/*.png, labels/*.png with the same file names).",
    "cityscapes": "Cityscapes: register at https://www.cityscapes-dataset.com, download leftImg8bit_trainvaltest.zip "
                  "and gtFine_trainvaltest.zip and extract both into {root}/cityscapes/ (leftImg8bit/, gtFine/).",
}

Size = tuple[int, int]  # (W, H), as the configs and PIL write sizes


def read_label_map(path) -> np.ndarray:
    """A label-id PNG -> (H, W) uint8 train ids. Cityscapes' *_gtFine_labelIds.png are 8-bit grey
    images, GTA5's labels/*.png palette images: both hold the ids as their pixel values (read as they
    are, never converted to RGB)."""
    from PIL import Image

    with Image.open(path) as image:
        if image.mode not in ("L", "P"):
            raise UserError(f"{path}: expected a label-id map (an 8-bit grey or palette PNG), got PIL mode "
                            f"{image.mode}; the colour-coded *_gtFine_color.png files are not label maps")
        ids = np.asarray(image)
    return TRAIN_IDS[ids]


def segmentation_transform(size: Size, crop: Size | None = None, augment: str = "none"):
    """(PIL image, tv_tensors.Mask (H0, W0) uint8) -> ((3, H, W) uint8 image, Mask (H, W)), drawing
    every random parameter once for both. `size`, `crop`: (W, H). augment none: resize to `size`;
    weak: the resize, a random crop to `crop` (when given) and a horizontal flip."""
    from torchvision.transforms import v2

    width, height = size
    # Each input is resized to the fixed size on its own (bilinear with antialiasing for the image,
    # nearest for the Mask: v2 never interpolates masks), so the pair is aligned from here on even
    # should an image and its label map be stored at different sizes.
    steps = [v2.Resize((height, width), antialias=True)]
    if check_level(augment) == "weak":
        if crop is not None:
            steps.append(v2.RandomCrop((crop[1], crop[0])))
        steps.append(v2.RandomHorizontalFlip())
    elif augment != "none":
        raise UserError(f"data.augment={augment} is not available for segmentation files; use none or weak "
                        f"(a random crop to data.crop and a horizontal flip)")
    return v2.Compose([*steps, v2.PILToTensor()])


class SegmentationFiles(Dataset):
    """Decodes (image, label map) file pairs. A key is an index (no randomness: evaluation) or an
    (index, seed) pair (training: the transform's random draws come from `seed`, as in
    files.ImageFiles). A sample is ((3, H, W) uint8 image, (H, W) uint8 train-id map)."""

    def __init__(self, files: np.ndarray, label_files: np.ndarray, transform):
        self.files, self.label_files, self.transform = files, label_files, transform  # numpy: shared by forked workers

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image
        from torchvision import tv_tensors

        index, seed = key if isinstance(key, tuple) else (key, None)
        with Image.open(self.files[index]) as image:
            image = image.convert("RGB")
        mask = tv_tensors.Mask(torch.from_numpy(read_label_map(self.label_files[index])))
        pair = (image, mask)
        x, y = self.transform(pair) if seed is None else ImageFiles.seeded(self.transform, pair, seed)
        # plain tensors for the collate and the trainer (tv_tensors' subclass would follow them everywhere)
        return x.as_subclass(torch.Tensor), y.as_subclass(torch.Tensor)


@dataclass
class SegmentationFileDomain(FileDomain):
    """Images `files` with label-id maps `label_files` (paths, (N,) each), decoded by DataLoader
    workers on demand. Batches: images (B, 3, H, W) float, normalised, and labels (B, H, W) int64 train
    ids (IGNORE_INDEX: void), H x W = `size` reversed, or `crop` for augment=weak training batches."""

    files: np.ndarray  # (N,) image paths
    label_files: np.ndarray  # (N,) label-id map paths, in the same order
    size: Size = (1024, 512)  # (W, H) every image and label map is resized to
    crop: Size | None = None  # (W, H) of augment=weak's random crop (None: no crop)

    def __post_init__(self):
        super().__post_init__()
        self.label_files = np.asarray(self.label_files, dtype=str)
        if len(self.files) != len(self.label_files):
            raise ValueError(f"{len(self.files)} images but {len(self.label_files)} label maps")
        self.size = tuple(self.size)
        self.crop = None if self.crop is None else tuple(self.crop)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """(3, H, W) of the resized images: evaluation batches and augment=none training batches
        (augment=weak with data.crop gives crops of (3, crop H, crop W))."""
        return (3, self.size[1], self.size[0])

    def subset(self, index: torch.Tensor, labels: torch.Tensor | None = None) -> "SegmentationFileDomain":
        if labels is not None:
            raise UserError("class subsets (data.source_classes / data.target_classes) do not apply to "
                            "segmentation pairs: every pixel keeps its class")
        index = index.cpu().numpy()
        return replace(self, files=self.files[index], label_files=self.label_files[index])

    def prepare_labels(self, y: torch.Tensor) -> torch.Tensor:
        """uint8 train-id maps (B, H, W) from the loader -> int64 on the device (converted there:
        an eighth of the bytes to copy)."""
        return y.to(self.device, non_blocking=True).long()

    def loader(self, augment: str = "none", views: tuple[str, ...] | None = None, invert: Inversion = NO_INVERSION,
               **kwargs) -> DataLoader:
        """A DataLoader over the file pairs with the transform of `augment` (none: the evaluation's);
        kwargs choose the batches (batch_size or batch_sampler)."""
        if invert:
            raise UserError("data.invert does not apply to segmentation file pairs; use data.invert=0")
        if views is not None:
            # Each view would flip and crop its label map differently, and a batch carries one label map.
            raise UserError("methods that train on several augmented views of each target batch (fixmatch, "
                            "mean_teacher, method.fixmatch_weight > 0) do not apply to segmentation pairs")
        dataset = SegmentationFiles(self.files, self.label_files, segmentation_transform(self.size, self.crop, augment))
        return DataLoader(dataset, num_workers=self.num_workers,
                          pin_memory=self.pin_memory and self.device.type == "cuda",
                          # its own generator: starting a loader draws nothing from the training's global RNG
                          generator=torch.Generator(), **kwargs)

    def batches(self, batch_size: int):
        for x, y in self.loader(batch_size=batch_size):
            yield self.prepare(x), self.prepare_labels(y)

    def stream(self, batch_size: int, seed: int, augment: str | None = None,
               invert: Inversion = NO_INVERSION) -> "SegmentationBatchStream":
        """Training batches; `augment` (data.augment: none | weak; None: none, ADVENT's recipe) picks
        the training transform (`segmentation_transform`)."""
        level = check_level(augment or "none")
        segmentation_transform(self.size, self.crop, level)  # refuses `strong` here, not in a worker
        return SegmentationBatchStream(self, batch_size, seed, level, invert)


class SegmentationBatchStream(FileBatchStream):
    """files.FileBatchStream over a `SegmentationFileDomain` (the same order, per-sample seeds, state
    and read-ahead workers), its label maps int64 on the device."""

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self._next_raw()
        return self.domain.prepare(x), self.domain.prepare_labels(y)


# --- the pair (configs/data/gta5_cityscapes.yaml) ---------------------------------------------------------

Samples = list[tuple[str, str]]  # (image path, label-id map path)


def _size(cfg, key: str, required: bool = True) -> Size | None:
    """data.<key> as (W, H): a list of two positive integers (or null where not required)."""
    value = cfg.get(key)
    if value is None and not required:
        return None
    try:
        width, height = (int(v) for v in value)
        if width <= 0 or height <= 0 or any(int(v) != v for v in value):
            raise ValueError
    except (TypeError, ValueError):
        allowed = "" if required else "null or "
        raise UserError(f"data.{key} must be {allowed}[width, height] in pixels, two positive integers, "
                        f"got {value!r}") from None
    return width, height


def _require(root: Path, paths: dict[str, list[Path]]) -> None:
    """One error naming every missing folder, with where each dataset comes from."""
    missing = {name: [p for p in folders if not p.is_dir()] for name, folders in paths.items()}
    missing = {name: folders for name, folders in missing.items() if folders}
    if missing:
        raise MissingDataError(missing_data_message(root, missing, [HINTS[name].format(root=root) for name in missing]))


def _paired(pairs: Samples, images: Path, dataset: str, root: Path) -> Samples:
    """`pairs` when every image has its label map, else one error naming the first missing ones."""
    if not pairs:
        raise MissingDataError(f"no images found in {images} ({dataset}); " + HINTS[dataset].format(root=root))
    unlabelled = [label for _, label in pairs if not Path(label).is_file()]
    if unlabelled:
        shown = ", ".join(unlabelled[:3]) + (", ..." if len(unlabelled) > 3 else "")
        raise MissingDataError(f"{len(unlabelled)} of the {len(pairs)} images in {images} have no label map: "
                               f"{shown} not found; " + HINTS[dataset].format(root=root))
    return pairs


def gta5_samples(root: Path) -> Samples:
    """Every (image, label map) of <root>/gta5/, sorted by file name."""
    images, labels = root / "gta5" / "images", root / "gta5" / "labels"
    pairs = [(str(path), str(labels / path.name)) for path in sorted(images.glob("*.png"))]
    return _paired(pairs, images, "gta5", root)


def cityscapes_samples(root: Path, split: str) -> Samples:
    """Every (image, label-id map) of Cityscapes' `split` (train | val), sorted by city and name."""
    images, labels = root / "cityscapes" / "leftImg8bit" / split, root / "cityscapes" / "gtFine" / split
    suffix = "_leftImg8bit.png"
    pairs = [(str(path), str(labels / path.parent.name / (path.name[:-len(suffix)] + "_gtFine_labelIds.png")))
             for path in sorted(images.glob(f"*/*{suffix}"))]
    return _paired(pairs, images, "cityscapes", root)


def build_gta5_cityscapes(cfg) -> DomainPair:
    """The GTA5 -> Cityscapes pair from the release layouts under data.root (module docstring). GTA5
    is shuffled with data.seed; data.source_subset keeps that many frames before data.source_val_fraction
    of them is held out, data.target_subset that many (random) Cityscapes train images."""
    root = Path(cfg.root).expanduser()
    _require(root, {
        "gta5": [root / "gta5" / "images", root / "gta5" / "labels"],
        "cityscapes": [root / "cityscapes" / folder / split for folder in ("leftImg8bit", "gtFine")
                       for split in ("train", "val")],
    })
    source_size, target_size, crop = _size(cfg, "source_size"), _size(cfg, "target_size"), _size(cfg, "crop", False)
    if crop is not None and not all(c <= min(s, t) for c, s, t in zip(crop, source_size, target_size)):
        raise UserError(f"data.crop={list(crop)} must fit in both data.source_size={list(source_size)} and "
                        f"data.target_size={list(target_size)} ([width, height])")

    rng = np.random.default_rng(int(cfg.seed))

    def subset(samples: Samples, key: str) -> Samples:
        order = rng.permutation(len(samples))
        size = cfg.get(key)
        if size is not None:
            if not 0 < int(size) <= len(order):
                raise UserError(f"data.{key} must be null or between 1 and the {len(order)} images found, got {size}")
            order = order[: int(size)]
        return [samples[i] for i in order]

    source = subset(gta5_samples(root), "source_subset")
    target_train = subset(cityscapes_samples(root, "train"), "target_subset")
    target_test = cityscapes_samples(root, "val")  # in order: the pictured evaluation images stay the same
    num_workers = default_num_workers() if cfg.get("num_workers", "auto") == "auto" else int(cfg.num_workers)

    def domain(samples: Samples, size: Size) -> SegmentationFileDomain:
        return SegmentationFileDomain(np.array([image for image, _ in samples], dtype=str),
                                      np.array([label for _, label in samples], dtype=str), size=size, crop=crop,
                                      num_workers=num_workers, pin_memory=bool(cfg.get("pin_memory", True)))

    n_val = validation_size(len(source), float(cfg.source_val_fraction))
    return DomainPair(
        name=cfg.get("name", "gta5_cityscapes"),
        source_train=domain(source[n_val:], source_size),
        source_val=domain(source[:n_val], source_size),
        target_train=domain(target_train, target_size),
        target_test=domain(target_test, target_size),
        num_classes=NUM_CLASSES,
        label_space=LabelSpace.closed(CLASS_NAMES),
    )
