"""FixMatch: its loss against a hand computation, the strong target view the trainer hands it, and
the add-on on DANN / CDAN."""

import math

import pytest
import torch
import torch.nn.functional as F

from da_runner.data import InMemoryDomain
from da_runner.errors import UserError
from da_runner.methods import METHODS
from da_runner.nn.losses import fixmatch_loss
from da_runner.trainer import train
from conftest import TINY_DIGITS, TINY_TOY, make_cfg
from test_trainer import scalar_tags


def test_fixmatch_loss_against_a_hand_computation():
    # sample 0: weak view confident in class 2 (p = 0.97 >= 0.95); sample 1: unsure (p = 0.6): masked
    logits_weak = torch.log(torch.tensor([[0.01, 0.02, 0.97], [0.6, 0.3, 0.1]]))
    logits_strong = torch.tensor([[0.5, 0.2, 1.0], [3.0, -1.0, 0.0]], requires_grad=True)
    loss, kept = fixmatch_loss(logits_weak, logits_strong, threshold=0.95)
    by_hand = -torch.log_softmax(logits_strong[0].detach(), dim=0)[2] / 2  # the masked sample counts 0 in the mean
    assert loss.item() == pytest.approx(by_hand.item()) and kept.item() == 0.5
    loss.backward()
    assert logits_strong.grad[1].abs().sum() == 0  # no gradient from the masked sample
    expected = (F.softmax(logits_strong[0].detach(), 0) - torch.tensor([0.0, 0.0, 1.0])) / 2
    assert torch.allclose(logits_strong.grad[0], expected)


def test_adamatch_distribution_alignment_and_relative_threshold_by_hand():
    p_t = torch.tensor([[0.70, 0.20, 0.10], [0.80, 0.15, 0.05], [0.50, 0.10, 0.40]])
    q_s = torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.1, 0.8]])  # source: classes 0 and 2, mean confidence 0.85
    logits_strong = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]])  # CE depends on the label
    # relative: threshold 0.9 * 0.85 = 0.765 keeps sample 1 only (0.80)
    _, kept = fixmatch_loss(p_t.log(), logits_strong, 0.9, q_s.log(), relative=True)
    assert kept.item() == pytest.approx(1 / 3)
    # alignment: p * mean(q) / mean(p), renormalised; sample 2 flips to class 2
    ratio = q_s.mean(0) / p_t.mean(0)
    aligned = p_t * ratio / (p_t * ratio).sum(1, keepdim=True)
    assert aligned[2].argmax() == 2
    loss, kept = fixmatch_loss(p_t.log(), logits_strong, 0.0, q_s.log(), align=True)
    assert kept.item() == 1.0  # threshold 0: every sample, labelled by the aligned argmax
    expected = F.cross_entropy(logits_strong, aligned.argmax(1))
    assert loss.item() == pytest.approx(expected.item())
    with pytest.raises(ValueError, match="need the source logits"):
        fixmatch_loss(p_t.log(), logits_strong, 0.9, align=True)


def test_no_gradient_reaches_the_weak_view():
    logits_weak = torch.tensor([[5.0, 0.0]], requires_grad=True)
    loss, _ = fixmatch_loss(logits_weak, torch.tensor([[0.0, 1.0]], requires_grad=True), threshold=0.5)
    loss.backward()
    assert logits_weak.grad is None or logits_weak.grad.abs().sum() == 0
    assert loss.item() == pytest.approx(math.log(1 + math.e))  # CE of [0, 1] against class 0


def test_views_are_the_same_samples_and_the_first_is_the_plain_batch():
    x = torch.randint(0, 256, (24, 1, 12, 12), dtype=torch.uint8)
    domain = InMemoryDomain(x, torch.arange(24))
    (weak, strong), labels = domain.stream(6, seed=3, augment="weak").next_views(("weak", "strong"))
    plain_x, plain_y = next(domain.stream(6, seed=3, augment="weak"))
    assert torch.equal(labels, plain_y) and torch.equal(weak, plain_x)
    assert strong.shape == weak.shape and not torch.equal(strong, weak)


def capture_batches(monkeypatch, name):
    seen = []
    original = METHODS[name].step

    def step(self, batch, ctx):
        seen.append(batch)
        return original(self, batch, ctx)

    monkeypatch.setattr(METHODS[name], "step", step)
    return seen


def test_the_trainer_hands_fixmatch_a_strong_view_and_other_methods_none(tmp_path, monkeypatch):
    seen = capture_batches(monkeypatch, "fixmatch")
    train(make_cfg(*TINY_DIGITS, "method=fixmatch", "trainer.max_steps=3"), tmp_path / "fm")
    assert all(len(b.x_t_views) == 1 and b.x_t_views[0].shape == b.x_t.shape for b in seen)
    assert all(not torch.equal(b.x_t_views[0], b.x_t) for b in seen)
    seen_dann = capture_batches(monkeypatch, "dann")
    train(make_cfg(*TINY_DIGITS, "method=dann", "trainer.max_steps=3"), tmp_path / "dann")
    assert all(b.x_t_views == () for b in seen_dann)


@pytest.mark.parametrize("name, adamatch", [("dann", False), ("cdan", False), ("dann", True)])
def test_the_add_on_joins_dann_and_cdan(tmp_path, name, adamatch):
    # threshold 0.01: every sample is pseudo-labelled, so the term is non-zero from the first step
    options = ["method.fixmatch_align=true", "method.fixmatch_relative=true"] if adamatch else []
    train(make_cfg(*TINY_DIGITS, f"method={name}", "method.fixmatch_weight=1", "method.fixmatch_threshold=0.01",
                   *options, "trainer.max_steps=4", "trainer.log_every=1"), tmp_path)
    events = scalar_tags(tmp_path)
    assert [e.value for e in events.Scalars("train/fixmatch_mask")] == [1.0] * 4
    assert all(e.value > 0 for e in events.Scalars("train/loss_fixmatch"))


def test_fixmatch_refuses_feature_data(tmp_path):
    with pytest.raises(UserError, match="augmented views .* need images"):
        train(make_cfg(*TINY_TOY, "method=fixmatch", "data.augment=none", "trainer.max_steps=2"), tmp_path)


def test_threshold_outside_zero_one_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"method.fixmatch_threshold must be a probability in \(0, 1\], got 1.5"):
        train(make_cfg(*TINY_DIGITS, "method=fixmatch", "method.fixmatch_threshold=1.5"), tmp_path)


def test_adamatch_switches_must_be_booleans():
    with pytest.raises(UserError, match="method.fixmatch_align must be true or false, got 'yes'"):
        train(make_cfg(*TINY_DIGITS, "method.fixmatch_align=yes"), "unused")
