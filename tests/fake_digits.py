"""Tiny files in the real formats of the digit datasets, written by the tests themselves."""

import bz2
import io
import struct
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

SIZES = {"train": 40, "test": 20}


def _digits(rng, n, size):
    return rng.integers(0, 256, size=(n, size, size), dtype=np.uint8), rng.integers(0, 10, size=n)


def write_mnist(root: Path, rng) -> dict:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    data = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x, y = _digits(rng, SIZES[split], 28)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, len(x), 28, 28) + x.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, len(y)) + y.astype(np.uint8).tobytes())
        data[split] = (x, y)
    return data


def write_usps(root: Path, rng) -> dict:
    (root / "usps").mkdir(parents=True)
    data = {}
    for split, name in (("train", "usps.bz2"), ("test", "usps.t.bz2")):
        # libsvm lines: label in 1..10, then 256 index:value pairs with values in [-1, 1]
        x = rng.uniform(-1, 1, size=(SIZES[split], 256))
        y = rng.integers(0, 10, size=SIZES[split])
        lines = [f"{label + 1} " + " ".join(f"{i + 1}:{v:.6f}" for i, v in enumerate(row)) for row, label in zip(x, y)]
        (root / "usps" / name).write_bytes(bz2.compress(("\n".join(lines) + "\n").encode()))
        data[split] = (((x + 1) / 2 * 255).astype(np.float32).astype(np.uint8).reshape(-1, 16, 16), y)
    return data


def write_svhn(root: Path, rng) -> dict:
    from scipy.io import savemat

    (root / "svhn").mkdir(parents=True)
    data = {}
    for split in ("train", "test"):
        x = rng.integers(0, 256, size=(32, 32, 3, SIZES[split]), dtype=np.uint8)  # SVHN's (H, W, C, N)
        y = rng.integers(0, 10, size=SIZES[split])
        savemat(root / "svhn" / f"{split}_32x32.mat", {"X": x, "y": np.where(y == 0, 10, y)[:, None]})
        data[split] = (x.transpose(3, 2, 0, 1), y)  # torchvision's (N, C, H, W) of the same array
    return data


def write_mnistm_tarball(root: Path, rng) -> dict:
    (root / "mnist_m").mkdir(parents=True)
    data = {}
    with tarfile.open(root / "mnist_m" / "mnist_m.tar.gz", "w:gz") as tar:
        def add(name, payload: bytes):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

        for split in ("train", "test"):
            x = rng.integers(0, 256, size=(SIZES[split], 32, 32, 3), dtype=np.uint8)
            y = rng.integers(0, 10, size=SIZES[split])
            order = rng.permutation(SIZES[split])  # the release's tar order is not the label order
            for i in order:
                buf = io.BytesIO()
                Image.fromarray(x[i]).save(buf, format="PNG")
                add(f"mnist_m/mnist_m_{split}/{i:08d}.png", buf.getvalue())
            add(f"mnist_m/mnist_m_{split}_labels.txt", "".join(f"{i:08d}.png {y[i]}\n" for i in range(len(y))).encode())
            data[split] = (x.transpose(0, 3, 1, 2), y)
    return data


def write_bsds(folder: Path, rng, n: int = 3) -> Path:
    images = folder / "images" / "train"
    images.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, size=(50, 70, 3), dtype=np.uint8)).save(images / f"{i}.jpg")
    return folder


def write_all(root: Path, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"mnist": write_mnist(root, rng), "usps": write_usps(root, rng), "svhn": write_svhn(root, rng),
            "mnistm": write_mnistm_tarball(root, rng)}
