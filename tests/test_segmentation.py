"""Semantic segmentation: the task's metrics, the dense network, AdvEnt's pieces and losses, and runs on
the embedded segmentation pair (train, parameters change, exact resume, TensorBoard)."""

import math

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import crash_and_resume, make_cfg, read_metrics
from da_runner.data.classes import LabelSpace
from da_runner.errors import UserError
from da_runner.methods import build_method
from da_runner.methods.advent import map_discriminator
from da_runner.methods.base import Batch, StepContext
from da_runner.nn.backbones import build_features
from da_runner.nn.losses import entropy_loss, map_discriminator_loss, self_information
from da_runner.tasks import IGNORE_INDEX, SegmentationTask, colorize, confusion_matrix, intersection_over_union
from da_runner.trainer import train

TINY_SEG = ["data=embedded_digits_seg", "backbone=fcn_digits", "data.source_size=64", "data.target_train_size=32",
            "data.target_test_size=16", "trainer.batch_size=4", "trainer.progress=false", "trainer.analysis=false",
            "trainer.max_steps=4", "trainer.eval_every=2", "trainer.ckpt_every=2", "backbone.channels=[4,8]",
            "backbone.label_head=[8]"]


def task(num_classes=3) -> SegmentationTask:
    return SegmentationTask(LabelSpace.closed(tuple(f"c{i}" for i in range(num_classes))))


def logits_for(predicted: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Logits (N, C, H, W) whose argmax is `predicted` (N, H, W)."""
    return F.one_hot(predicted, num_classes).permute(0, 3, 1, 2).float()


def test_miou_and_pixel_accuracy_against_a_hand_computation():
    labels = torch.tensor([[[0, 0, 1], [1, 2, IGNORE_INDEX]]])
    predicted = torch.tensor([[[0, 1, 1], [1, 1, 2]]])  # the ignored pixel's prediction must not count
    # class 0: TP 1, FP 0, FN 1 -> 1/2; class 1: TP 2, FP 2 (a 0 and the 2), FN 0 -> 2/4; class 2: TP 0, FN 1 -> 0
    metrics = task().target_metrics(logits_for(predicted, 3), labels)
    assert metrics["target_acc"] == pytest.approx(3 / 5)
    assert metrics["target_iou_c0"] == pytest.approx(0.5)
    assert metrics["target_iou_c1"] == pytest.approx(0.5)
    assert metrics["target_iou_c2"] == pytest.approx(0.0)
    assert metrics["target_miou"] == pytest.approx((0.5 + 0.5 + 0.0) / 3)


def test_a_class_neither_labelled_nor_predicted_is_left_out_of_the_mean():
    labels = torch.tensor([[[0, 1], [1, 1]]])
    iou = intersection_over_union(confusion_matrix(labels, labels, 4))
    assert iou[:2].tolist() == [1.0, 1.0] and math.isnan(iou[2]) and math.isnan(iou[3])
    assert task(4).target_metrics(logits_for(labels, 4), labels)["target_miou"] == 1.0


def test_confusion_matrix_counts_labels_by_row_and_predictions_by_column():
    counts = confusion_matrix(torch.tensor([[1, 1, 0]]), torch.tensor([[0, 1, IGNORE_INDEX]]), 2, IGNORE_INDEX)
    assert counts.tolist() == [[0, 1], [0, 1]]
    # classification (DomainNet has 345 classes): without ignore_index, label 255 is a class like any other
    assert confusion_matrix(torch.tensor([255, 3]), torch.tensor([255, 255]), 300)[255, 255] == 1


def test_segmentation_validators_and_method_checks():
    seg = task()
    assert seg.validators(["source_acc", "entropy", "im", "snd"], "entropy") == ["source_acc", "entropy"]
    with pytest.raises(UserError, match="trainer.select=snd does not apply to segmentation"):
        seg.validators(["snd"], "snd")
    cfg = make_cfg(*TINY_SEG, "method=dann")
    method = build_method(cfg, (3, 64, 64), 11)
    with pytest.raises(UserError, match="method=dann does not train segmentation networks"):
        seg.check_method(method)


@pytest.mark.parametrize("hypercolumns, stride, width", [(True, 1, 4), (False, 2, 8)])
def test_fcn_gives_feature_maps_and_the_head_upsamples_logits_to_the_input(hypercolumns, stride, width):
    cfg = make_cfg(*TINY_SEG, "method=source_only", f"backbone.hypercolumns={str(hypercolumns).lower()}")
    features = build_features(cfg.backbone, (3, 64, 64))
    assert features.output_stride == stride and features.out_features == width
    assert features(torch.zeros(2, 3, 64, 64)).shape == (2, width, 64 // stride, 64 // stride)
    method = build_method(cfg, (3, 64, 64), 11)
    f, logits = method.embed(torch.zeros(2, 3, 64, 64))
    assert f.shape == (2, width) and logits.shape == (2, 11, 64, 64)  # features averaged over positions


@pytest.mark.parametrize("hypercolumns", [True, False])
def test_only_hypercolumns_resolve_strokes_one_pixel_wide(hypercolumns):
    # Vertical lines one pixel wide, two pixels apart, at random offsets: finer than the 4-pixel cells of
    # the last stage, so logits upsampled from it cannot follow them; the first stage's maps can.
    torch.manual_seed(0)
    cfg = make_cfg(*TINY_SEG, "method=source_only", "backbone.channels=[8,8,8]", "backbone.label_head=[]",
                   f"backbone.hypercolumns={str(hypercolumns).lower()}")
    method = build_method(cfg, (3, 32, 32), 2)
    offsets = torch.randint(0, 2, (16,))
    masks = ((torch.arange(32)[None, :] + offsets[:, None]) % 2).long()[:, None, :].expand(16, 32, 32)
    images = masks[:, None].float().expand(16, 3, 32, 32).contiguous()
    optimizer = torch.optim.Adam(method.parameters(), lr=0.01)
    for _ in range(100):
        loss = F.cross_entropy(method.classifier(method.features(images)), masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    method.eval()
    with torch.no_grad():
        accuracy = (method.classifier(method.features(images)).argmax(1) == masks).float().mean().item()
    assert accuracy > 0.99 if hypercolumns else accuracy < 0.75


def test_a_dense_backbone_refuses_a_bottleneck():
    cfg = make_cfg(*TINY_SEG, "backbone.bottleneck.width=16")
    with pytest.raises(UserError, match="takes no bottleneck"):
        build_features(cfg.backbone, (3, 64, 64))


def test_self_information_sums_to_the_normalised_entropy():
    logits = torch.randn(2, 5, 3, 4)
    p = F.softmax(logits, dim=1)
    info = self_information(logits)
    assert info.shape == logits.shape
    expected_bits = -(p * p.log()).sum(1) / math.log(2)
    assert torch.allclose(info.sum(1), expected_bits / math.log2(5), atol=1e-5)
    # MinEnt's term: the mean pixel entropy in nats
    assert entropy_loss(logits).item() == pytest.approx((expected_bits * math.log(2)).mean().item(), rel=1e-4)


def test_map_discriminator_shape_and_loss_by_hand():
    d = map_discriminator(11, 8)
    assert d(torch.zeros(3, 11, 64, 64)).shape == (3, 1, 2, 2)
    d_out = torch.tensor([[[[2.0, -1.0]]]])
    loss, acc = map_discriminator_loss(d_out, is_source=True)
    expected = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(1.0))) / 2
    assert loss.item() == pytest.approx(expected) and acc.item() == 0.5
    loss_t, acc_t = map_discriminator_loss(d_out, is_source=False)
    assert loss_t.item() == pytest.approx((math.log(1 + math.exp(2.0)) + math.log(1 + math.exp(-1.0))) / 2)
    assert acc_t.item() == 0.5


def _advent_and_batch(*overrides):
    cfg = make_cfg(*TINY_SEG, "method=advent", *overrides)
    torch.manual_seed(0)
    method = build_method(cfg, (3, 64, 64), 11)
    batch = Batch(x_s=torch.randn(2, 3, 64, 64), y_s=torch.randint(0, 11, (2, 64, 64)), x_t=torch.randn(2, 3, 64, 64))
    return method, batch, StepContext(step=0, max_steps=10, progress=0.0, grl_lambda=0.0, lr=float(cfg.optim.lr))


def test_advent_losses_match_a_hand_computation():
    method, batch, ctx = _advent_and_batch("method.adversarial_weight=0.5")
    with torch.no_grad():  # train mode and one pass per domain, as in the step (BatchNorm's batch statistics)
        logits_s = method.classifier(method.features(batch.x_s))
        logits_t = method.classifier(method.features(batch.x_t))
        d_t = method.discriminator(self_information(logits_t))
        d_s = method.discriminator(self_information(logits_s))
    loss_seg = F.cross_entropy(logits_s, batch.y_s)
    loss_adv = F.binary_cross_entropy_with_logits(d_t, torch.ones_like(d_t))  # target maps to pass as source
    loss_disc = (F.binary_cross_entropy_with_logits(d_s, torch.ones_like(d_s))
                 + F.binary_cross_entropy_with_logits(d_t, torch.zeros_like(d_t))) / 2
    terms = method.step(batch, ctx)
    assert terms["loss_cls"].item() == pytest.approx(loss_seg.item(), rel=1e-4)
    assert terms["loss_adv"].item() == pytest.approx(loss_adv.item(), rel=1e-4)
    assert terms["loss"].item() == pytest.approx(loss_seg.item() + 0.5 * loss_adv.item(), rel=1e-4)
    # the discriminator's loss is computed after the network's update, on the maps of the same forward pass
    assert terms["loss_disc"].item() == pytest.approx(loss_disc.item(), rel=1e-4)


def test_advent_with_one_pass_over_both_domains_normalises_them_together():
    """method.separate_forward=false: one forward pass over source and target, so each BatchNorm layer
    normalises (and updates its running statistics) once, with the statistics of both domains."""
    joint, batch, ctx = _advent_and_batch("method.separate_forward=false")
    with torch.no_grad():
        logits = joint.classifier(joint.features(torch.cat([batch.x_s, batch.x_t])))
    loss_seg = F.cross_entropy(logits[:2], batch.y_s)
    first_bn = next(m for m in joint.features.modules() if isinstance(m, torch.nn.BatchNorm2d))
    tracked = first_bn.num_batches_tracked.item()
    assert joint.step(batch, ctx)["loss_cls"].item() == pytest.approx(loss_seg.item(), rel=1e-4)
    assert first_bn.num_batches_tracked.item() == tracked + 1
    separate, batch, ctx = _advent_and_batch()  # the default: one pass per domain, two updates
    first_bn = next(m for m in separate.features.modules() if isinstance(m, torch.nn.BatchNorm2d))
    separate.step(batch, ctx)
    assert first_bn.num_batches_tracked.item() == 2


def test_the_balance_term_over_pixels_aims_at_the_source_batch_class_shares():
    """Per pixel, a uniform aim would push the background (most pixels) towards 1 / C: the balance is the
    cross-entropy between the source batch's labelled-pixel class shares and the target's mean prediction."""
    cfg = make_cfg(*TINY_SEG, "method=minent", "method.entropy_weight=0.01", "method.balance_weight=0.5")
    torch.manual_seed(0)
    method = build_method(cfg, (3, 64, 64), 11)
    y_s = torch.zeros(2, 64, 64, dtype=torch.long)
    y_s[0, :16] = 3  # 1,024 pixels of class 3, 1,024 void, the other 6,144 background
    y_s[1, :16] = IGNORE_INDEX
    batch = Batch(x_s=torch.randn(2, 3, 64, 64), y_s=y_s, x_t=torch.randn(2, 3, 64, 64))
    ctx = StepContext(step=0, max_steps=10, progress=0.0, grl_lambda=1.0, lr=float(cfg.optim.lr))
    with torch.no_grad():  # the step's forward pass: both domains together, train mode
        logits_t = method.classifier(method.features(torch.cat([batch.x_s, batch.x_t])))[2:]
    mean_p = logits_t.softmax(1).mean((0, 2, 3))
    expected = -(6 / 7 * torch.log(mean_p[0] + 1e-6) + 1 / 7 * torch.log(mean_p[3] + 1e-6))
    terms = method.step(batch, ctx)
    assert terms["loss_balance"].item() == pytest.approx(expected.item(), rel=1e-4)


def test_advent_network_step_leaves_the_discriminator_to_its_own_loss():
    """The adversarial loss must not train D towards calling target maps source: with D's lr 0, D stays put."""
    method, batch, ctx = _advent_and_batch("method.discriminator_lr=0")
    before = [p.clone() for p in method.discriminator.parameters()]
    method.step(batch, ctx)
    assert all(torch.equal(a, b) for a, b in zip(before, method.discriminator.parameters()))


def test_colorize_gives_one_colour_per_class():
    images = colorize(torch.tensor([[[0, 1], [2, IGNORE_INDEX]]]))
    assert images.shape == (1, 3, 2, 2)
    assert images[0, :, 1, 1].tolist() == [0.0, 0.0, 0.0]
    assert len({tuple(images[0, :, i // 2, i % 2].tolist()) for i in range(4)}) == 4


@pytest.mark.parametrize("method", ["source_only", "minent", "advent"])
def test_each_segmentation_method_trains_changes_its_parameters_and_logs_miou(tmp_path, method):
    overrides = [*TINY_SEG, f"method={method}", "method.entropy_weight=0.01"] if method != "source_only" else \
        [*TINY_SEG, "method=source_only"]
    cfg = make_cfg(*overrides)
    torch.manual_seed(0)
    initial = build_method(cfg, (3, 64, 64), 11).state_dict()
    metrics = train(cfg, tmp_path)
    assert metrics["setting"] == "closed" and 0.0 <= metrics["target_miou"] <= 1.0
    assert set(metrics["target_metrics"]) >= {"target_acc", "target_miou", "target_iou_background", "target_iou_9"}
    assert "target_miou" in metrics["oracle"]
    final = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)["method"]["modules"]
    changed = [k for k, v in initial.items() if v.is_floating_point() and not torch.equal(v, final[k])]
    assert any(k.startswith("classifier") for k in changed) and any(k.startswith("features") for k in changed)
    if method == "advent":
        assert any(k.startswith("discriminator") for k in changed)
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0}).Reload()
    assert "eval/target_miou" in events.Tags()["scalars"]
    assert "eval/target_iou_background" in events.Tags()["scalars"]
    image = events.Images("eval/target_segmentation")
    assert [e.step for e in image] == [2, 4]


@pytest.mark.parametrize("method", ["advent"])
def test_segmentation_run_resumes_exactly(monkeypatch, tmp_path, method):
    args = [*TINY_SEG, f"method={method}", "method.entropy_weight=0.01"]
    full = train(make_cfg(*args), tmp_path / "full")
    crash_and_resume(monkeypatch, method, 3, args, tmp_path / "resumed")
    resumed = read_metrics(tmp_path / "resumed")
    for key in ("target_acc", "target_miou", "source_acc"):
        assert resumed[key] == full[key]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_advent_trains_under_mixed_precision(tmp_path, precision):
    """The segmentation-only method under trainer.precision (tests/test_methods.py covers the classification
    methods): finite losses, weights still float32 and moved."""
    cfg = make_cfg(*TINY_SEG, "method=advent", "method.entropy_weight=0.01", f"trainer.precision={precision}")
    torch.manual_seed(0)
    initial = build_method(cfg, (3, 64, 64), 11).state_dict()
    metrics = train(cfg, tmp_path)
    assert math.isfinite(metrics["target_miou"])
    final = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)["method"]["modules"]
    floats = [k for k, v in initial.items() if v.is_floating_point()]
    assert all(final[k].dtype == torch.float32 for k in floats)
    assert any(k.startswith("discriminator") and not torch.equal(initial[k], final[k]) for k in floats)


def test_the_default_end_of_run_analysis_passes_over_segmentation_runs(tmp_path):
    """trainer.analysis (on by default) clusters one feature vector per labelled sample: a segmentation
    run skips it instead of failing at the end."""
    metrics = train(make_cfg(*TINY_SEG, "method=source_only", "trainer.analysis=true"), tmp_path)
    assert metrics["step"] == 4 and "target_ari" not in metrics and "proxy_a_distance" not in metrics
    assert (tmp_path / "metrics.json").is_file()


def test_segmentation_pairs_refuse_augmentation_and_classification_methods(tmp_path):
    with pytest.raises(UserError, match="data.augment=weak is not supported on data=embedded_digits_seg"):
        train(make_cfg(*TINY_SEG, "method=source_only", "data.augment=weak"), tmp_path / "a")
    with pytest.raises(UserError, match="method=dann does not train segmentation networks"):
        train(make_cfg(*TINY_SEG, "method=dann"), tmp_path / "b")


def test_advent_refuses_a_classification_pair(tmp_path):
    from conftest import TINY_DIGITS

    with pytest.raises(UserError, match="method=advent trains segmentation networks only"):
        train(make_cfg(*TINY_DIGITS, "method=advent", "trainer.max_steps=2"), tmp_path)


@pytest.mark.parametrize("overrides, message", [
    (["method=advent", "method.discriminator_lr=-1"], "method.discriminator_lr must be a number >= 0, got -1"),
    (["method=advent", "method.discriminator_ndf=0"], "method.discriminator_ndf must be a positive integer, got 0"),
    (["method=advent", "method.adversarial_weight=-0.1"], "method.adversarial_weight must be a number >= 0"),
    (["data.task=detection"], "data.task must be one of classification, segmentation, got 'detection'"),
    (["optim.schedule=poly", "optim.power=-1"], "optim.power must be a number >= 0, got -1"),
])
def test_segmentation_config_errors_name_key_rule_and_value(overrides, message):
    from da_runner.config import validate

    with pytest.raises(UserError) as err:
        validate(make_cfg(*TINY_SEG, *overrides))
    assert message in str(err.value)


@pytest.mark.parametrize("arch, stride, width", [("resnet50", 8, 2048), ("mobilenet_v3_large", 16, 960)])
def test_deeplabv3_loads_a_saved_classification_checkpoint_and_gives_full_size_logits(tmp_path, arch, stride, width):
    """The encoder starts from the classification network's weights (here saved by hand: no download)."""
    import torchvision

    torch.manual_seed(0)
    classifier = torchvision.models.get_model(arch, weights=None)
    torch.save({"state_dict": classifier.state_dict()}, tmp_path / "net.pt")
    cfg = make_cfg("backbone=deeplabv3", f"backbone.arch={arch}", "backbone.pretrained=false",
                   f"backbone.weights={tmp_path / 'net.pt'}", "method=source_only")
    method = build_method(cfg, (3, 64, 64), 19)
    assert method.features.output_stride == stride and method.features.out_features == width
    first_conv = "conv1.weight" if arch == "resnet50" else "0.0.weight"
    expected = classifier.state_dict()["conv1.weight" if arch == "resnet50" else "features.0.0.weight"]
    assert torch.equal(method.features.backbone.body.state_dict()[first_conv], expected)
    method.eval()
    assert method.predict(torch.zeros(1, 3, 64, 64)).shape == (1, 19, 64, 64)


def test_deeplabv3_refuses_a_checkpoint_of_another_network(tmp_path):
    import torchvision

    torch.save(torchvision.models.get_model("resnet18", weights=None).state_dict(), tmp_path / "r18.pt")
    cfg = make_cfg("backbone=deeplabv3", "backbone.pretrained=false", f"backbone.weights={tmp_path / 'r18.pt'}")
    with pytest.raises(UserError, match="does not fit the backbone"):
        build_features(cfg.backbone, (3, 64, 64))


def test_segmentation_loss_leaves_void_pixels_out_and_classification_keeps_label_255():
    cfg = make_cfg(*TINY_SEG, "method=source_only")
    method = build_method(cfg, (3, 64, 64), 11)
    logits = torch.randn(1, 11, 2, 2)
    labels = torch.tensor([[[1, 2], [IGNORE_INDEX, IGNORE_INDEX]]])
    expected = F.cross_entropy(logits[:, :, 0, :].permute(0, 2, 1).reshape(2, 11), torch.tensor([1, 2]))
    assert method.classification_loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-5)
    vector_logits = torch.randn(2, 300)  # 300 classes: 255 is a class
    assert method.classification_loss(vector_logits, torch.tensor([255, 0])).item() == pytest.approx(
        F.cross_entropy(vector_logits, torch.tensor([255, 0])).item(), rel=1e-5)


def test_batchwise_evaluation_equals_the_metrics_of_all_outputs_at_once():
    from da_runner.data import build_pair
    from da_runner.evaluation import ValidationData, evaluate, outputs
    from da_runner.tasks import build_task

    cfg = make_cfg(*TINY_SEG, "method=source_only")
    pair = build_pair(cfg.data)
    seg = build_task(pair, cfg.data)
    method = build_method(cfg, pair.input_shape, pair.num_classes)
    data = ValidationData.of(pair, 20)
    record = evaluate(method, data, seg, ["source_acc", "entropy"], batch_size=5)
    target = outputs(method, pair.target_test, 64)
    expected = seg.target_metrics(target.logits, target.labels)
    for key, value in expected.items():
        assert record[key] == pytest.approx(value, nan_ok=True), key
    sample = outputs(method, data.target_sample, 64)
    p = F.softmax(sample.logits, dim=1)
    assert record["entropy"] == pytest.approx(-(p * (p + 1e-8).log()).sum(1).mean().item(), rel=1e-5)
    source = outputs(method, pair.source_val, 64)
    assert record["source_acc"] == pytest.approx((source.logits.argmax(1) == source.labels).float().mean().item())


def test_joint_forward_refuses_source_and_target_of_different_sizes():
    cfg = make_cfg(*TINY_SEG, "method=minent")
    method = build_method(cfg, (3, 64, 64), 11)
    batch = Batch(x_s=torch.randn(2, 3, 64, 64), y_s=torch.zeros(2, 64, 64, dtype=torch.long),
                  x_t=torch.randn(2, 3, 32, 64))
    with pytest.raises(UserError, match="their inputs differ in size"):
        method.forward_both(batch)


def test_advent_trains_on_source_and_target_of_different_sizes():
    method, batch, ctx = _advent_and_batch()
    batch = Batch(x_s=batch.x_s, y_s=batch.y_s, x_t=torch.randn(2, 3, 32, 64))
    assert math.isfinite(method.step(batch, ctx)["loss"].item())


def test_segmentation_pairs_refuse_class_subsets():
    from da_runner.config import validate

    with pytest.raises(UserError, match="a segmentation pair labels every pixel"):
        validate(make_cfg(*TINY_SEG, "+data.source_classes=[0,1]"))


def test_gta5_cityscapes_recipe_composes():
    from da_runner.config import validate

    cfg = make_cfg("experiment=advent_gta5_cityscapes")
    validate(cfg)
    assert cfg.backbone.name == "deeplabv3" and cfg.backbone.arch == "resnet101"
    assert cfg.data.task == "segmentation" and cfg.optim.schedule == "poly" and cfg.trainer.batch_size == 1
