"""Label-free validators, checkpoint selection, da-eval and the end-of-run analysis."""

import json
import math

import numpy as np
import pytest
import torch

from da_runner import validators as V
from da_runner.analysis import proxy_a_distance
from da_runner.errors import UserError
from da_runner.eval_cli import main as da_eval
from da_runner.trainer import train
from conftest import TINY_DIGITS, TINY_TOY, load_ckpt, make_cfg
from test_trainer import scalar_tags


def one_hot_logits(classes, num_classes, scale=20.0):
    return scale * torch.nn.functional.one_hot(torch.as_tensor(classes), num_classes).float()


def test_entropy_is_maximal_for_uniform_and_zero_for_confident_predictions():
    assert V.mean_entropy(torch.zeros(6, 4)) == pytest.approx(math.log(4), abs=1e-6)
    assert V.mean_entropy(one_hot_logits([0, 1, 2, 3], 4, scale=50.0)) == pytest.approx(0.0, abs=1e-6)


def test_information_maximization_rewards_confident_and_diverse_predictions():
    uniform = V.information_maximization(torch.zeros(8, 4))
    collapsed = V.information_maximization(one_hot_logits([2] * 8, 4, scale=50.0))
    confident_diverse = V.information_maximization(one_hot_logits([0, 1, 2, 3] * 2, 4, scale=50.0))
    assert uniform == pytest.approx(0.0, abs=1e-6) and collapsed == pytest.approx(0.0, abs=1e-6)
    assert confident_diverse == pytest.approx(math.log(4), abs=1e-5)


def test_snd_is_higher_for_well_clustered_predictions():
    n = 40
    clustered = one_hot_logits([0] * (n // 2) + [1] * (n // 2), 4)
    # each sample's neighbourhood softmax is uniform over its n/2 - 1 cluster mates
    assert V.soft_neighborhood_density(clustered) == pytest.approx(math.log(n // 2 - 1), abs=1e-3)
    scattered = torch.randn(n, 4, generator=torch.Generator().manual_seed(0)) * 3
    assert V.soft_neighborhood_density(scattered) < V.soft_neighborhood_density(clustered) - 0.5


def test_dev_equals_its_formula_and_is_the_mean_loss_with_equal_weights():
    losses = torch.tensor([0.2, 1.0, 0.5, 2.0])
    assert V.deep_embedded_validation(losses, np.ones(4)) == pytest.approx(losses.mean().item())
    w = np.array([0.5, 2.0, 1.0, 0.5])
    wl = w * losses.double().numpy()
    eta = -np.cov(wl, w)[0, 1] / np.var(w, ddof=1)
    assert V.deep_embedded_validation(losses, w) == pytest.approx(wl.mean() + eta * w.mean() - eta)


def test_density_ratio_is_near_one_for_one_distribution_and_large_for_target_like_points():
    g = torch.Generator().manual_seed(0)
    f_s, f_t = torch.randn(400, 3, generator=g), torch.randn(400, 3, generator=g)
    assert np.mean(V.domain_density_ratio(f_s, f_t, f_s[:100])) == pytest.approx(1.0, abs=0.25)
    shifted = f_t + 3.0
    ratio = V.domain_density_ratio(f_s, shifted, torch.cat([f_s[:50], shifted[:50]]))
    assert ratio[50:].mean() > 10 * ratio[:50].mean()


def test_proxy_a_distance_near_zero_for_one_distribution_and_near_two_for_separated_ones():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(500, 8, generator=g), torch.randn(500, 8, generator=g)
    assert abs(proxy_a_distance(a, b)) < 0.3
    assert proxy_a_distance(a, b + 10.0) > 1.9


def history(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("select", ["entropy", "snd", "dev"])
def test_every_validator_is_logged_and_select_chooses_best_pt(tmp_path, select):
    metrics = train(make_cfg(*TINY_DIGITS, "trainer.max_steps=12", "trainer.eval_every=3",
                             f"trainer.select={select}"), tmp_path)
    records = history(tmp_path)
    tags = set(scalar_tags(tmp_path).Tags()["scalars"])
    for name in V.VALIDATORS:
        assert f"eval/{name}" in tags
        values = [r[name] for r in records]
        best_value = (max if V.HIGHER_IS_BETTER[name] else min)(values)
        chosen = max(r["step"] for r in records if r[name] == best_value)  # ties: the later evaluation
        pick = metrics["validators"][name]
        assert pick["step"] == chosen and pick["value"] == best_value
        assert pick["target_acc"] == next(r["target_acc"] for r in records if r["step"] == chosen)
    assert metrics["selected_by"] == select and metrics["selected_step"] == metrics["validators"][select]["step"]
    assert load_ckpt(tmp_path / "checkpoints" / "best.pt")["step"] == metrics["selected_step"]
    oracle = metrics["oracle"]
    assert oracle["uses_target_labels"] is True and oracle["target_acc"] == max(r["target_acc"] for r in records)


@pytest.mark.parametrize("override, message", [
    ("trainer.select=nope", "trainer.select must be one of trainer.validators"),
    ("trainer.validators=[source_acc,magic]", "trainer.validators must be a non-empty list of"),
])
def test_bad_validator_settings_are_refused(tmp_path, override, message):
    with pytest.raises(UserError, match=message):
        train(make_cfg(*TINY_TOY, override), tmp_path)


def test_da_eval_reproduces_the_logged_accuracies(tmp_path, capsys):
    run_dir = tmp_path / "run"
    metrics = train(make_cfg(*TINY_DIGITS, "trainer.max_steps=8", "trainer.eval_every=4"), run_dir)
    assert da_eval([f"ckpt={run_dir / 'checkpoints' / 'last.pt'}", "device=cpu"]) == 0
    report = json.loads((run_dir / "eval_last_embedded_digits.json").read_text())
    assert report["target_test"]["accuracy"] == metrics["target_acc"]
    assert report["source_val"]["accuracy"] == metrics["source_acc"]
    matrix = np.array(report["target_test"]["confusion_matrix"])
    assert matrix.sum() == report["target_test"]["samples"]
    assert np.trace(matrix) / matrix.sum() == pytest.approx(metrics["target_acc"])
    rows = matrix.sum(1)
    expected_per_class = [matrix[c, c] / rows[c] if rows[c] else 0.0 for c in range(10)]
    assert report["target_test"]["per_class_accuracy"] == pytest.approx(expected_per_class, abs=1e-6)
    assert "confusion matrix" in capsys.readouterr().out

    out = tmp_path / "best.json"
    assert da_eval([f"ckpt={run_dir / 'checkpoints' / 'best.pt'}", f"out={out}"]) == 0
    assert json.loads(out.read_text())["target_test"]["accuracy"] == metrics["selected_target_acc"]


def test_da_eval_on_another_pair_and_its_errors(tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(make_cfg(*TINY_TOY, "trainer.max_steps=4"), run_dir)
    ckpt = run_dir / "checkpoints" / "last.pt"
    # Another pair of the same shape: the toy with a larger rotation.
    assert da_eval([f"ckpt={ckpt}", "data=toy2d", "data.angle=60", f"out={tmp_path / 'rot60.json'}"]) == 0
    assert json.loads((tmp_path / "rot60.json").read_text())["data"] == "toy2d"
    assert da_eval([f"ckpt={ckpt}", "data=embedded_digits"]) == 1
    assert "does not fit data=embedded_digits" in capsys.readouterr().err
    assert da_eval([f"ckpt={ckpt}", "data=nope"]) == 1
    assert "Could not find 'data/nope'" in capsys.readouterr().err
    assert da_eval(["bogus=1"]) == 1 and da_eval([f"{ckpt}"]) == 1
    assert da_eval([f"ckpt={tmp_path / 'missing.pt'}"]) == 1
    assert "no checkpoint found" in capsys.readouterr().err


def test_analysis_writes_plots_projector_and_numbers(tmp_path):
    args = [arg for arg in TINY_TOY if arg != "trainer.analysis=false"]
    metrics = train(make_cfg(*args, "trainer.max_steps=40", "trainer.eval_every=20", "trainer.analysis_samples=100"),
                    tmp_path)
    assert -2.0 <= metrics["proxy_a_distance"] <= 2.0 and -1.0 <= metrics["target_ari"] <= 1.0
    for png in ("features_tsne.png", "decision_boundary_first_eval.png", "decision_boundary_final.png"):
        path = tmp_path / "analysis" / png
        assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"
    events = scalar_tags(tmp_path)
    assert {"analysis/features_tsne", "analysis/decision_boundary"} <= set(events.Tags()["images"])
    assert [e.step for e in events.Images("analysis/decision_boundary")] == [20, 40]
    assert {"analysis/proxy_a_distance", "analysis/target_ari"} <= set(events.Tags()["scalars"])
    assert (tmp_path / "projector_config.pbtxt").is_file()
    metadata = next(tmp_path.rglob("metadata.tsv")).read_text().splitlines()
    assert metadata[0] == "domain\tlabel" and len(metadata) == 1 + 200
    assert {line.split("\t")[0] for line in metadata[1:]} == {"source", "target"}
