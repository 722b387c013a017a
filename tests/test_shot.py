"""SHOT: its losses and pseudo-labels against hand computations, the source-free second stage, the
target pass the trainer serves (indices that line up with the batches), and exact resume."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from da_runner.data import build_pair
from da_runner.data.files import ImageFileDomain
from da_runner.errors import UserError
from da_runner.methods import Batch, StepContext, build_method
from da_runner.methods.shot import SHOT, centroid_pseudo_labels
from da_runner.nn.losses import information_maximization_terms
from da_runner.trainer import target_pass, train
from conftest import TINY_DIGITS, TINY_TOY, crash_and_resume, load_ckpt, make_cfg
from fake_images import small_image_folder_run, write_image
from test_trainer import scalar_tags

# No dropout in the bottleneck for the hand computations: the forward pass is then a function of the batch.
NO_DROPOUT = ["backbone.bottleneck.dropout=0.0"]


def ctx(step, max_steps=10):
    return StepContext(step=step, max_steps=max_steps, progress=step / max_steps, grl_lambda=0.0, lr=0.0)


def toy_shot(*overrides):
    torch.manual_seed(0)
    cfg = make_cfg("method=shot", *TINY_TOY, *NO_DROPOUT, *overrides)
    pair = build_pair(cfg.data)
    return build_method(cfg, pair.input_shape, pair.num_classes), pair


def toy_batch(pair, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    i_s = torch.randperm(len(pair.source_train), generator=g)[:n]
    i_t = torch.randperm(len(pair.target_train), generator=g)[:n]
    x_s, y_s = pair.source_train.batch(i_s)
    return Batch(x_s=x_s, y_s=y_s, x_t=pair.target_train.batch(i_t)[0], idx_t=i_t)


class SourceFreeBatch(Batch):
    """A batch whose source fields raise when read."""

    def __getattribute__(self, name):
        if name in ("x_s", "y_s"):
            raise AssertionError(f"stage 2 read batch.{name}")
        return super().__getattribute__(name)


def source_free(batch: Batch) -> SourceFreeBatch:
    return SourceFreeBatch(x_s=batch.x_s, y_s=batch.y_s, x_t=batch.x_t, idx_t=batch.idx_t)


# ---------------------------------------------------------------------------------------------------
# The losses and the pseudo-labels


def test_stage_1_is_label_smoothed_cross_entropy_on_the_source():
    method, pair = toy_shot("method.pretrain_steps=5")
    before = copy.deepcopy(method)
    batch = toy_batch(pair)
    out = method.step(batch, ctx(0))
    logits = before.classifier(before.features(batch.x_s)).detach()
    log_p = torch.log_softmax(logits, dim=1)
    eps, classes = 0.1, logits.shape[1]
    # the reference's CrossEntropyLabelSmooth: targets (1 - eps) one-hot + eps / C, summed over classes
    targets = (1 - eps) * F.one_hot(batch.y_s, classes).float() + eps / classes
    assert out["loss_cls"].item() == pytest.approx(-(targets * log_p).sum(1).mean().item(), rel=1e-5)
    assert out["stage"].item() == 1
    plain = F.cross_entropy(logits, batch.y_s).item()
    assert out["loss_cls"].item() != pytest.approx(plain, rel=1e-3)  # the smoothing changes the loss


def test_information_maximisation_against_a_hand_computation():
    p = [[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]
    logits = torch.log(torch.tensor(p))
    entropy_mean, diversity = information_maximization_terms(logits)

    def h(q):
        return -sum(v * math.log(v + 1e-5) for v in q)

    mean = [(a + b) / 2 for a, b in zip(*p)]  # [0.4, 0.15, 0.45]
    assert entropy_mean.item() == pytest.approx((h(p[0]) + h(p[1])) / 2, rel=1e-5)
    assert diversity.item() == pytest.approx(h(mean), rel=1e-5)
    # the IM loss, mean entropy - entropy of the mean, is lowest for confident predictions spread over classes
    confident_diverse = information_maximization_terms(torch.tensor([[9.0, 0, 0], [0, 9.0, 0], [0, 0, 9.0]]))
    confident_collapsed = information_maximization_terms(torch.tensor([[9.0, 0, 0]] * 3))
    assert (confident_diverse[0] - confident_diverse[1]) < (confident_collapsed[0] - confident_collapsed[1])


def reference_pseudo_labels(features, logits, rounds):
    """The reference's obtain_label (digit/uda_digit.py), written out in numpy: append 1, unit length,
    prediction-weighted centroids, cosine distance, then hard-label rounds."""
    f = np.concatenate([features.numpy().astype(np.float64), np.ones((len(features), 1))], axis=1)
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    weights = torch.softmax(logits, 1).numpy().astype(np.float64)
    for _ in range(rounds + 1):
        centroids = weights.T @ f / (1e-8 + weights.sum(0)[:, None])
        cosine = (f @ centroids.T) / (np.linalg.norm(f, axis=1)[:, None] * np.linalg.norm(centroids, axis=1)[None])
        labels = (1 - cosine).argmin(1)
        weights = np.eye(logits.shape[1])[labels]
    return labels.tolist()


def test_centroid_pseudo_labels_on_two_clusters():
    # Five 2-d features, two classes; the classifier's probabilities of class 0 are 0.4, 0.2, 0.6, 0.4, 0.4,
    # so its own labels are [1, 1, 0, 1, 1]. The prediction-weighted centroids move sample 3 to class 0;
    # the refinement round's hard-label centroids move it back and move sample 1 to class 0.
    features = torch.tensor([[1.0, 3.0], [1.0, 1.0], [3.0, 2.0], [2.0, 4.0], [0.0, 3.0]])
    p0 = torch.tensor([0.4, 0.2, 0.6, 0.4, 0.4])
    logits = torch.log(torch.stack([p0, 1 - p0], dim=1))
    assert logits.argmax(1).tolist() == [1, 1, 0, 1, 1]
    assert centroid_pseudo_labels(features, logits, rounds=0).tolist() == [1, 1, 0, 0, 1]
    assert centroid_pseudo_labels(features, logits, rounds=1).tolist() == [1, 0, 0, 1, 1]
    for rounds in (0, 1, 2):
        assert centroid_pseudo_labels(features, logits, rounds).tolist() == reference_pseudo_labels(features, logits, rounds)


def test_a_class_without_weight_has_no_centroid():
    # Class 2 has probability 0 everywhere. Its centroid would be the zero vector, at cosine 0 from every
    # sample: nearer than the two real centroids for the sample at (-3, -3), whose cosines to them are negative.
    features = torch.tensor([[4.0, 0.0], [4.0, 1.0], [0.0, 4.0], [1.0, 4.0], [-3.0, -3.0]])
    inf = float("inf")
    logits = torch.tensor([[2.0, 0.0, -inf]] * 2 + [[0.0, 2.0, -inf]] * 2 + [[1.0, 0.0, -inf]])
    for rounds in (0, 1):
        assert centroid_pseudo_labels(features, logits, rounds).tolist() == [0, 0, 1, 1, 0]


# ---------------------------------------------------------------------------------------------------
# Stage 2: source-free, classifier frozen, features trained on IM + beta * pseudo-label CE


def test_stage_2_never_reads_source_data_and_leaves_the_classifier_unchanged():
    method, pair = toy_shot("method.pretrain_steps=1")
    with pytest.raises(AssertionError, match="read batch.x_s"):  # stage 1 does read it: the probe works
        method.step(source_free(toy_batch(pair)), ctx(0))
    method.step(toy_batch(pair), ctx(0))
    classifier = copy.deepcopy(method.classifier.state_dict())
    grads = [p.grad.clone() for p in method.classifier.parameters()]  # stage 1's last gradients
    features = copy.deepcopy(method.features.state_dict())
    for step in (1, 2, 3):
        assert method.wants_target_pass(ctx(step)) == (step == 1)  # 200 // 16 steps an epoch: once here
        if method.wants_target_pass(ctx(step)):
            target_pass(method, pair.target_train, 64)
        out = method.step(source_free(toy_batch(pair, seed=step)), ctx(step))
        assert out["stage"].item() == 2 and out["loss_pseudo_label"] > 0
    assert all(torch.equal(v, method.classifier.state_dict()[k]) for k, v in classifier.items())
    # no gradient reaches it: the classifier is out of stage 2's graph
    assert all(not p.requires_grad and torch.equal(p.grad, g) for p, g in zip(method.classifier.parameters(), grads))
    changed = [k for k, v in features.items() if not torch.equal(v, method.features.state_dict()[k])]
    assert any(k.startswith("backbone") for k in changed) and any(k.startswith("bottleneck") for k in changed)


def test_stage_2_loss_against_a_hand_computation():
    method, pair = toy_shot("method.pretrain_steps=0")
    # pseudo-labels by hand, so the cross-entropy's targets are known
    method.pseudo_labels = torch.arange(len(pair.target_train)) % 2
    batch = toy_batch(pair)
    before = copy.deepcopy(method)
    out = method.step(batch, ctx(0))
    logits = before.classifier(before.features(batch.x_t)).detach()
    p = torch.softmax(logits, dim=1)
    entropy_mean = -(p * torch.log(p + 1e-5)).sum(1).mean()
    mean = p.mean(0)
    diversity = -(mean * torch.log(mean + 1e-5)).sum()
    y_hat = batch.idx_t % 2
    ce = -torch.log_softmax(logits, dim=1)[torch.arange(len(y_hat)), y_hat].mean()
    assert out["loss_entropy"].item() == pytest.approx(entropy_mean.item(), rel=1e-5)
    assert out["loss_diversity"].item() == pytest.approx(diversity.item(), rel=1e-5)
    assert out["loss_pseudo_label"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx((entropy_mean - diversity + 0.1 * ce).item(), rel=1e-5)


def test_the_target_pass_labels_every_sample_by_its_index():
    method, pair = toy_shot("method.pretrain_steps=0")
    target_pass(method, pair.target_train, 48)  # in batches of 48 and a shorter last one
    assert method.training  # put back in training mode after the pass
    method.eval()
    f = method.features(pair.target_train.x)
    expected = centroid_pseudo_labels(f, method.classifier(f), 1)
    assert torch.equal(method.pseudo_labels, expected)
    # the labels follow the indices the pass hands over, whatever the order of its batches
    shuffled = copy.deepcopy(method)
    order = torch.randperm(len(pair.target_train))
    shuffled.target_pass((pair.target_train.x[i], i) for i in order.split(48))
    assert torch.equal(shuffled.pseudo_labels, expected)


def test_shot_im_makes_no_target_pass():
    method, pair = toy_shot("method.pretrain_steps=0", "method.pseudo_label_weight=0")
    assert not method.wants_target_pass(ctx(0))
    out = method.step(source_free(Batch(x_s=None, y_s=None, x_t=toy_batch(pair).x_t)), ctx(0))
    assert "loss_pseudo_label" not in out and out["loss"].item() == pytest.approx(
        (out["loss_entropy"] - out["loss_diversity"]).item())


def test_streams_hand_out_the_indices_of_their_batches(tmp_path):
    method, pair = toy_shot()
    stream = pair.target_train.stream(16, seed=3)
    for _ in range(15):  # across an epoch boundary (200 // 16 = 12 batches an epoch)
        x, y = next(stream)
        assert torch.equal(x, pair.target_train.x[stream.last_index])
        assert torch.equal(y, pair.target_train.y[stream.last_index])
    rng = np.random.default_rng(0)
    paths = [tmp_path / f"{i}.png" for i in range(6)]
    for path in paths:
        write_image(path, rng)
    files = ImageFileDomain(np.array([str(p) for p in paths]), torch.arange(6) * 10, image_size=16, resize=20)
    stream = files.stream(2, seed=1)
    for _ in range(5):
        _, y = next(stream)
        assert torch.equal(y, files.y[stream.last_index])


# ---------------------------------------------------------------------------------------------------
# Runs through the trainer


def count_target_passes(monkeypatch) -> list[int]:
    """From now on, SHOT's target passes append the number of samples they see to the returned list."""
    passes = []
    original = SHOT.target_pass

    def counting(self, batches):
        batches = list(batches)
        passes.append(sum(len(x) for x, _ in batches))
        assert not torch.is_grad_enabled() and not self.training
        return original(self, iter(batches))

    monkeypatch.setattr(SHOT, "target_pass", counting)
    return passes


def test_the_trainer_refreshes_pseudo_labels_on_schedule(tmp_path, monkeypatch):
    passes = count_target_passes(monkeypatch)
    train(make_cfg(*TINY_DIGITS, "method=shot", "method.pretrain_steps=2", "trainer.max_steps=11",
                   "trainer.log_every=1"), tmp_path)
    assert passes == [60, 60]  # steps 2 and 2 + 60 // 8 = 9: once an epoch of the 60 target images
    events = scalar_tags(tmp_path)
    assert [e.value for e in events.Scalars("train/stage")] == [1.0] * 2 + [2.0] * 9
    lrs = [e.value for e in events.Scalars("train/stage_lr")]
    assert lrs[0] == pytest.approx(0.01) and lrs[2] == pytest.approx(0.01)  # each stage's schedule starts over
    assert lrs[1] < lrs[0] and lrs[-1] < lrs[2]
    assert len(events.Scalars("train/loss_pseudo_label")) == 9


def test_a_run_trains_its_features_and_resumes_exactly_after_a_pseudo_label_refresh(tmp_path, monkeypatch):
    # stage 2 from step 3, pseudo-labels at steps 3, 7 and 11; the crash at step 10 resumes from the
    # checkpoint of step 8, whose labels come from step 7's pass (a new pass at step 8 would differ)
    args = [*TINY_DIGITS, "method=shot", "method.pretrain_steps=3", "method.pseudo_label_every=4",
            "trainer.max_steps=13", "trainer.eval_every=4", "trainer.ckpt_every=4", "trainer.log_every=1"]
    stage_1 = train(make_cfg(*args, "trainer.max_steps=3"), tmp_path / "stage1")
    reference = train(make_cfg(*args), tmp_path / "ref")
    passes = count_target_passes(monkeypatch)

    def crashed_in_stage_2_with_labels():
        state = load_ckpt(tmp_path / "run" / "checkpoints" / "last.pt")
        assert state["step"] == 8 and state["method"]["pseudo_labels"].shape == (60,)

    resumed = crash_and_resume(monkeypatch, "shot", 10, args, tmp_path / "run", before_resume=crashed_in_stage_2_with_labels)
    assert passes == [60] * 3  # steps 3 and 7 before the crash, 11 after it: none at the resume
    ref_state = load_ckpt(tmp_path / "ref" / "checkpoints" / "last.pt")
    new_state = load_ckpt(tmp_path / "run" / "checkpoints" / "last.pt")
    for key, value in ref_state["method"]["modules"].items():
        assert torch.equal(value, new_state["method"]["modules"][key]), key
    assert torch.equal(ref_state["method"]["pseudo_labels"], new_state["method"]["pseudo_labels"])
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == (tmp_path / "ref" / "metrics.jsonl").read_text()
    assert resumed["target_acc"] == reference["target_acc"] and resumed["step"] == 13

    # stage 1's schedule does not depend on the run's length: the short run is the long one's stage 1
    after_1 = load_ckpt(tmp_path / "stage1" / "checkpoints" / "last.pt")["method"]["modules"]
    final = ref_state["method"]["modules"]
    assert stage_1["step"] == 3
    assert all(torch.equal(v, final[k]) for k, v in after_1.items() if k.startswith("classifier."))
    assert any(not torch.equal(v, final[k]) for k, v in after_1.items() if k.startswith("features.backbone."))


def test_shot_trains_on_image_files(tmp_path):
    args = small_image_folder_run(tmp_path, 5, 8, 6)
    metrics = train(make_cfg(*args, "data.num_workers=0", "method=shot", "method.pretrain_steps=2",
                             "trainer.max_steps=4", "trainer.eval_every=4", "trainer.validators=[source_acc]"),
                    tmp_path / "run")
    state = load_ckpt(tmp_path / "run" / "checkpoints" / "last.pt")
    assert metrics["step"] == 4 and state["method"]["pseudo_labels"].min() >= 0


@pytest.mark.parametrize("override, message", [
    ("method.pseudo_label_every=0", "method.pseudo_label_every must be null .* or a positive integer, got 0"),
    ("method.pretrain_steps=-1", "method.pretrain_steps must be an integer >= 0, got -1"),
    ("method.label_smoothing=1.0", r"method.label_smoothing must be a number in \[0, 1\), got 1.0"),
    ("method.pseudo_label_weight=-0.1", "method.pseudo_label_weight must be a number >= 0, got -0.1"),
    ("method.pseudo_label_rounds=-1", "method.pseudo_label_rounds must be an integer >= 0, got -1"),
    ("backbone.label_head_weight_norm=maybe", "backbone.label_head_weight_norm must be true or false, got 'maybe'"),
    ("backbone.bottleneck.relu=1", "backbone.bottleneck.relu must be true or false, got 1"),
])
def test_bad_options_are_refused(tmp_path, override, message):
    with pytest.raises(UserError, match=message):
        train(make_cfg(*TINY_TOY, "method=shot", override, "trainer.max_steps=2"), tmp_path)


def test_the_network_is_the_references():
    method, _ = toy_shot()
    bottleneck = [type(m).__name__ for m in method.features.bottleneck]
    assert bottleneck == ["Linear", "BatchNorm1d"]  # NO_DROPOUT; no ReLU
    head = method.classifier[-1]
    assert len(method.classifier) == 1 and torch.nn.utils.parametrize.is_parametrized(head, "weight")
    # weight normalisation: each class's weight vector is g_k v_k / ||v_k||
    g, v = head.parametrizations.weight.original0, head.parametrizations.weight.original1
    assert torch.allclose(head.weight, g * v / v.norm(dim=1, keepdim=True))
