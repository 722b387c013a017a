"""GTA5 -> Cityscapes from files: the label-id -> train-id map, the release layouts, the missing-data
message, joint image / label transforms, exact resume, on tiny 64x32 PNGs written by the tests."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from da_runner.config import validate
from da_runner.data import build_pair
from da_runner.data.cityscapes import (CLASS_NAMES, TRAIN_IDS, SegmentationFileDomain, SegmentationFiles,
                                       read_label_map, segmentation_transform)
from da_runner.errors import MissingDataError, UserError
from da_runner.tasks import IGNORE_INDEX
from conftest import make_cfg

W, H = 64, 32
GTA5_NAMES = [f"{i:05d}.png" for i in range(1, 6)]
CITYSCAPES = {  # split -> city -> frame names
    "train": {"aachen": ["aachen_000000_000019", "aachen_000001_000019"], "bochum": ["bochum_000000_000313"]},
    "val": {"frankfurt": ["frankfurt_000000_000294"], "lindau": ["lindau_000000_000019", "lindau_000001_000019"]},
}
# A label-id map of four quadrants, each a class of the benchmark, and the colour of each quadrant.
QUADRANT_IDS = ((7, 8), (11, 26))  # road, sidewalk / building, car -> train ids 0, 1 / 2, 13
QUADRANT_COLOURS = (((255, 0, 0), (0, 255, 0)), ((0, 0, 255), (255, 255, 255)))


def quadrants(values, width=W, height=H) -> np.ndarray:
    """(height, width, ...) array whose four quadrants hold values[row][col]."""
    out = np.empty((height, width, *np.shape(values[0][0])), dtype=np.uint8)
    for r in range(2):
        for c in range(2):
            out[r * height // 2:(r + 1) * height // 2, c * width // 2:(c + 1) * width // 2] = values[r][c]
    return out


def write_pair(image_path: Path, label_path: Path, palette: bool = False) -> None:
    """The quadrant image and its label-id map; GTA5's maps are palette PNGs, Cityscapes' grey."""
    for path in (image_path, label_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(quadrants(QUADRANT_COLOURS)).save(image_path)
    label = Image.fromarray(quadrants(QUADRANT_IDS))
    if palette:
        label = label.convert("P")
        label.putpalette(list(np.random.default_rng(0).integers(0, 256, 768)))
        label.putdata(quadrants(QUADRANT_IDS).ravel().tolist())  # the indices are the ids, whatever the colours
    label.save(label_path)


def write_release(root: Path) -> dict[str, list[tuple[Path, Path]]]:
    written = {"gta5": [], "train": [], "val": []}
    for name in GTA5_NAMES:
        pair = (root / "gta5" / "images" / name, root / "gta5" / "labels" / name)
        write_pair(*pair, palette=True)
        written["gta5"].append(pair)
    for split, cities in CITYSCAPES.items():
        for city, frames in cities.items():
            for frame in frames:
                pair = (root / "cityscapes" / "leftImg8bit" / split / city / f"{frame}_leftImg8bit.png",
                        root / "cityscapes" / "gtFine" / split / city / f"{frame}_gtFine_labelIds.png")
                write_pair(*pair)
                # the release's other label files sit beside the ids and are not read
                Image.fromarray(quadrants(QUADRANT_COLOURS)).save(str(pair[1]).replace("labelIds", "color"))
                written[split].append(pair)
    return written


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("gta5_cityscapes")
    return root, write_release(root)


SMALL = ["data=gta5_cityscapes", f"data.source_size=[{W},{H}]", f"data.target_size=[{W},{H}]", "data.num_workers=0"]


def pair_of(root, *overrides):
    return build_pair(make_cfg(*SMALL, f"data.root={root}", *overrides).data)


def pairs_of(domain) -> set[tuple[str, str]]:
    return set(zip(domain.files.tolist(), domain.label_files.tolist()))


def as_strings(written) -> set[tuple[str, str]]:
    return {(str(image), str(label)) for image, label in written}


def test_label_ids_map_to_the_19_train_ids(tmp_path):
    assert len(CLASS_NAMES) == 19 and CLASS_NAMES[0] == "road" and CLASS_NAMES[-1] == "bicycle"
    assert TRAIN_IDS.dtype == np.uint8 and TRAIN_IDS.shape == (256,)
    label_ids = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]  # cityscapesScripts
    assert TRAIN_IDS[label_ids].tolist() == list(range(19))
    # every other id is ignored: void, parking, guard rail, caravan, ... and ids no release uses
    assert (np.delete(TRAIN_IDS, label_ids) == IGNORE_INDEX).all()
    ids = np.array([[7, 26], [0, 33]], dtype=np.uint8)
    Image.fromarray(ids).save(tmp_path / "grey.png")  # Cityscapes: 8-bit grey
    palette = Image.fromarray(ids).convert("P")
    palette.putpalette([255 - i % 256 for i in range(768)])
    palette.putdata(ids.ravel().tolist())
    palette.save(tmp_path / "palette.png")  # GTA5: palette indices
    for name in ("grey.png", "palette.png"):
        train_ids = read_label_map(tmp_path / name)
        assert train_ids.dtype == np.uint8 and train_ids.tolist() == [[0, 13], [255, 18]]
    Image.fromarray(np.zeros((2, 2, 3), dtype=np.uint8)).save(tmp_path / "color.png")
    with pytest.raises(UserError, match="label-id map"):
        read_label_map(tmp_path / "color.png")


def test_release_layouts_give_the_four_splits(release):
    root, written = release
    pair = pair_of(root, "data.source_val_fraction=0.2")
    assert pair.name == "gta5_cityscapes" and pair.num_classes == 19 and pair.is_image
    assert pair.label_space.setting == "closed" and pair.label_space.class_names == CLASS_NAMES
    # every GTA5 frame with the label map of the same name; one of the five held out
    assert pairs_of(pair.source_train) | pairs_of(pair.source_val) == as_strings(written["gta5"])
    assert (len(pair.source_train), len(pair.source_val)) == (4, 1)
    # Cityscapes train (both cities) and val, each image with its *_gtFine_labelIds.png
    assert pairs_of(pair.target_train) == as_strings(written["train"]) and len(pair.target_train) == 3
    test_pairs = list(zip(pair.target_test.files, pair.target_test.label_files))
    assert test_pairs == [tuple(map(str, p)) for p in written["val"]]  # in order
    # subsets and the validation split follow data.seed
    small = pair_of(root, "data.source_subset=3", "data.target_subset=2")
    assert (len(small.source_train) + len(small.source_val), len(small.target_train)) == (3, 2)
    other = pair_of(root, "data.source_subset=3", "data.seed=1")
    again = pair_of(root, "data.source_subset=3")
    assert list(again.source_train.files) == list(small.source_train.files) != list(other.source_train.files)


def test_missing_folders_are_named_with_where_the_data_comes_from(tmp_path, release):
    with pytest.raises(MissingDataError) as err:
        pair_of(tmp_path)
    message = str(err.value)
    assert message.startswith(f"dataset files not found under data.root={tmp_path}")
    for expected in ("gta5/images", "gta5/labels", "cityscapes/leftImg8bit/train", "cityscapes/gtFine/val",
                     "download.visinf.tu-darmstadt.de/data/from_games/", "www.cityscapes-dataset.com"):
        assert expected in message
    # GTA5 present, Cityscapes not: only Cityscapes is named
    root, _ = release
    (tmp_path / "gta5").symlink_to(root / "gta5")
    with pytest.raises(MissingDataError) as err:
        pair_of(tmp_path)
    assert "cityscapes/leftImg8bit/val" in str(err.value) and "gta5/" not in str(err.value)
    # an image without its label map
    lonely = tmp_path / "lonely"
    write_pair(lonely / "gta5" / "images" / "a.png", lonely / "elsewhere.png")
    (lonely / "gta5" / "labels").mkdir()
    (lonely / "cityscapes").symlink_to(root / "cityscapes")
    with pytest.raises(MissingDataError, match="1 of the 1 images in .* have no label map"):
        pair_of(lonely)


def test_bad_sizes_and_crops_name_the_key(release):
    root, _ = release
    with pytest.raises(UserError, match=r"data.source_size must be \[width, height\]"):
        pair_of(root, "data.source_size=[64]")
    with pytest.raises(UserError, match="data.crop=.* must fit in both"):
        pair_of(root, "data.crop=[128,16]")


def test_joint_transforms_keep_image_and_labels_aligned(release):
    root, written = release
    image, label = written["gta5"][0]
    dataset = SegmentationFiles(np.array([str(image)]), np.array([str(label)]),
                                segmentation_transform((W, H), crop=(40, 20), augment="weak"))
    global_state = torch.get_rng_state()
    flipped = set()
    for seed in range(12):
        x, y = dataset[0, seed]
        assert x.shape == (3, 20, 40) and x.dtype == torch.uint8 and y.shape == (20, 40) and y.dtype == torch.uint8
        # each pixel's colour and train id are those of the same quadrant of the source image
        for (colour_row, id_row) in zip(QUADRANT_COLOURS, QUADRANT_IDS):
            for colour, label_id in zip(colour_row, id_row):
                at = (x.permute(1, 2, 0) == torch.tensor(colour, dtype=torch.uint8)).all(-1)
                train_id = int(TRAIN_IDS[label_id])
                assert at.any() and (y[at] == train_id).all() and (y == train_id).sum() == at.sum()
        flipped.add(bool((x[:, 0, 0] == torch.tensor([0, 255, 0], dtype=torch.uint8)).all()))  # green top left
        assert torch.equal(dataset[0, seed][0], x)  # a function of the seed
    assert flipped == {True, False}  # some seeds flip, some do not: image and labels together
    assert torch.equal(torch.get_rng_state(), global_state)  # the training's RNG is not touched

    # evaluation: the resize of the domain, labels resized with nearest neighbours (only train ids, no blends)
    x, y = SegmentationFiles(np.array([str(image)]), np.array([str(label)]), segmentation_transform((32, 24)))[0]
    assert x.shape == (3, 24, 32) and y.shape == (24, 32)
    assert set(y.unique().tolist()) == {0, 1, 2, 13} and y[0, 0] == 0 and y[-1, -1] == 13


def test_batches_are_normalised_images_and_int64_label_maps(release):
    root, _ = release
    pair = pair_of(root)
    assert pair.input_shape == (3, H, W) and pair.target_test.input_shape == (3, H, W)
    batches = list(pair.target_test.batches(2))
    assert [len(y) for _, y in batches] == [2, 1]
    x, y = batches[0]
    assert x.dtype == torch.float32 and x.shape == (2, 3, H, W)
    assert y.dtype == torch.int64 and y.shape == (2, H, W) and set(y.unique().tolist()) == {0, 1, 2, 13}
    assert torch.allclose(pair.target_test.unnormalize(x)[0, :, 0, 0], torch.tensor([1.0, 0.0, 0.0]), atol=1e-6)
    x_s, y_s = next(pair.source_train.stream(2, seed=0))
    assert x_s.shape == (2, 3, H, W) and y_s.dtype == torch.int64 and y_s.shape == (2, H, W)
    assert len(pair.source_train.sample(2, seed=0)) == 2
    with pytest.raises(UserError, match="data.augment=strong is not available"):
        pair.source_train.stream(2, seed=0, augment="strong")


def test_stream_resumes_with_the_same_crops_and_flips(release):
    root, _ = release
    domain = pair_of(root, "data.crop=[40,20]").source_train
    assert isinstance(domain, SegmentationFileDomain)

    def draw(stream, n):  # each batch with the frames it holds
        return [(*next(stream), stream.last_index) for _ in range(n)]

    straight = draw(domain.stream(2, seed=5, augment="weak"), 5)  # 4 frames, 2 batches an epoch: crosses epochs
    first = domain.stream(2, seed=5, augment="weak")
    head = draw(first, 2)
    resumed = domain.stream(2, seed=99, augment="weak")  # the seed travels in the state
    resumed.load_state_dict(first.state_dict())
    for (x_a, y_a, i_a), (x_b, y_b, i_b) in zip(straight, head + draw(resumed, 3), strict=True):
        assert x_a.shape == (2, 3, 20, 40) and torch.equal(i_a, i_b) and torch.equal(x_a, x_b) and torch.equal(y_a, y_b)
    # the crops and flips are drawn: the frames (all the same picture here) never look the same twice
    assert len({x.numpy().tobytes() for x, _, _ in straight}) == 5


def test_the_data_config_composes_validates_and_builds(release):
    root, _ = release
    cfg = make_cfg(*SMALL, f"data.root={root}", "trainer.batch_size=1")
    validate(cfg)
    assert cfg.data.task == "segmentation" and cfg.data.augment == "none" and cfg.data.crop is None
    defaults = make_cfg("data=gta5_cityscapes").data
    assert list(defaults.source_size) == [1280, 720] and list(defaults.target_size) == [1024, 512]
    pair = build_pair(cfg.data)
    assert len(pair.target_test) == 3 and pair.num_classes == 19
    x_t, y_t = next(pair.target_train.stream(1, seed=0, augment=cfg.data.augment))
    assert x_t.shape == (1, 3, H, W) and y_t.shape == (1, H, W)
