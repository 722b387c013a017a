"""Image datasets from files: release layouts, splits, errors, transforms and the file-backed
stream's exact resume, on tiny image folders written by the tests."""

import itertools
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from da_runner.config import validate
from da_runner.data import build_pair
from da_runner.data.files import IMAGENET_MEAN, IMAGENET_STD, ImageFileDomain, ImageFiles, image_transform
from da_runner.errors import MissingDataError, UserError
from da_runner.trainer import train
from conftest import crash_and_resume, load_ckpt, make_cfg, run_cli
from test_trainer import scalar_tags
from fake_images import (CLASSES, OFFICE31_SIZES, small_image_folder_run, write_class_folders, write_domainnet,
                         write_image, write_office31, write_office_home, write_visda2017)

SMALL = ["data.image_size=32", "data.resize=36", "data.num_workers=0"]


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    written = {"office31": write_office31(root, rng), "office_home": write_office_home(root, rng),
               "visda2017": write_visda2017(root, rng), "domainnet": write_domainnet(root, rng)}
    return root, written


def pair_of(*overrides):
    return build_pair(make_cfg(*SMALL, *overrides).data)


def files_and_labels(*domains) -> set[tuple[str, int]]:
    return {(str(path), int(label)) for domain in domains for path, label in zip(domain.files, domain.y)}


def as_set(written) -> set[tuple[str, int]]:
    return {(str(path), label) for path, label in written}


@pytest.mark.parametrize("source, target", list(itertools.permutations(OFFICE31_SIZES, 2)))
def test_office31_all_six_tasks(image_root, source, target):
    root, written = image_root
    pair = pair_of("data=office31", f"data.root={root}", f"data.source={source}", f"data.target={target}")
    assert pair.name == f"office31_{source}_{target}" and pair.num_classes == len(CLASSES)
    assert pair.input_shape == (3, 32, 32) and pair.is_image
    # the whole source, labelled by class folder, split into train and a held-out tenth (at least one image)
    assert files_and_labels(pair.source_train, pair.source_val) == as_set(written["office31"][source])
    assert len(pair.source_val) == max(1, round(0.1 * OFFICE31_SIZES[source]))
    # the whole target is both the unlabelled training data and the test set
    assert files_and_labels(pair.target_train) == files_and_labels(pair.target_test) == as_set(written["office31"][target])


def test_source_validation_split_follows_data_seed(image_root):
    root, _ = image_root
    args = ["data=office31", f"data.root={root}", "data.source_val_fraction=0.5"]
    a, b, c = pair_of(*args), pair_of(*args), pair_of(*args, "data.seed=1")
    assert len(a.source_val) == OFFICE31_SIZES["amazon"] // 2
    assert list(a.source_val.files) == list(b.source_val.files) and list(a.source_val.files) != list(c.source_val.files)


def test_office_home_reads_the_release_folder_real_world(image_root):
    root, written = image_root
    pair = pair_of("data=office_home", f"data.root={root}", "data.source=Real_World", "data.target=Art")
    assert files_and_labels(pair.source_train, pair.source_val) == as_set(written["office_home"]["Real World"])
    assert files_and_labels(pair.target_test) == as_set(written["office_home"]["Art"])


def test_visda2017_trains_on_train_and_tests_on_validation(image_root):
    root, written = image_root
    pair = pair_of("data=visda2017", f"data.root={root}")
    assert pair.num_classes == 12
    # labels from image_list.txt, paths relative to each split's folder
    assert files_and_labels(pair.source_train, pair.source_val) == as_set(written["visda2017"]["train"])
    assert files_and_labels(pair.target_train) == files_and_labels(pair.target_test) == \
        as_set(written["visda2017"]["validation"])


def test_domainnet_uses_the_official_split_files(image_root):
    root, written = image_root
    pair = pair_of("data=domainnet", f"data.root={root}", "data.source=clipart", "data.target=real")
    assert pair.num_classes == 345
    assert files_and_labels(pair.source_train, pair.source_val) == as_set(written["domainnet"]["clipart", "train"])
    assert files_and_labels(pair.target_train) == as_set(written["domainnet"]["real", "train"])
    assert files_and_labels(pair.target_test) == as_set(written["domainnet"]["real", "test"])


def test_image_folder_pair_and_class_mismatch(tmp_path):
    rng = np.random.default_rng(0)
    write_class_folders(tmp_path / "src", 6, rng, ext="png")
    target = write_class_folders(tmp_path / "tgt", 3, rng)
    pair = pair_of("data=image_folder", f"data.source_dir={tmp_path / 'src'}", f"data.target_dir={tmp_path / 'tgt'}")
    assert files_and_labels(pair.target_test) == as_set(target) and pair.num_classes == 3

    write_class_folders(tmp_path / "other", 2, rng, classes=["back_pack", "bicycle"])
    with pytest.raises(UserError) as err:
        pair_of("data=image_folder", f"data.source_dir={tmp_path / 'src'}", f"data.target_dir={tmp_path / 'other'}")
    message = str(err.value)
    assert "same class folders" in message
    assert f"only in {tmp_path / 'src'}: bike, calculator" in message and f"only in {tmp_path / 'other'}: bicycle" in message


@pytest.mark.parametrize("overrides, expected", [
    (["data=office31", "data.source=amazon", "data.target=dslr"],
     ["office31/amazon/images", "office31/dslr/images", "domain_adaptation_images.tar.gz"]),
    (["data=office_home", "data.source=Art", "data.target=Real_World"],
     ["office_home/Art", "office_home/Real_World", "OfficeHomeDataset_10072016.zip"]),
    (["data=visda2017"], ["visda2017/train/image_list.txt", "visda2017/validation/image_list.txt", "train.tar"]),
    (["data=domainnet", "data.source=real", "data.target=sketch"],
     ["domainnet/real", "domainnet/real_train.txt", "domainnet/sketch", "domainnet/sketch_train.txt",
      "domainnet/sketch_test.txt", "ai.bu.edu/M3SDA"]),
])
def test_missing_files_are_named_each_with_where_to_get_them(tmp_path, overrides, expected):
    with pytest.raises(MissingDataError) as err:
        pair_of(*overrides, f"data.root={tmp_path}")
    message = str(err.value)
    assert message.startswith(f"dataset files not found under data.root={tmp_path}")
    for path in expected:
        assert path in message


def test_missing_image_folders_are_named(tmp_path):
    with pytest.raises(MissingDataError, match=f"data.target_dir={tmp_path / 'nope'}"):
        pair_of("data=image_folder", f"data.source_dir={tmp_path}", f"data.target_dir={tmp_path / 'nope'}")
    with pytest.raises(UserError, match="needs data.source_dir"):
        pair_of("data=image_folder")


def test_missing_office31_through_the_cli_is_one_clear_message(tmp_path):
    result = run_cli(["data=office31", "data.target=dslr", f"data.root={tmp_path}", "trainer.progress=false"],
                     cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert str(tmp_path / "office31" / "amazon" / "images") in result.stderr
    assert str(tmp_path / "office31" / "dslr" / "images") in result.stderr


@pytest.mark.parametrize("overrides, message", [
    (["data=office31", "data.source=amzon"], "data.source must be one of amazon, dslr, webcam for office31, got 'amzon'"),
    (["data=office_home", "data.target=RealWorld"],
     "data.target must be one of Art, Clipart, Product, Real_World for office_home, got 'RealWorld'"),
    (["data=domainnet", "data.target=photo"],
     "data.target must be one of clipart, infograph, painting, quickdraw, real, sketch for domainnet, got 'photo'"),
    (["data=visda2017", "data.source=test"], "data.source must be one of train, validation for visda2017, got 'test'"),
])
def test_unknown_domain_lists_the_valid_ones(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        pair_of(*overrides, f"data.root={tmp_path}")


@pytest.mark.parametrize("override, message", [
    ("data.image_size=0", "data.image_size must be a positive integer, got 0"),
    ("data.resize=16", "data.resize must be >= data.image_size (the crop is taken from the resized image), got 16 < 224"),
    ("data.num_workers=-1", "data.num_workers must be auto or an integer >= 0, got -1"),
    ("data.num_workers=many", "data.num_workers must be auto or an integer >= 0, got 'many'"),
    ("data.pin_memory=maybe", "data.pin_memory must be true or false, got 'maybe'"),
    ("data.source_val_fraction=1.5", "data.source_val_fraction must be a number in (0, 1), got 1.5"),
])
def test_invalid_image_data_keys_name_key_and_rule(override, message):
    with pytest.raises(UserError) as err:
        validate(make_cfg("data=office31", override))
    assert str(err.value) == message


def one_image_domain(path: Path, **kwargs) -> ImageFileDomain:
    return ImageFileDomain(np.array([str(path)]), torch.tensor([0]), **kwargs)


def test_evaluation_images_are_resized_square_centre_cropped_and_normalised(tmp_path):
    path = tmp_path / "a.png"
    write_image(path, np.random.default_rng(1), size=(40, 30))  # not square
    domain = one_image_domain(path, image_size=16, resize=20)
    raw, _ = next(iter(domain.loader(batch_size=1)))
    # torchvision's Resize on a PIL image is PIL's bilinear resize; the centre 16x16 of 20x20 starts at 2
    resized = np.array(Image.open(path).convert("RGB").resize((20, 20), Image.BILINEAR))
    assert raw.dtype == torch.uint8 and torch.equal(raw[0], torch.from_numpy(resized[2:18, 2:18]).permute(2, 0, 1))
    x, y = next(domain.batches(8))
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert x.dtype == torch.float32 and torch.allclose(x, (raw / 255 - mean) / std) and y.tolist() == [0]
    assert torch.allclose(domain.unnormalize(x), raw / 255, atol=1e-6)


def test_training_crops_and_flips_come_from_the_sample_seed_only(tmp_path):
    path = tmp_path / "a.jpg"
    write_image(path, np.random.default_rng(2))
    dataset = ImageFiles(np.array([str(path)]), np.array([0]), image_transform(16, 36, "weak"), 36)
    global_state = torch.get_rng_state()
    crops = [dataset[0, seed][0] for seed in range(8)]
    assert all(c.shape == (3, 16, 16) and c.dtype == torch.uint8 for c in crops)
    assert len({c.numpy().tobytes() for c in crops}) == 8  # random resized crops differ from seed to seed
    assert torch.equal(dataset[0, 5][0], crops[5])  # and are a function of the seed
    assert torch.equal(torch.get_rng_state(), global_state)  # the training's RNG is not touched
    # a flip is one of the draws: some seed gives the mirror image of another seed's crop parameters,
    # seen on an image that is constant down each column, where only the flip and the crop's width matter
    stripes = np.repeat(np.arange(40, dtype=np.uint8)[None, :, None] * 6, 40, axis=0).repeat(3, axis=2)
    Image.fromarray(stripes).save(tmp_path / "stripes.png")
    full = ImageFiles(np.array([str(tmp_path / "stripes.png")]), np.array([0]), image_transform(16, 40, "weak"), 40)
    rows = [full[0, seed][0][0, 0].int() for seed in range(16)]
    assert any(bool((r[1:] <= r[:-1]).all()) and r[0] > r[-1] for r in rows)  # decreasing left to right: flipped
    assert any(bool((r[1:] >= r[:-1]).all()) and r[0] < r[-1] for r in rows)  # increasing: not flipped


@pytest.fixture(scope="module")
def ten_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ten")
    rng = np.random.default_rng(3)
    paths = []
    for i in range(10):
        paths.append(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
        write_image(paths[-1], rng)
    return ImageFileDomain(np.array([str(p) for p in paths]), torch.arange(10), image_size=16, resize=20)


def draw(stream, n):
    return [next(stream) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (x_a, y_a), (x_b, y_b) in zip(a, b):
        assert torch.equal(y_a, y_b) and torch.equal(x_a, x_b)


def test_file_stream_resumes_exactly_with_workers(ten_images):
    """7 batches straight = 3 batches, the state saved, a new stream loaded, 4 more (batch 4 of 10
    images: 2 batches an epoch, so the run crosses epochs and drops each epoch's tail of 2)."""
    with_workers = replace(ten_images, num_workers=2)
    straight = draw(with_workers.stream(4, seed=7), 7)
    epochs = [torch.cat([y for _, y in straight[i:i + 2]]) for i in (0, 2)]
    assert all(len(set(e.tolist())) == 8 for e in epochs) and not torch.equal(epochs[0], epochs[1])

    first = with_workers.stream(4, seed=7)
    head = draw(first, 3)
    state = first.state_dict()
    resumed = with_workers.stream(4, seed=123)  # the seed travels in the state
    resumed.load_state_dict(state)
    assert_same_batches(straight, head + draw(resumed, 4))

    # loading into a stream whose workers already read ahead (persistent workers, restarted sampler)
    busy = with_workers.stream(4, seed=0)
    draw(busy, 2)
    busy.load_state_dict(state)
    assert_same_batches(straight[3:], draw(busy, 4))

    # the same images with the same crops whether workers decode them or the main process does
    assert_same_batches(straight, draw(replace(ten_images, num_workers=0).stream(4, seed=7), 7))
    # the same image in another epoch gets another crop
    x = torch.cat([b[0] for b in straight[:4]])
    y = torch.cat([b[1] for b in straight[:4]])
    index = y[:8].tolist()
    other_epoch = {label: x[8 + i] for i, label in enumerate(y[8:].tolist())}
    shared = [i for i, label in enumerate(index) if label in other_epoch]
    assert not all(torch.equal(x[i], other_epoch[index[i]]) for i in shared)


def test_file_stream_views_are_the_same_images_each_with_its_own_draws(ten_images):
    """next_views on image files: the first view is the plain stream's batch, the others the same
    images drawn again; the views resume exactly from a saved state, with or without workers."""
    plain = draw(ten_images.stream(4, seed=7), 3)
    stream = replace(ten_images, num_workers=2).stream(4, seed=7)
    views = [stream.next_views(("weak", "strong", "weak")) for _ in range(3)]
    for (x, y), ((weak, strong, weak_again), labels) in zip(plain, views):
        assert torch.equal(labels, y) and torch.equal(weak, x)
        assert strong.shape == weak.shape == weak_again.shape and not torch.equal(strong, weak)
        assert not torch.equal(weak_again, weak)  # another draw at the same level
    state = stream.state_dict()
    after = [stream.next_views(("weak", "strong", "weak")) for _ in range(2)]
    resumed = ten_images.stream(4, seed=0)
    resumed.load_state_dict(state)
    again = [resumed.next_views(("weak", "strong", "weak")) for _ in range(2)]
    for (views_a, y_a), (views_b, y_b) in zip(after, again):
        assert torch.equal(y_a, y_b) and all(torch.equal(a, b) for a, b in zip(views_a, views_b))


def test_fixmatch_trains_on_image_files(tmp_path):
    args = small_image_folder_run(tmp_path, 5, 12, 9)
    metrics = train(make_cfg(*args, "data.num_workers=0", "method=fixmatch", "method.fixmatch_threshold=0.01",
                             "trainer.max_steps=3", "trainer.eval_every=3", "trainer.log_every=1"), tmp_path / "run")
    events = scalar_tags(tmp_path / "run")
    assert metrics["step"] == 3
    # every target sample pseudo-labelled from its weak view and trained on its strong one
    assert [e.value for e in events.Scalars("train/fixmatch_mask")] == [1.0] * 3
    assert all(e.value > 0 for e in events.Scalars("train/loss_fixmatch"))


def test_training_on_image_files_resumes_like_an_uninterrupted_run(tmp_path, monkeypatch):
    args = [*small_image_folder_run(tmp_path, 4, 12, 9), "data.num_workers=2", "method=dann",
            "trainer.max_steps=6", "trainer.eval_every=3", "trainer.ckpt_every=3", "trainer.log_every=1"]
    reference = train(make_cfg(*args), tmp_path / "ref")
    resumed = crash_and_resume(monkeypatch, "dann", 4, args, tmp_path / "run")

    assert resumed["target_acc"] == reference["target_acc"] and resumed["step"] == 6
    ref_modules = load_ckpt(tmp_path / "ref" / "checkpoints" / "last.pt")["method"]["modules"]
    new_modules = load_ckpt(tmp_path / "run" / "checkpoints" / "last.pt")["method"]["modules"]
    assert all(torch.equal(v, new_modules[k]) for k, v in ref_modules.items())
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == (tmp_path / "ref" / "metrics.jsonl").read_text()


REAL_ROOT = os.environ.get("DA_DATA_ROOT")


@pytest.mark.slow
@pytest.mark.skipif(not REAL_ROOT or not (Path(REAL_ROOT) / "office31").is_dir(),
                    reason="set DA_DATA_ROOT to a folder with the real datasets (office31/)")
def test_real_office31_amazon_to_webcam():
    pair = build_pair(make_cfg("data=office31", f"data.root={REAL_ROOT}", "data.num_workers=2").data)
    assert pair.num_classes == 31 and pair.input_shape == (3, 224, 224)
    assert len(pair.source_train) + len(pair.source_val) == 2817 and len(pair.source_val) == 282
    assert len(pair.target_train) == len(pair.target_test) == 795
    x, y = next(pair.source_train.stream(32, seed=1))
    assert x.shape == (32, 3, 224, 224) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert -2.2 < x.min() < -1.5 and 2.0 < x.max() < 2.7  # ImageNet-normalised photos span about [-2.1, 2.6]
    assert 0 <= y.min() and y.max() < 31
    x_t, y_t = next(pair.target_test.batches(64))
    assert x_t.shape == (64, 3, 224, 224) and len(y_t) == 64


@pytest.mark.parametrize("experiment", ["dann_resnet18_office31", "cdan_e_resnet50_office31"])
def test_the_image_recipes_train_on_office31_files(image_root, tmp_path, experiment):
    # The real-image recipes end to end (from random weights: no download), on tiny Office-31 folders.
    root, _ = image_root
    result = train(make_cfg(f"experiment={experiment}", f"data.root={root}", *SMALL, "backbone.pretrained=false",
                            "trainer.batch_size=4", "trainer.max_steps=2", "trainer.eval_every=2",
                            "trainer.ckpt_every=2", "trainer.eval_batch_size=16", "trainer.validation_samples=8",
                            "trainer.progress=false", "trainer.analysis=false", "device=cpu"), tmp_path)
    assert result["step"] == 2 and 0.0 <= result["target_acc"] <= 1.0
    assert (tmp_path / "checkpoints" / "last.pt").is_file()
