"""data.augment: the device-side augmentation of in-memory images (shapes, ranges, the operations
against hand computations, determinism per seed, exact resume) and the file-backed transforms."""

import numpy as np
import pytest
import torch
from PIL import Image

from da_runner.data import InMemoryDomain
from da_runner.data.augment import (COLOR_OPERATIONS, LEVELS, Inversion, affine_matrices, apply_affine, augment,
                                    batch_seed, cutout)
from da_runner.data.files import ImageFiles, image_transform
from da_runner.errors import UserError
from da_runner.trainer import train
from conftest import TINY_DIGITS, TINY_TOY, crash_and_resume, load_ckpt, make_cfg


def images(n=16, channels=3, size=28, seed=0):
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("channels", [1, 3])
def test_every_level_keeps_shape_and_range_and_is_a_function_of_the_seed(level, channels):
    x = images(channels=channels)
    out = augment(x.clone(), level, seed=7)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, augment(x.clone(), level, seed=7))
    if level == "none":
        assert torch.equal(out, x)
    else:
        assert not torch.equal(out, x) and not torch.equal(out, augment(x.clone(), level, seed=8))


def test_an_integer_shift_moves_the_image_by_whole_pixels():
    x = torch.zeros(1, 1, 28, 28)
    x[0, 0, 10, 12] = 1.0
    # shift = (2/28, -3/28) of the size: output pixel p reads input p + shift, so the dot moves by -shift
    out = apply_affine(x, affine_matrices(1, shift=torch.tensor([[2 / 28, -3 / 28]])))
    assert out[0, 0].argmax().item() == (10 + 3) * 28 + (12 - 2)
    assert out.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_a_quarter_turn_rotates_the_image():
    x = images(1, 1, size=8)
    out = apply_affine(x, affine_matrices(1, shift=torch.zeros(1, 2), angle_deg=torch.tensor([90.0])))
    assert torch.allclose(out, torch.rot90(x, k=1, dims=(2, 3)), atol=1e-5) or \
        torch.allclose(out, torch.rot90(x, k=-1, dims=(2, 3)), atol=1e-5)


def test_weak_is_a_translation_within_an_eighth_of_the_size():
    x = torch.zeros(64, 1, 32, 32)
    x[:, 0, 16, 16] = 1.0
    out = augment(x, "weak", seed=3)
    rows, cols = out[:, 0].flatten(1).argmax(1) // 32, out[:, 0].flatten(1).argmax(1) % 32
    assert ((rows - 16).abs() <= 4).all() and ((cols - 16).abs() <= 4).all()
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 10  # the shifts differ from sample to sample


def test_colour_operations_against_hand_computations():
    x = torch.tensor([0.1, 0.4, 0.6, 0.9]).view(1, 1, 2, 2)
    one = torch.ones(1)
    # solarize at magnitude 0.5: values above the threshold 0.5 are inverted
    assert torch.allclose(COLOR_OPERATIONS["solarize"](x, 0.5 * one, one), torch.tensor([0.1, 0.4, 0.4, 0.1]).view(1, 1, 2, 2))
    assert torch.equal(COLOR_OPERATIONS["solarize"](x, 0 * one, one), x)  # magnitude 0 inverts nothing
    # brightness: blend with black, factor 0.5 halves
    assert torch.allclose(COLOR_OPERATIONS["brightness"](x, one, 0.5 * one), x / 2)
    # contrast: blend with the mean grey (0.5 here), factor 2 doubles the distance, clipped to [0, 1]
    expected = (0.5 + 2 * (x - 0.5)).clamp(0, 1)
    assert torch.allclose(COLOR_OPERATIONS["contrast"](x, one, 2 * one), expected)
    # autocontrast stretches [0.1, 0.9] to [0, 1]
    assert torch.allclose(COLOR_OPERATIONS["autocontrast"](x, one, one), (x - 0.1) / 0.8)
    # posterize at magnitude 1 keeps 4 bits: multiples of 16 / 255
    levels = COLOR_OPERATIONS["posterize"](x, one, one) * 255
    assert torch.allclose(levels, torch.tensor([16.0, 96.0, 144.0, 224.0]).view(1, 1, 2, 2))
    # colour on a grey image changes nothing (it is its own luma)
    grey = images(2, 1).expand(-1, 3, -1, -1).contiguous()
    assert torch.allclose(COLOR_OPERATIONS["color"](grey, one.repeat(2), 0.2 * one.repeat(2)), grey, atol=1e-6)


def test_cutout_paints_a_grey_square_of_the_drawn_side():
    x = torch.zeros(1, 3, 20, 20)
    out = cutout(x, center=torch.tensor([[0.5, 0.5]]), side=torch.tensor([0.4]))
    painted = out[0, 0] == 0.5
    assert painted.sum().item() == 8 * 8 and painted[6:14, 6:14].all()


def test_batch_seeds_differ_by_stream_epoch_and_position():
    seeds = {batch_seed(s, e, p) for s in (1, 2) for e in (1, 2) for p in (0, 64)}
    assert len(seeds) == 8 and batch_seed(1, 1, 0) == batch_seed(1, 1, 0)


def test_an_augmented_stream_resumes_exactly():
    domain = InMemoryDomain((images(40) * 255).to(torch.uint8), torch.arange(40))
    stream = domain.stream(8, seed=5, augment="strong")
    for _ in range(3):
        next(stream)
    state = stream.state_dict()
    ahead = [next(stream) for _ in range(7)]  # crosses an epoch
    other = domain.stream(8, seed=5, augment="strong")
    other.load_state_dict(state)
    for (x_a, y_a), (x_b, y_b) in zip(ahead, [next(other) for _ in range(7)]):
        assert torch.equal(x_a, x_b) and torch.equal(y_a, y_b)
    plain = domain.stream(8, seed=5)
    x_plain, y_plain = next(plain)
    x_aug, y_aug = next(domain.stream(8, seed=5, augment="weak"))
    assert torch.equal(y_plain, y_aug) and not torch.equal(x_plain, x_aug)  # same samples, augmented


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_same_draws_on_cpu_and_gpu():
    x = images(32)
    for level in ("weak", "strong"):
        assert torch.allclose(augment(x.clone(), level, 11), augment(x.cuda(), level, 11).cpu(), atol=1e-4)


def test_feature_data_refuses_augmentation(tmp_path):
    with pytest.raises(UserError, match="data.augment=weak needs images"):
        train(make_cfg(*TINY_TOY, "trainer.max_steps=2", "data.augment=weak"), tmp_path)


def test_an_unknown_level_names_key_and_choices(tmp_path):
    with pytest.raises(UserError, match="data.augment must be one of none, weak, strong, got 'heavy'"):
        train(make_cfg(*TINY_DIGITS, "trainer.max_steps=2", "data.augment=heavy"), tmp_path)


def test_augmentation_changes_training_and_a_run_resumes_exactly(tmp_path, monkeypatch):
    args = [*TINY_DIGITS, "method=dann", "trainer.max_steps=10", "trainer.eval_every=5", "trainer.ckpt_every=4"]
    plain = train(make_cfg(*args), tmp_path / "plain")
    reference = train(make_cfg(*args, "data.augment=strong"), tmp_path / "ref")
    w_plain = load_ckpt(tmp_path / "plain" / "checkpoints" / "last.pt")["method"]["modules"]
    w_ref = load_ckpt(tmp_path / "ref" / "checkpoints" / "last.pt")["method"]["modules"]
    assert any(not torch.equal(w_plain[k], w_ref[k]) for k in w_plain)
    assert plain["step"] == reference["step"] == 10

    resumed = crash_and_resume(monkeypatch, "dann", 6, [*args, "data.augment=strong"], tmp_path / "run")
    w_run = load_ckpt(tmp_path / "run" / "checkpoints" / "last.pt")["method"]["modules"]
    assert all(torch.equal(w_ref[k], w_run[k]) for k in w_ref)
    assert resumed["target_acc"] == reference["target_acc"]


def test_file_transforms_by_level(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
    def draws(level):
        dataset = ImageFiles(np.array([str(path)]), np.array([0]), image_transform(16, 20, level), 20)
        return [dataset[0, seed][0] for seed in range(6)]
    none, weak, strong = draws("none"), draws("weak"), draws("strong")
    evaluation = ImageFiles(np.array([str(path)]), np.array([0]), image_transform(16, 20), 20)[0][0]
    assert all(torch.equal(x, evaluation) for x in none)  # none: the evaluation's centre crop
    assert len({x.numpy().tobytes() for x in weak}) == 6
    assert all(not torch.equal(w, s) for w, s in zip(weak, strong))  # RandAugment on top of the same crops


def test_invert_flips_each_image_with_its_probability_and_leaves_other_draws_alone():
    x = images(400)
    assert torch.equal(augment(x.clone(), "none", seed=3, invert=Inversion(1.0)), 1 - x)
    out = augment(x.clone(), "none", seed=3, invert=Inversion(0.5))
    inverted = [torch.allclose(o, 1 - i) for o, i in zip(out, x)]
    kept = [torch.equal(o, i) for o, i in zip(out, x)]
    assert all(a != b for a, b in zip(inverted, kept))  # each image is either inverted or untouched
    assert 160 < sum(inverted) < 240  # about half of 400
    assert torch.equal(out, augment(x.clone(), "none", seed=3, invert=Inversion(0.5)))
    # The inversion draws after the level's operations: with invert 0 a seed augments as before, and
    # with invert 1 it gives the same augmentation, inverted.
    for level in ("weak", "strong"):
        plain = augment(x.clone(), level, seed=9)
        assert torch.equal(augment(x.clone(), level, seed=9, invert=Inversion(0.0)), plain)
        assert torch.allclose(augment(x.clone(), level, seed=9, invert=Inversion(1.0)), 1 - plain)


def test_an_inverting_stream_inverts_its_views_and_resumes_exactly():
    domain = InMemoryDomain((images(40) * 255).to(torch.uint8), torch.arange(40))
    x_plain, _ = next(domain.stream(8, seed=5))
    x_inv, _ = next(domain.stream(8, seed=5, invert=Inversion(1.0)))
    assert torch.allclose(domain.unnormalize(x_inv), 1 - domain.unnormalize(x_plain), atol=1e-6)
    stream = domain.stream(8, seed=5, augment="weak", invert=Inversion(0.5))
    next(stream)
    state = stream.state_dict()
    ahead = [stream.next_views(("weak", "strong"))[0] for _ in range(6)]
    other = domain.stream(8, seed=5, augment="weak", invert=Inversion(0.5))
    other.load_state_dict(state)
    for views_a in ahead:
        views_b = other.next_views(("weak", "strong"))[0]
        assert all(torch.equal(a, b) for a, b in zip(views_a, views_b))
    with pytest.raises(UserError, match="data.invert=0.5 needs images"):
        InMemoryDomain(torch.rand(10, 4), torch.arange(10)).stream(2, seed=0, invert=Inversion(0.5))


def test_invert_changes_training_and_is_checked(tmp_path):
    args = [*TINY_DIGITS, "trainer.max_steps=4", "trainer.eval_every=4"]
    train(make_cfg(*args), tmp_path / "plain")
    train(make_cfg(*args, "data.invert=0.5"), tmp_path / "inverted")
    w_plain = load_ckpt(tmp_path / "plain" / "checkpoints" / "last.pt")["method"]["modules"]
    w_inv = load_ckpt(tmp_path / "inverted" / "checkpoints" / "last.pt")["method"]["modules"]
    assert any(not torch.equal(w_plain[k], w_inv[k]) for k in w_plain)
    with pytest.raises(UserError, match="data.invert"):
        train(make_cfg(*args, "data.invert=1.5"), tmp_path / "bad")


def test_file_transform_inverts_training_images_only(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
    def sample(level, invert, seed=1, per_channel=False):
        transform = image_transform(16, 20, level, Inversion(invert, per_channel))
        return ImageFiles(np.array([str(path)]), np.array([0]), transform, 20)[0, seed][0]
    assert torch.equal(sample("none", 1.0), 255 - sample("none", 0.0))
    assert torch.equal(sample("weak", 1.0), 255 - sample("weak", 0.0))  # the same crop, inverted
    halves = [torch.equal(sample("none", 0.5, seed), sample("none", 0.0)) for seed in range(40)]
    assert 5 < sum(halves) < 35
    # Per channel: each channel is either the plain one or its inverse, and they do not all agree.
    plain = sample("none", 0.0)
    mixed = 0
    for seed in range(20):
        x = sample("none", 0.5, seed, per_channel=True)
        flags = [torch.equal(x[c], 255 - plain[c]) for c in range(3)]
        assert all(flag or torch.equal(x[c], plain[c]) for c, flag in enumerate(flags))
        mixed += len(set(flags)) == 2
    assert mixed > 5


def test_per_channel_inversion_draws_each_channel():
    x = images(200)
    out = augment(x.clone(), "none", seed=4, invert=Inversion(0.5, per_channel=True))
    flags = torch.tensor([[torch.allclose(out[i, c], 1 - x[i, c]) for c in range(3)] for i in range(200)])
    kept = torch.tensor([[torch.equal(out[i, c], x[i, c]) for c in range(3)] for i in range(200)])
    assert (flags ^ kept).all()  # every channel is inverted or left as it was
    mixed = flags.any(1) & ~flags.all(1)
    assert 100 < int(mixed.sum()) < 200  # 3/4 of the images expected mixed
    assert torch.equal(augment(x.clone(), "none", seed=4, invert=Inversion(1.0, per_channel=True)), 1 - x)
