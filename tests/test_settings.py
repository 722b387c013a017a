"""Class subsets, the settings they make (closed, partial, open-set) and each setting's metrics."""

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import TINY_DIGITS, make_cfg, read_metrics
from da_runner.config import validate
from da_runner.data import build_pair
from da_runner.data.classes import ClassSelection, LabelSpace
from da_runner.errors import UserError
from da_runner.summarize import main as summarize_main
from da_runner.tasks import ClassificationTask, OpenSetTask, h_score, open_set_metrics
from da_runner.trainer import train

DIGITS = tuple(str(i) for i in range(10))
OFFICE = ("back_pack", "bike", "calculator", "mug", "pen")


def selection(names=DIGITS, **data):
    return ClassSelection.from_config(OmegaConf.create(data), names)


# --- metrics against hand computations ---------------------------------------------------------------

def test_mean_class_accuracy_counts_only_the_target_classes():
    # partial pair, 4 source classes, the target holds classes 0 and 2: class 0 gets 2 of 3 right,
    # class 2 gets 1 of 1 -> accuracy 3/4, mean per-class accuracy (2/3 + 1) / 2
    space = LabelSpace("partial", ("a", "b", "c", "d"), (0, 2))
    logits = torch.tensor([[5.0, 0, 0, 0], [5.0, 0, 0, 0], [0, 5.0, 0, 0], [0, 0, 5.0, 0]])
    labels = torch.tensor([0, 0, 0, 2])
    metrics = ClassificationTask(space).target_metrics(logits, labels)
    assert metrics["target_acc"] == pytest.approx(3 / 4)
    assert metrics["target_mean_class_acc"] == pytest.approx((2 / 3 + 1) / 2)


def test_open_set_prediction_rule_and_metrics_by_hand():
    space = LabelSpace("open_set", ("a", "b"), (0, 1))  # unknown = label 2
    task = OpenSetTask(space, unknown_threshold=0.7)
    confident_a, confident_b, unsure = [4.0, 0.0], [0.0, 4.0], [0.3, 0.0]  # softmax max: 0.98, 0.98, 0.57
    logits = torch.tensor([confident_a, confident_a, confident_b, unsure, unsure, confident_a])
    labels = torch.tensor([0, 1, 1, 1, 2, 2])
    assert task.predict(logits).tolist() == [0, 0, 1, 2, 2, 0]
    metrics = task.target_metrics(logits, labels)
    # per class: a 1/1, b 1/3 (one right, one confused with a, one called unknown), unknown 1/2
    os_star, unk = (1 + 1 / 3) / 2, 1 / 2
    assert metrics["target_os_star"] == pytest.approx(os_star)
    assert metrics["target_unk"] == pytest.approx(unk)
    assert metrics["target_os"] == pytest.approx((1 + 1 / 3 + 1 / 2) / 3)
    assert metrics["target_h_score"] == pytest.approx(2 * os_star * unk / (os_star + unk))
    assert metrics["target_acc"] == pytest.approx(3 / 6)
    assert task.class_names == ("a", "b", "unknown")


def test_h_score_is_zero_when_either_side_fails():
    assert h_score(0.0, 0.0) == 0.0 and h_score(1.0, 0.0) == 0.0 and h_score(0.5, 0.5) == pytest.approx(0.5)
    assert open_set_metrics(torch.tensor([2, 2]), torch.tensor([0, 2]), unknown=2)["target_h_score"] == 0.0


# --- subsets, relabelling, settings -----------------------------------------------------------------

def test_source_subset_relabels_in_list_order_and_the_target_follows_by_class():
    chosen = selection(source_classes=[7, 3, 5], target_classes=[3, 5, 7])
    assert chosen.source == {7: 0, 3: 1, 5: 2} and chosen.target == {3: 1, 5: 2, 7: 0}
    assert chosen.label_space == LabelSpace("closed", ("7", "3", "5"), (0, 1, 2))
    index, labels = chosen.keep(torch.tensor([3, 9, 7, 5, 3, 0]), "source")
    assert index.tolist() == [0, 2, 3, 4] and labels.tolist() == [1, 0, 2, 1]


def test_a_target_map_relabels_other_classes_as_the_source_classes_they_stand_for():
    chosen = selection(source_classes=[0, 1], target_classes={2: 0, 3: 1})
    assert chosen.label_space.setting == "closed"
    index, labels = chosen.keep(torch.tensor([0, 1, 2, 3, 2, 4]), "target")
    assert index.tolist() == [2, 3, 4] and labels.tolist() == [0, 1, 0]


def test_partial_and_open_set_are_inferred_and_unknown_is_one_shared_label():
    partial = selection(target_classes=[0, 1, 2, 3, 4])
    assert partial.label_space.setting == "partial" and partial.label_space.target_labels == (0, 1, 2, 3, 4)
    assert partial.label_space.unknown_label is None and partial.label_space.num_classes == 10
    open_set = selection(source_classes=[0, 1, 2, 3, 4])
    assert open_set.label_space.setting == "open_set" and open_set.label_space.unknown_label == 5
    _, labels = open_set.keep(torch.arange(10), "target")
    assert labels.tolist() == [0, 1, 2, 3, 4, 5, 5, 5, 5, 5]
    # a target that lacks source classes and holds new ones is open-set too
    assert selection(source_classes=[0, 1, 2], target_classes=[0, 1, 8]).label_space.setting == "open_set"


def test_classes_by_name():
    chosen = selection(OFFICE, source_classes=["bike", "mug", "pen"], target_classes=["pen", "calculator", "bike"])
    assert chosen.source == {1: 0, 3: 1, 4: 2} and chosen.target == {4: 2, 2: 3, 1: 0}
    assert chosen.label_space.setting == "open_set" and chosen.label_space.class_names == ("bike", "mug", "pen")


def test_no_subsets_is_a_closed_pair_with_its_labels_unchanged():
    assert selection() is None and selection(setting="closed") is None


@pytest.mark.parametrize("data, message", [
    ({"source_classes": [0, 11]}, "data.source_classes: 11 is not a class of this dataset (classes: 0-9)"),
    ({"target_classes": ["laptop"]}, "data.target_classes: 'laptop' is not a class"),
    ({"source_classes": []}, "data.source_classes must keep at least one class, got an empty list"),
    ({"source_classes": [3]}, "data.source_classes must keep at least 2 classes"),
    ({"source_classes": [0, 1], "target_classes": [5, 6]}, "holds none of the source's classes"),
    ({"source_classes": [0, 1, 0]}, "data.source_classes lists 0 more than once"),
    ({"source_classes": [0, 1], "target_classes": {2: 0, 3: 4}}, "onto 4, which data.source_classes does not keep"),
    ({"target_classes": [0, 1, 2], "setting": "closed"},
     "data.setting=closed but the classes make a partial pair: the target lacks source classes 3, 4, 5"),
    ({"source_classes": [0, 1, 2, 3, 4], "setting": "partial"},
     "data.setting=partial but the classes make a open_set pair: target classes 5, 6, 7, 8, 9 are not among"),
    ({"setting": "open_set"}, "data.setting=open_set but the pair keeps every class"),
])
def test_bad_subsets_end_with_one_clear_line(data, message):
    with pytest.raises(UserError) as err:
        selection(**data)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("override, message", [
    ("data.source_classes=[]",
     "data.source_classes must be null (all) or a non-empty list of class indices >= 0 or names, got []"),
    ("data.target_classes=3",
     "data.target_classes must be null (all) or a non-empty list of class indices >= 0 or names or a non-empty mapping"),
    ("data.setting=openset", "data.setting must be null (inferred) or one of closed, partial, open_set, got 'openset'"),
    ("data.unknown_threshold=1.5", "data.unknown_threshold must be a number in (0, 1], got 1.5"),
])
def test_config_validation_names_key_rule_and_value(override, message):
    with pytest.raises(UserError) as err:
        validate(make_cfg(override))
    assert message in str(err.value)


def test_embedded_pair_subsets_keep_exactly_the_chosen_classes():
    closed = build_pair(make_cfg(*TINY_DIGITS[:3]).data)
    pair = build_pair(make_cfg(*TINY_DIGITS[:3], "data.source_classes=[4,2,7]", "data.target_classes=[2,7,9]").data)
    assert pair.num_classes == 3 and pair.label_space.setting == "open_set"
    for split, kept in (("source_train", {4: 0, 2: 1, 7: 2}), ("source_val", {4: 0, 2: 1, 7: 2}),
                        ("target_train", {2: 1, 7: 2, 9: 3}), ("target_test", {2: 1, 7: 2, 9: 3})):
        raw = getattr(closed, split)
        mask = torch.isin(raw.y, torch.tensor(list(kept)))
        expected = torch.tensor([kept[int(c)] for c in raw.y[mask]])
        assert torch.equal(getattr(pair, split).y, expected), split
        assert torch.equal(getattr(pair, split).x, raw.x[mask]), split


def test_a_split_left_without_samples_is_named():
    with pytest.raises(UserError, match="source_val holds no sample of the selected classes"):
        build_pair(make_cfg("data.source_size=20", "data.source_classes=[0,1]").data)


def test_ready_pairs_compose_with_their_protocols():
    binary = make_cfg("data=mnist01_mnist23").data
    assert (binary.source, binary.target, binary.source_subset, binary.target_subset) == ("mnist", "mnist", 10000, 10000)
    assert list(binary.source_classes) == [0, 1] and dict(binary.target_classes) == {2: 0, 3: 1}
    for name in ("mnist_mnistm_openset", "mnist_usps_openset", "usps_mnist_openset", "svhn_mnist_openset"):
        data = make_cfg(f"data={name}").data
        assert list(data.source_classes) == [0, 1, 2, 3, 4] and data.target_classes is None, name
        assert selection(**OmegaConf.to_container(data)).label_space.unknown_label == 5
    assert selection(**OmegaConf.to_container(make_cfg("data=mnist_mnistm_partial").data)).label_space.target_labels \
        == (0, 1, 2, 3, 4)
    office = sorted(["back_pack", "bike", "bike_helmet", "bookcase", "bottle", "calculator", "desk_chair", "desk_lamp",
                     "desktop_computer", "file_cabinet", "headphones", "keyboard", "laptop_computer", "letter_tray",
                     "mobile_phone", "monitor", "mouse", "mug", "paper_notebook", "pen", "phone", "printer",
                     "projector", "punchers", "ring_binder", "ruler", "scissors", "speaker", "stapler",
                     "tape_dispenser", "trash_can"])
    openset = selection(office, **OmegaConf.to_container(make_cfg("data=office31_openset").data, resolve=False))
    assert openset.label_space.class_names == tuple(office[:20]) and openset.source == {i: i for i in range(20)}
    assert all(openset.target[i] == 20 for i in range(20, 31))
    partial = selection(office, **OmegaConf.to_container(make_cfg("data=office31_partial").data, resolve=False))
    assert partial.label_space.num_classes == 31 and len(partial.label_space.target_labels) == 10


def test_mnist01_mnist23_draws_its_subsets_from_the_kept_digits(tmp_path):
    from fake_digits import write_all

    data = write_all(tmp_path / "data")["mnist"]
    (x_train, y_train), (_, y_test) = data["train"], data["test"]
    cfg = make_cfg("data=mnist01_mnist23", f"data.root={tmp_path / 'data'}", f"data.cache_dir={tmp_path / 'cache'}",
                   "data.source_subset=null", "data.target_subset=null")
    pair = build_pair(cfg.data)
    source_y = torch.cat([pair.source_train.y, pair.source_val.y])
    assert sorted(source_y.tolist()) == sorted(y_train[np.isin(y_train, [0, 1])].tolist())
    assert sorted(pair.target_train.y.tolist()) == sorted((y_train[np.isin(y_train, [2, 3])] - 2).tolist())
    assert sorted(pair.target_test.y.tolist()) == sorted((y_test[np.isin(y_test, [2, 3])] - 2).tolist())
    # the target's images are the training digits 2 and 3
    expected = {x.tobytes() for x in x_train[np.isin(y_train, [2, 3])]}
    assert {x[0].numpy().tobytes() for x in pair.target_train.x} == expected
    small = build_pair(make_cfg("data=mnist01_mnist23", f"data.root={tmp_path / 'data'}",
                                f"data.cache_dir={tmp_path / 'cache'}", "data.source_subset=4",
                                "data.target_subset=3").data)
    # the sizes count samples of the kept classes
    assert len(small.source_train) + len(small.source_val) == 4 and len(small.target_train) == 3


# --- runs -------------------------------------------------------------------------------------------

def test_an_open_set_run_writes_its_metrics_to_metrics_json_and_tensorboard(tmp_path):
    cfg = make_cfg(*TINY_DIGITS, "data.source_size=300", "data.source_classes=[0,1,2,3,4]",
                   "trainer.max_steps=6", "trainer.eval_every=3", "trainer.select=snd")
    metrics = train(cfg, tmp_path)
    assert metrics == read_metrics(tmp_path)
    assert metrics["setting"] == "open_set"
    keys = ("target_acc", "target_os", "target_os_star", "target_unk", "target_h_score")
    assert metrics["target_metrics"] == list(keys)
    for key in keys:
        assert 0 <= metrics[key] <= 1 and f"selected_{key}" in metrics
    assert metrics["target_h_score"] == pytest.approx(h_score(metrics["target_os_star"], metrics["target_unk"]))
    assert "im" not in metrics["validators"] and "snd" in metrics["validators"]
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    for key in keys:
        assert [e.step for e in events.Scalars(f"eval/{key}")] == [3, 6]
    assert "hparam/selected_target_h_score" in events.Tags()["scalars"]
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(set(keys) <= set(record) for record in history)


def test_a_partial_run_reports_mean_class_accuracy_and_refuses_im(tmp_path):
    cfg = make_cfg(*TINY_DIGITS, "method=source_only", "data.target_classes=[0,1,2,3,4]", "trainer.max_steps=3")
    metrics = train(cfg, tmp_path / "run")
    assert metrics["setting"] == "partial" and 0 <= metrics["selected_target_mean_class_acc"] <= 1
    with pytest.raises(UserError, match="trainer.select=im does not apply to partial pairs"):
        train(make_cfg(*TINY_DIGITS, "data.target_classes=[0,1,2]", "trainer.select=im"), tmp_path / "im")


def test_the_oracle_is_refused_on_open_set_pairs(tmp_path):
    with pytest.raises(UserError, match="method=oracle trains on target labels"):
        train(make_cfg(*TINY_DIGITS, "method=oracle", "data.source_classes=[0,1,2]"), tmp_path)


def test_closed_pairs_keep_their_metrics_and_add_mean_class_accuracy(tmp_path):
    metrics = train(make_cfg(*TINY_DIGITS, "trainer.max_steps=3"), tmp_path)
    assert metrics["setting"] == "closed" and metrics["target_metrics"] == ["target_acc", "target_mean_class_acc"]
    for key in ("target_acc", "source_acc", "selected_target_acc", "selected_step", "step", "target_mean_class_acc"):
        assert key in metrics
    assert not any(key.startswith(("target_os", "target_unk", "target_h")) for key in metrics)
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    assert {"eval/target_acc", "eval/target_mean_class_acc", "eval/im"} <= set(events.Tags()["scalars"])


def test_summarize_adds_the_setting_metrics(tmp_path, capsys):
    for seed, h in enumerate((0.4, 0.6)):
        run_dir = tmp_path / f"o{seed}"
        (run_dir / ".hydra").mkdir(parents=True)
        (run_dir / ".hydra" / "overrides.yaml").write_text(f"- data=mnist_usps_openset\n- seed={seed}\n")
        (run_dir / ".hydra" / "config.yaml").write_text(f"seed: {seed}\n")
        (run_dir / "status.json").write_text(json.dumps({"status": "completed"}))
        (run_dir / "metrics.json").write_text(json.dumps({
            "target_acc": 0.5, "selected_target_acc": 0.5, "step": 10, "wall_time_s": 60.0, "selected_by": "snd",
            "target_metrics": ["target_acc", "target_h_score"], "target_h_score": h, "selected_target_h_score": h}))
    assert summarize_main([str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("| target_h_score (final) | target_h_score (selected) |")
    assert lines[2].endswith("| 0.5000 ± 0.1414 | 0.5000 ± 0.1414 |")
    assert "target_h_score_mean" in (tmp_path / "summary.csv").read_text().splitlines()[0]
