"""The benchmark scripts' own code paths, on tiny data: the bare loop of scripts/bench_throughput.py
over image files, scripts/bench_peer.py without (and, where installed, with) pytorch-adapt, and
scripts/bench_processes.py's runs on one and on two processes."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_DIGITS
from fake_images import CLASSES, write_office31

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_throughput")


def office31_cfg(bench, root, *extra):
    return bench.compose_config(["data=office31", f"data.root={root}", "data.image_size=28", "data.resize=32",
                                 "backbone=lenet", "trainer.batch_size=4", "trainer.progress=false", "device=cpu",
                                 *extra], steps=2)


def test_bare_loop_over_image_files_uses_a_plain_dataloader(bench, tmp_path):
    write_office31(tmp_path, np.random.default_rng(0))
    cfg = office31_cfg(bench, tmp_path, "data.num_workers=1")
    pair = bench.build_pair(cfg.data)
    batches = bench.bare_batches(pair, 4)
    # 9 webcam images make 2 batches of 4 per epoch (drop_last): the loader must start a new epoch
    for _ in range(3):
        x_s, y_s, x_t = next(batches)
        assert x_s.shape == x_t.shape == (4, 3, 28, 28) and x_s.dtype == torch.float32
        assert -2.2 < x_s.min() and x_s.max() < 2.7  # normalised as the runner normalises
        assert y_s.dtype == torch.long and 0 <= y_s.min() and y_s.max() < len(CLASSES)
    assert bench.bare_loop_steps_per_s(cfg, steps=2, warmup=1) > 0


def test_bench_peer_names_the_install_command_without_pytorch_adapt(monkeypatch):
    peer = load_script("bench_peer")
    monkeypatch.setitem(sys.modules, "pytorch_adapt", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "pytorch_adapt.adapters", raising=False)
    with pytest.raises(SystemExit, match="pip install --no-deps pytorch-adapt"):
        peer.import_peer()


def test_bench_peer_sides_compute_the_same_function():
    pytest.importorskip("pytorch_adapt")
    peer = load_script("bench_peer")
    cfg = peer.compose_config([*peer.SAME_FUNCTION, *TINY_DIGITS], steps=3)
    loss_gap, weight_gap = peer.check_same_function(cfg, steps=3)
    assert loss_gap < 1e-5 and weight_gap < 1e-5


def test_bench_processes_reads_the_rate_of_one_and_of_two_processes(tmp_path):
    processes = load_script("bench_processes")
    toy = ["data=toy2d", "backbone=mlp", "data.samples_per_domain=200", "trainer.batch_size=16"]
    rates = [processes.run(nproc, 1, 4, toy, tmp_path / str(nproc)) for nproc in (1, 2)]
    assert all(rate > 0 for rate in rates)
    assert [processes.json.loads((tmp_path / str(n) / "metrics.json").read_text())["processes"] for n in (1, 2)] == [1, 2]
