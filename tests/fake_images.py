"""Tiny image datasets in the release layouts of Office-31, Office-Home, VisDA-2017 and DomainNet,
written by the tests themselves (40x40 noise images, JPEG or PNG)."""

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["back_pack", "bike", "calculator"]
OFFICE31_SIZES = {"amazon": 12, "dslr": 6, "webcam": 9}  # images per domain, spread over CLASSES


def write_image(path: Path, rng, size=(40, 40)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_class_folders(folder: Path, n: int, rng, ext: str = "jpg", classes=CLASSES) -> list[tuple[Path, int]]:
    """n images spread over one subfolder per class; returns (path, class index) of each."""
    written = []
    for i in range(n):
        label = i % len(classes)
        path = folder / classes[label] / f"frame_{i:04d}.{ext}"
        write_image(path, rng)
        written.append((path, label))
    return written


def write_office31(root: Path, rng) -> dict:
    return {domain: write_class_folders(root / "office31" / domain / "images", n, rng)
            for domain, n in OFFICE31_SIZES.items()}


def write_office_home(root: Path, rng) -> dict:
    # "Real World" with a space, as the release zip names the folder
    return {domain: write_class_folders(root / "office_home" / domain, 6, rng, ext="png")
            for domain in ("Art", "Clipart", "Product", "Real World")}


def write_list_split(folder: Path, base: Path, list_file: Path, n: int, rng, first: int = 0) -> list[tuple[Path, int]]:
    """n PNG images under folder/<class>/ and the split file listing them relative to base."""
    written = [(folder / CLASSES[i % 3] / f"{first + i:05d}.png", i % 3) for i in range(n)]
    for path, _ in written:
        write_image(path, rng)
    list_file.write_text("".join(f"{path.relative_to(base).as_posix()} {label}\n" for path, label in written))
    return written


def write_visda2017(root: Path, rng) -> dict:
    base = root / "visda2017"
    return {split: write_list_split(base / split, base / split, base / split / "image_list.txt", n, rng)
            for split, n in (("train", 10), ("validation", 7))}


def write_domainnet(root: Path, rng) -> dict:
    base = root / "domainnet"
    base.mkdir(parents=True)
    written = {}
    for domain in ("clipart", "real", "sketch"):
        for split, n, first in (("train", 8, 0), ("test", 4, 100)):
            written[domain, split] = write_list_split(base / domain, base, base / f"{domain}_{split}.txt", n, rng, first)
    return written


def small_image_folder_run(tmp_path: Path, seed: int, source_images: int, target_images: int) -> list[str]:
    """Writes a source (jpg) and a target (png) class-folder pair and returns the overrides of a tiny
    run on it: 28x28 crops, LeNet, batches of 4, evaluation on 8 images, on the CPU."""
    rng = np.random.default_rng(seed)
    write_class_folders(tmp_path / "src", source_images, rng)
    write_class_folders(tmp_path / "tgt", target_images, rng, ext="png")
    return ["data=image_folder", f"data.source_dir={tmp_path / 'src'}", f"data.target_dir={tmp_path / 'tgt'}",
            "data.image_size=28", "data.resize=32", "backbone=lenet", "trainer.batch_size=4",
            "trainer.eval_batch_size=8", "trainer.validation_samples=8", "trainer.progress=false",
            "trainer.analysis=false", "device=cpu"]
