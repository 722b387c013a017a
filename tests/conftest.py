import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hydra import compose

from da_runner.config_tree import initialize_configs

# Tests never write to the real per-user data folder (data.root's default, da_runner/paths.py): it is a
# temporary folder for this process and the CLI processes the tests start. No test fetches from a mirror
# set in the environment.
_USER_DATA = tempfile.mkdtemp(prefix="da_runner_test_data_")
os.environ["XDG_DATA_HOME"] = _USER_DATA
os.environ.pop("DA_DATA_MIRROR", None)
atexit.register(shutil.rmtree, _USER_DATA, ignore_errors=True)

# Small but real: the embedded pair shrunk so every test trains in seconds on 2 CPU cores.
def classification_methods() -> list[str]:
    """The registered methods that train on classification pairs (all but the segmentation-only ones,
    which tests/test_segmentation.py trains on the segmentation pair)."""
    from da_runner.methods import METHODS

    return sorted(name for name, method in METHODS.items() if "classification" in method.tasks)


TINY_DIGITS = [
    "data.source_size=120", "data.target_train_size=60", "data.target_test_size=60",
    "trainer.batch_size=8", "trainer.progress=false", "trainer.analysis=false",
]
TINY_TOY = ["data=toy2d", "backbone=mlp", "data.samples_per_domain=200", "trainer.batch_size=16",
            "trainer.progress=false", "trainer.analysis=false"]


def make_cfg(*overrides):
    """The config `da-run <overrides>` would compose."""
    with initialize_configs():
        return compose("config", overrides=list(overrides))


def da_run_command() -> list[str]:
    """The installed console script when it is on PATH next to this interpreter, else `python -m`."""
    script = Path(sys.executable).with_name("da-run")
    if script.exists():
        return [str(script)]
    found = shutil.which("da-run")
    return [found] if found else [sys.executable, "-m", "da_runner"]


def run_cli(args, cwd, env_extra=None, timeout=300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(env_extra or {})
    return subprocess.run(da_run_command() + list(args), cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


class Crash(Exception):
    """Raised by a method's step to stand for a crash mid-run."""


def crash_and_resume(monkeypatch, method_name: str, crash_at: int, args, run_dir, before_resume=None):
    """Train the config of `args` in run_dir until method `method_name`'s step `crash_at` crashes,
    calls `before_resume()` (checks on what the crash left), then resumes the run (`resume=true`)
    to the end; returns the resumed run's final metrics."""
    from da_runner.methods import METHODS
    from da_runner.trainer import train

    method_class = METHODS[method_name]
    original_step = method_class.step

    def crashing_step(self, batch, ctx):
        if ctx.step == crash_at:
            raise Crash
        return original_step(self, batch, ctx)

    monkeypatch.setattr(method_class, "step", crashing_step)
    with pytest.raises(Crash):
        train(make_cfg(*args), run_dir)
    monkeypatch.setattr(method_class, "step", original_step)
    if before_resume is not None:
        before_resume()
    return train(make_cfg(*args, "resume=true"), run_dir)


def read_metrics(run_dir) -> dict:
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def load_ckpt(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture
def cfg_factory():
    return make_cfg
