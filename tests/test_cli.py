"""The installed `da-run`, run as a user would: from a folder that is not the repository."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from da_runner.config_tree import config_dir
from da_runner.methods import METHODS
from conftest import TINY_DIGITS, TINY_TOY, da_run_command, load_ckpt, read_metrics, run_cli
from test_trainer import REQUIRED_TAGS, scalar_tags


def test_cli_trains_from_another_folder(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli([*TINY_DIGITS, "trainer.max_steps=6", "trainer.eval_every=3", f"hydra.run.dir={run_dir}"],
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = read_metrics(run_dir)
    assert metrics["step"] == 6 and metrics["method"] == "dann" and metrics["data"] == "embedded_digits"
    assert (run_dir / "checkpoints" / "last.pt").is_file() and (run_dir / "checkpoints" / "best.pt").is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert set(REQUIRED_TAGS) <= set(scalar_tags(run_dir).Tags()["scalars"])


def test_python_dash_m_runs_the_same_cli(tmp_path):
    import sys

    result = subprocess.run([sys.executable, "-m", "da_runner", "--cfg", "job"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "name: dann" in result.stdout


def test_a_fresh_interpreter_registers_every_shipped_method_config():
    """The CLI imports only `da_runner.methods`: a method file that the package does not import is
    unknown to `da-run` even though tests that import the file directly still pass."""
    import sys

    import yaml

    names = {yaml.safe_load(path.read_text())["method"]["name"] for path in (config_dir() / "method").glob("*.yaml")}
    code = "import da_runner.methods as m; print(' '.join(sorted(m.METHODS)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert names <= set(result.stdout.split()), names - set(result.stdout.split())


def test_pyproject_lists_every_subpackage_and_the_config_tree():
    """pyproject.toml lists the packages by hand (automatic discovery does not see the top-level
    configs/ folder mapped to da_runner.configs): a new subpackage must be added there too."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = Path(__file__).resolve().parents[1]
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    subpackages = {".".join(init.parent.relative_to(root).parts) for init in (root / "da_runner").rglob("__init__.py")}
    assert set(setuptools["packages"]) == subpackages | {"da_runner.configs"}
    assert setuptools["package-dir"] == {"da_runner.configs": "configs"}
    assert (root / "configs" / "config.yaml").is_file() and (root / "configs" / "__init__.py").is_file()
    assert (config_dir() / "config.yaml").is_file()


def test_help_lists_groups_and_options(tmp_path):
    result = run_cli(["--help"], cwd=tmp_path)
    assert result.returncode == 0
    out = result.stdout
    for group, options in {"method": sorted(METHODS), "data": ["embedded_digits", "toy2d"],
                           "backbone": ["dann_mnist", "dann_svhn", "dtn", "lenet", "mlp"], "grl": ["constant", "ganin", "linear"],
                           "optim": ["adam", "sgd"], "trainer": ["default"],
                           "sweep": ["grl_schedules", "methods", "optuna_lr_grl"]}.items():
        line = next(line for line in out.splitlines() if line.startswith(f"{group}: "))
        assert set(options) <= set(line.split(": ", 1)[1].split(", ")), line


def test_cfg_job_prints_the_composed_config(tmp_path):
    result = run_cli(["--cfg", "job", "method=source_only", "grl.hi=0.3"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "name: source_only" in result.stdout and "hi: 0.3" in result.stdout
    assert "max_steps:" in result.stdout


@pytest.mark.parametrize("args, expected", [
    (["method=nope"], ["method", "dann", "source_only"]),
    (["data=nope"], ["data", "embedded_digits", "toy2d"]),
    (["backbone=nope"], ["backbone", "dann_mnist", "lenet", "mlp"]),
    (["trainer.max_steps=0"], ["trainer.max_steps must be a positive integer, got 0"]),
    (["trainer.batch_size=-1"], ["trainer.batch_size must be a positive integer"]),
    (["optim.lr=-1"], ["optim.lr must be a number > 0, got -1"]),
])
def test_bad_input_gives_a_short_message_without_traceback(tmp_path, args, expected):
    result = run_cli([*args, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode != 0
    for text in expected:
        assert text in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_full_error_env_shows_the_traceback(tmp_path):
    result = run_cli(["optim.lr=-1", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                     env_extra={"HYDRA_FULL_ERROR": "1"})
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_resume_errors_name_the_problem(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(["resume=true", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode != 0 and str(run_dir / "checkpoints" / "last.pt") in result.stderr
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"\x80\x02garbage")
    result = run_cli(["resume=true", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode != 0 and "corrupt" in result.stderr and "Traceback" not in result.stderr


def test_sigkill_then_resume_ends_like_an_uninterrupted_run(tmp_path):
    args = [*TINY_TOY, "method=dann", "trainer.max_steps=3000", "trainer.ckpt_every=100", "trainer.eval_every=500"]
    reference = run_cli([*args, f"hydra.run.dir={tmp_path / 'ref'}"], cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr

    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.pt"
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.Popen(da_run_command() + [*args, f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600  # generous: on a loaded machine startup alone can take minutes
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_ckpt(last)["step"]
    assert proc.returncode == -signal.SIGKILL and 0 < killed_at < 3000, "the run was not interrupted mid-way"
    assert not (run_dir / "metrics.json").exists()

    resumed = run_cli([*args, "resume=true", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    ref, new = read_metrics(tmp_path / "ref"), read_metrics(run_dir)
    for key in ("target_acc", "source_acc", "selected_target_acc", "selected_step", "step"):
        assert new[key] == ref[key], key
    ref_w = load_ckpt(tmp_path / "ref" / "checkpoints" / "last.pt")["method"]["modules"]
    new_w = load_ckpt(last)["method"]["modules"]
    assert all(torch.equal(ref_w[k], new_w[k]) for k in ref_w)
