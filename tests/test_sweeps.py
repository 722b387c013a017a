"""Sweeps as a user runs them: `da-run -m ...` from another folder, failed jobs, re-runs that skip
and resume, the ready-made sweeps, the joblib / submitit launchers, Optuna and `da-summarize`."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose

from da_runner.config_tree import initialize_configs
from da_runner.errors import UserError
from da_runner.methods.dann import DANN
from da_runner.schedules import GRL_SCHEDULES
from da_runner.summarize import main as summarize_main
from da_runner.trainer import train
from conftest import TINY_TOY, classification_methods, da_run_command, load_ckpt, make_cfg, read_metrics, run_cli
from test_trainer import scalar_tags

# A few steps of DANN on the two-moons toy: each job takes well under a second of training.
FAST = [*TINY_TOY, "trainer.max_steps=4", "trainer.eval_every=2", "trainer.ckpt_every=2"]


def run_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml"))


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def output(result) -> str:
    return result.stdout + result.stderr


def test_sweep_runs_every_combination_in_its_own_readable_run_dir(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(["-m", "grl=constant,linear", "grl.hi=0.1,1.0", *FAST, f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert result.returncode == 0, output(result)
    dirs = run_dirs(sweep)
    assert len(dirs) == 4
    for run_dir in dirs:
        assert status(run_dir)["status"] == "completed"
        assert read_metrics(run_dir)["step"] == 4
        assert (run_dir / "checkpoints" / "last.pt").is_file()
        # the run's name in TensorBoard is its directory: the overrides, without display-only keys
        grl = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())["grl"]
        assert f"grl={grl['name']}" in run_dir.name and f"grl.hi={grl['hi']}" in run_dir.name
        assert "trainer.progress" not in run_dir.name
        events = scalar_tags(run_dir)  # each run has its own row in the hparams tab
        assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")
        assert "hparam/target_acc" in events.Tags()["scalars"]
    # the end-of-sweep report prints the table
    assert "| configuration |" in output(result)


def test_failed_job_does_not_stop_the_sweep_and_a_rerun_skips_finished_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "optim.lr=0.01,-1,0.02", *FAST, f"hydra.sweep.dir={sweep}"]
    first = run_cli(args, cwd=tmp_path)
    assert first.returncode == 1, "a sweep with a failed job exits with 1"
    by_lr = {yaml.safe_load((d / ".hydra" / "config.yaml").read_text())["optim"]["lr"]: d for d in run_dirs(sweep)}
    assert set(by_lr) == {0.01, -1, 0.02}
    failed = status(by_lr[-1])
    assert failed["status"] == "failed" and "optim.lr must be a number > 0, got -1" in failed["error"]
    assert status(by_lr[0.01])["status"] == status(by_lr[0.02])["status"] == "completed"  # the job after it ran too
    assert "1 job(s) failed" in output(first) and "optim.lr must be a number > 0" in output(first)

    finished = {lr: (by_lr[lr] / "metrics.json").stat().st_mtime_ns for lr in (0.01, 0.02)}
    second = run_cli(args, cwd=tmp_path)
    assert second.returncode == 1  # the bad job fails again
    assert output(second).count("skipping") == 2
    assert {lr: (by_lr[lr] / "metrics.json").stat().st_mtime_ns for lr in (0.01, 0.02)} == finished

    summary = subprocess.run([*summarize_command(), str(sweep)], capture_output=True, text=True, timeout=60)
    assert summary.returncode == 0, summary.stderr
    bad_row = next(line for line in summary.stdout.splitlines() if "optim.lr=-1" in line)
    cells = [c.strip() for c in bad_row.strip("|").split("|")]
    assert cells[1:4] == ["0", "1", "0"]  # n, failed, incomplete


def test_a_rerun_resumes_an_interrupted_job_from_its_checkpoint(tmp_path):
    args = [*TINY_TOY, "trainer.max_steps=1500", "trainer.ckpt_every=50", "trainer.eval_every=250"]
    reference = run_cli([*args, f"hydra.run.dir={tmp_path / 'ref'}"], cwd=tmp_path)
    assert reference.returncode == 0, output(reference)

    sweep = tmp_path / "sweep"
    command = da_run_command() + ["-m", "seed=0", *args, f"hydra.sweep.dir={sweep}"]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(sweep.glob("*/checkpoints/last.pt")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (run_dir,) = run_dirs(sweep)
    killed_at = load_ckpt(run_dir / "checkpoints" / "last.pt")["step"]
    assert 0 < killed_at < 1500 and status(run_dir)["status"] == "running"

    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, output(again)
    assert "resuming" in output(again)
    ref, new = read_metrics(tmp_path / "ref"), read_metrics(run_dir)
    for key in ("target_acc", "source_acc", "selected_target_acc", "selected_step", "step"):
        assert new[key] == ref[key], key
    assert status(run_dir)["status"] == "completed"


def test_nan_loss_stops_the_run_with_a_clear_message(tmp_path, monkeypatch):
    original = DANN.step

    def step_that_diverges(self, batch, ctx):
        terms = original(self, batch, ctx)
        return {**terms, "loss": torch.tensor(math.nan)} if ctx.step >= 5 else terms

    monkeypatch.setattr(DANN, "step", step_that_diverges)
    cfg = make_cfg(*TINY_TOY, "trainer.max_steps=20", "trainer.log_every=4", "trainer.ckpt_every=4")
    with pytest.raises(UserError, match=r"not finite .* between steps 5 and 8; stopping"):
        train(cfg, tmp_path)
    assert load_ckpt(tmp_path / "checkpoints" / "last.pt")["step"] == 4  # nothing saved after the loss broke
    assert not (tmp_path / "metrics.json").exists()


def hydra_compose(*overrides):
    with initialize_configs():
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def swept_values(cfg, key):
    return set(str(cfg.hydra.sweeper.params[key]).split(","))


def test_ready_made_sweeps_cover_every_method():
    grl = hydra_compose("sweep=grl_schedules")
    assert swept_values(grl, "grl") <= set(GRL_SCHEDULES) and swept_values(grl, "seed") == {"0", "1", "2"}
    assert grl.hydra.sweep.dir == "multirun/grl_schedules"
    methods = hydra_compose("sweep=methods")
    # DIRT-T needs a VADA run to start from; the sweep's default pair is a classification pair
    assert swept_values(methods, "method") == set(classification_methods()) - {"dirt_t"}


def test_ready_made_grl_sweep_covers_every_schedule():
    assert swept_values(hydra_compose("sweep=grl_schedules"), "grl") == set(GRL_SCHEDULES)


def test_a_ready_made_sweep_runs_by_name(tmp_path):
    sweep = tmp_path / "grl"
    result = run_cli(["-m", "sweep=grl_schedules", "hydra.sweeper.params.seed=0", *FAST, f"hydra.sweep.dir={sweep}"],
                     cwd=tmp_path)
    assert result.returncode == 0, output(result)
    schedules = {yaml.safe_load((d / ".hydra" / "config.yaml").read_text())["grl"]["name"] for d in run_dirs(sweep)}
    # one run per schedule the sweep lists (its coverage of GRL_SCHEDULES is checked above)
    assert schedules == swept_values(hydra_compose("sweep=grl_schedules"), "grl") and len(run_dirs(sweep)) == len(schedules)
    assert all("sweep=" not in d.name for d in run_dirs(sweep))


def test_joblib_launcher_runs_jobs_in_parallel_with_divided_threads(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(["-m", "seed=0,1", *FAST, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                      f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert result.returncode == 0, output(result)
    assert [status(d)["status"] for d in run_dirs(sweep)] == ["completed", "completed"]
    expected = max(1, (os.cpu_count() or 1) // 2)
    logs = "".join(p.read_text() for p in sweep.rglob("*.log"))
    assert logs.count(f"parallel jobs: {expected} CPU thread(s)") == 2


def test_submitit_local_launcher_runs_the_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(["-m", "seed=0,1", *FAST, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                      f"hydra.sweep.dir={sweep}"], cwd=tmp_path, timeout=600)
    assert result.returncode == 0, output(result)
    dirs = run_dirs(sweep)
    assert len(dirs) == 2 and all(status(d)["status"] == "completed" for d in dirs)


def test_slurm_launcher_config_composes():
    launcher = hydra_compose("hydra/launcher=slurm").hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.gpus_per_node == 1 and launcher.array_parallelism > 0 and "partition" in launcher
    assert launcher.timeout_min > 0


def test_slurm_ddp_launcher_config_runs_one_task_per_gpu():
    launcher = hydra_compose("hydra/launcher=slurm_ddp", "hydra.launcher.gpus_per_node=8",
                             "hydra.launcher.nodes=2").hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.tasks_per_node == 8 and launcher.nodes == 2 and launcher.timeout_min > 0


def test_optuna_sweep_optimises_a_label_free_objective(tmp_path):
    sweep = tmp_path / "optuna"
    result = run_cli(["-m", "sweep=optuna_lr_grl", "hydra.sweeper.n_trials=3", *FAST, f"hydra.sweep.dir={sweep}"],
                     cwd=tmp_path, timeout=600)
    assert result.returncode == 0, output(result)
    dirs = run_dirs(sweep)
    assert len(dirs) == 3
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    # The objective is the selected checkpoint's SOURCE validation accuracy, never target accuracy.
    assert best["best_value"] == max(read_metrics(d)["selected_source_acc"] for d in dirs)
    lrs = {yaml.safe_load((d / ".hydra" / "config.yaml").read_text())["optim"]["lr"] for d in dirs}
    assert len(lrs) == 3 and all(0.001 <= lr <= 0.1 for lr in lrs)


def summarize_command() -> list[str]:
    script = Path(sys.executable).with_name("da-summarize")
    return [str(script)] if script.exists() else [sys.executable, "-m", "da_runner.summarize"]


def fake_run(root: Path, name: str, overrides: list[str], seed: int, state: str, target=None, selected=None, **extra):
    run_dir = root / name
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": seed}))
    if state != "incomplete":
        (run_dir / "status.json").write_text(json.dumps({"status": state, "error": "boom" if state == "failed" else None}))
    if state == "completed":
        (run_dir / "metrics.json").write_text(json.dumps({
            "target_acc": target, "selected_target_acc": selected, "step": 100, "wall_time_s": 120.0,
            "selected_by": "source_acc", "uses_target_labels": False, **extra}))


def test_summarize_groups_seeds_and_counts_failures(tmp_path, capsys):
    fake_run(tmp_path, "a0", ["method=dann", "seed=0", "trainer.progress=false"], 0, "completed", 0.70, 0.60)
    # trainer.analysis only adds the end-of-run analysis: still a repeat of the same configuration
    fake_run(tmp_path, "a1", ["method=dann", "seed=1", "trainer.analysis=false"], 1, "completed", 0.80, 0.64)
    fake_run(tmp_path, "a2", ["method=dann", "seed=2", "trainer.progress=false"], 2, "failed")
    fake_run(tmp_path, "b0", ["method=source_only", "seed=0"], 0, "completed", 0.50, 0.50)
    fake_run(tmp_path, "b1", ["method=source_only", "seed=1"], 1, "running")
    fake_run(tmp_path, "b2", ["method=source_only", "seed=2"], 2, "incomplete")
    assert summarize_main([str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    dann = next(line for line in printed.splitlines() if line.startswith("| method=dann "))
    # mean ± sample std of (0.70, 0.80) and (0.60, 0.64)
    assert "0.7500 ± 0.0707" in dann and "0.6200 ± 0.0283" in dann
    assert [c.strip() for c in dann.strip("|").split("|")][1:6] == ["2", "1", "0", "0,1", "100"]
    source_only = next(line for line in printed.splitlines() if line.startswith("| method=source_only "))
    assert [c.strip() for c in source_only.strip("|").split("|")][1:4] == ["1", "0", "2"]
    assert "failed: a2: boom" in printed
    csv_text = (tmp_path / "summary.csv").read_text().splitlines()
    assert csv_text[0].startswith("configuration,n,failed,incomplete") and len(csv_text) == 3
    assert (tmp_path / "summary.md").read_text() in printed


def test_summarize_prints_the_method_by_pair_table_of_the_benchmarks(tmp_path, capsys):
    for seed, (t, sel) in enumerate([(0.70, 0.60), (0.80, 0.64)]):
        fake_run(tmp_path, f"d{seed}", ["experiment=digits_embedded", "method=dann", f"seed={seed}"], seed, "completed",
                 t, sel, method="dann", data="embedded_digits")
    fake_run(tmp_path, "m0", ["experiment=digits_mnistm", "method=dann", "seed=0"], 0, "completed", 0.71, 0.72,
             method="dann", data="mnist_mnistm")
    fake_run(tmp_path, "s0", ["experiment=digits_embedded", "method=source_only", "seed=0"], 0, "completed", 0.5, 0.5,
             method="source_only", data="embedded_digits")
    assert summarize_main([str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("| method |"))
    assert header == ("| method | embedded_digits: final | embedded_digits: selected | mnist_mnistm: final "
                      "| mnist_mnistm: selected |")
    dann = next(line for line in lines if line.startswith("| dann |"))
    assert dann == "| dann | 0.7500 ± 0.0707 (2) | 0.6200 ± 0.0283 (2) | 0.7100 ± 0.0000 (1) | 0.7200 ± 0.0000 (1) |"
    assert next(line for line in lines if line.startswith("| source_only |")).endswith("| - | - |")


def test_summarize_refuses_a_folder_without_runs(tmp_path, capsys):
    assert summarize_main([str(tmp_path)]) == 1
    assert "no run directories" in capsys.readouterr().err
