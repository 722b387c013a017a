"""trainer.ema: the weight average against hand computations, its evaluation, selection, checkpoints,
da-eval and resume."""

import json

import pytest
import torch
from torch import nn

from da_runner.ema import WeightAverage
from da_runner.eval_cli import evaluate_checkpoint
from da_runner.trainer import train
from conftest import TINY_DIGITS, crash_and_resume, load_ckpt, make_cfg
from test_trainer import scalar_tags


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_update_moves_each_float_tensor_towards_the_live_one_and_copies_integer_buffers():
    net = small_net()
    average = WeightAverage(net, decay=0.9)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        net[0].weight.add_(1.0)
        net[1].running_mean.fill_(2.0)
        net[1].num_batches_tracked.fill_(7)
    average.update()
    assert torch.allclose(average.average["0.weight"], 0.9 * start["0.weight"] + 0.1 * (start["0.weight"] + 1.0))
    assert torch.allclose(average.average["1.running_mean"], 0.9 * start["1.running_mean"] + 0.1 * 2.0)
    assert torch.equal(average.average["0.bias"], start["0.bias"])  # unchanged live tensor, unchanged average
    assert average.average["1.num_batches_tracked"].item() == 7
    # a second step averages again: after n steps at a fixed live value v, a_n = v + 0.9^n (a_0 - v)
    average.update()
    expected = start["0.weight"] + 1.0 - 0.9 ** 2 * 1.0
    assert torch.allclose(average.average["0.weight"], expected)


def test_applied_swaps_the_average_in_and_puts_the_live_weights_back():
    net = small_net()
    average = WeightAverage(net, decay=0.5)
    live = net[0].weight.detach().clone()
    with torch.no_grad():
        net[0].weight.mul_(3.0)
    average.update()  # average = 0.5 * live + 0.5 * 3 live = 2 live
    x = torch.randn(5, 3)
    with average.applied(net):
        assert torch.allclose(net[0].weight, 2.0 * live)
    assert torch.allclose(net[0].weight, 3.0 * live)
    assert net(x).shape == (5, 4)


def test_decay_outside_the_open_interval_is_refused():
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(small_net(), decay=1.0)


EMA_RUN = [*TINY_DIGITS, "trainer.max_steps=12", "trainer.eval_every=4", "trainer.ckpt_every=4", "trainer.ema=0.8"]


def test_a_run_evaluates_and_saves_the_average_beside_the_raw_weights(tmp_path):
    metrics = train(make_cfg(*EMA_RUN), tmp_path)
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("ema" in h and "target_acc" in h["ema"] for h in history)
    assert metrics["ema"] == history[-1]["ema"] and metrics["selected_weights"] == "raw"
    tags = scalar_tags(tmp_path).Tags()["scalars"]
    assert {"eval_ema/target_acc", "eval_ema/source_acc", "eval/target_acc"} <= set(tags)

    last = load_ckpt(tmp_path / "checkpoints" / "last.pt")
    raw, ema = last["method"]["modules"], last["ema"]["average"]
    assert last["ema"]["decay"] == 0.8 and set(raw) == set(ema)
    assert any(not torch.equal(raw[k], ema[k]) for k in raw if raw[k].is_floating_point())
    # da-eval reproduces both evaluations from the checkpoint: raw by default here, the average on request
    assert evaluate_checkpoint(tmp_path / "checkpoints" / "last.pt", [])["target_test"]["accuracy"] == \
        pytest.approx(metrics["target_acc"])
    report = evaluate_checkpoint(tmp_path / "checkpoints" / "last.pt", [], weights="ema")
    assert report["weights"] == "ema"
    assert report["target_test"]["accuracy"] == pytest.approx(metrics["ema"]["target_acc"])
    assert report["source_val"]["accuracy"] == pytest.approx(metrics["ema"]["source_acc"])


def test_ema_select_chooses_best_pt_by_the_average(tmp_path):
    metrics = train(make_cfg(*EMA_RUN, "trainer.ema_select=true", "trainer.select=entropy"), tmp_path)
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # the entropy validator picks the lowest entropy of the AVERAGE's evaluations (latest among ties)
    best = min(history, key=lambda h: (h["ema"]["entropy"], -h["step"]))
    assert metrics["selected_weights"] == "ema" and metrics["selected_step"] == best["step"]
    assert metrics["selected_target_acc"] == best["ema"]["target_acc"]
    state = load_ckpt(tmp_path / "checkpoints" / "best.pt")
    assert state["step"] == best["step"] and state["selected_weights"] == "ema"
    # da-eval's default for this run is the average
    report = evaluate_checkpoint(tmp_path / "checkpoints" / "best.pt", [])
    assert report["weights"] == "ema"
    assert report["target_test"]["accuracy"] == pytest.approx(best["ema"]["target_acc"])


def test_da_eval_refuses_ema_weights_of_a_run_without_them(tmp_path):
    from da_runner.errors import UserError

    train(make_cfg(*TINY_DIGITS, "trainer.max_steps=2"), tmp_path)
    with pytest.raises(UserError, match="holds no weight average"):
        evaluate_checkpoint(tmp_path / "checkpoints" / "last.pt", [], weights="ema")


@pytest.mark.parametrize("name", ["dann", "adda"])
def test_resume_restores_the_average_exactly(tmp_path, monkeypatch, name):
    args = [*EMA_RUN, f"method={name}", "method.pretrain_steps=6" if name == "adda" else "seed=0"]
    reference = train(make_cfg(*args), tmp_path / "ref")
    resumed = crash_and_resume(monkeypatch, name, 9, args, tmp_path / "run")
    assert resumed["ema"] == reference["ema"]
    ref_ema = load_ckpt(tmp_path / "ref" / "checkpoints" / "last.pt")["ema"]["average"]
    new_ema = load_ckpt(tmp_path / "run" / "checkpoints" / "last.pt")["ema"]["average"]
    assert all(torch.equal(ref_ema[k], new_ema[k]) for k in ref_ema)
