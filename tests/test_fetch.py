"""data.download=true for MNIST-M: MNIST (torchvision) and the BSR archive fetched from a stand-in HTTP
server on localhost that serves small files in the real formats, MNIST-M built, reused by the next run;
checksum mismatches, cut transfers and interrupted builds leave nothing a later run takes for complete.
Also the per-user default data root."""

import gzip
import os
import hashlib
import io
import re
import socket
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets
from PIL import Image

from da_runner.data import build_pair, fetch, mnistm_builder
from da_runner.data.digits import MissingDataError, load_split, missing_files
from da_runner.data.mnistm_builder import RELEASE_SIZES, build_mnistm
from da_runner.errors import UserError
from da_runner.paths import user_data_dir
from conftest import make_cfg, run_cli
from fake_digits import SIZES, write_bsds, write_mnist, write_mnistm_tarball

BSR_URL = "http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/BSR/BSR_bsds500.tgz"


class StandIn:
    """A file server on 127.0.0.1 that records every request; names in `cut` get their Content-Length
    but only half the body before the connection closes."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.requests, self.cut = dict(files), [], set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.lstrip("/")
                server.requests.append(name)
                body = server.files.get(name)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if name in server.cut:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                else:
                    self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _jpeg(rng, h, w) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def bsr_archive(rng, train: int = 3) -> bytes:
    """A BSR_bsds500.tgz in the real layout: photos of all three splits, ground truth, documentation."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        def add(name, payload: bytes):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

        for split, n in (("train", train), ("val", 2), ("test", 2)):
            for i in range(n):
                add(f"BSR/BSDS500/data/images/{split}/{split}{i}.jpg", _jpeg(rng, 48, 64))
            add(f"BSR/BSDS500/data/images/{split}/Thumbs.db", b"x")
            add(f"BSR/BSDS500/data/groundTruth/{split}/{split}0.mat", b"MATLAB 5.0")
        add("BSR/documentation/Arbelaez_Maire_Fowlkes_Malik_TPAMI2010.pdf", b"%PDF")
    return buf.getvalue()


@pytest.fixture
def server(tmp_path, monkeypatch):
    """The stand-in server with MNIST's four .gz files and the BSR archive; torchvision's MNIST MD5s and
    the BSR entry of fetch.SOURCES are those of these files, DA_DATA_MIRROR points at the server."""
    rng = np.random.default_rng(0)
    raw = tmp_path / "served"
    write_mnist(raw, rng)
    files, resources = {}, []
    for path in sorted((raw / "MNIST" / "raw").iterdir()):
        files[path.name + ".gz"] = gzip.compress(path.read_bytes(), mtime=0)
        resources.append((path.name + ".gz", hashlib.md5(files[path.name + ".gz"]).hexdigest()))
    files["BSR_bsds500.tgz"] = bsr_archive(rng)
    monkeypatch.setattr(torchvision.datasets.MNIST, "resources", resources)
    monkeypatch.setitem(fetch.SOURCES, "bsr", fetch.Source(BSR_URL, hashlib.md5(files["BSR_bsds500.tgz"]).hexdigest(),
                                                            train_photos=3))
    stand_in = StandIn(files)
    monkeypatch.setenv(fetch.MIRROR_ENV, stand_in.url)
    yield stand_in
    stand_in.close()


def leftovers(root: Path) -> list[Path]:
    """Temporary names a download or build may use; none may outlive it."""
    return [p for p in root.rglob("*") if ".part" in p.name or p.name.startswith((".download-", ".train-"))
            or p.name.endswith(".tmp")]


def test_download_builds_mnistm_trains_and_the_second_run_sends_no_request(server, tmp_path):
    root = tmp_path / "root"
    overrides = ["method=dann", "data=mnist_mnistm", f"data.root={root}", "data.download=true",
                 f"data.cache_dir={tmp_path / 'cache'}", "trainer.max_steps=2", "trainer.batch_size=4",
                 "trainer.progress=false", "trainer.analysis=false"]
    from da_runner.trainer import train

    metrics = train(make_cfg(*overrides), tmp_path / "run")
    assert metrics["step"] == 2
    assert "BSR_bsds500.tgz" in server.requests and "train-images-idx3-ubyte.gz" in server.requests
    built = root / "mnist_m" / "mnist_m"
    assert (built / "mnist_m_build.json").is_file() and not (root / "mnist_m" / "mnist_m.partial").exists()
    assert len((built / "mnist_m_test_labels.txt").read_text().splitlines()) == SIZES["test"]
    # only the train photos were extracted, and the downloaded archive is gone
    assert sorted(p.name for p in (root / "bsds500").rglob("*") if p.is_file()) == ["train0.jpg", "train1.jpg", "train2.jpg"]
    assert leftovers(root) == []

    server.requests.clear()
    train(make_cfg(*overrides, f"data.cache_dir={tmp_path / 'cache2'}"), tmp_path / "run2")
    assert server.requests == []


def test_checksum_mismatch_is_a_clear_error_and_keeps_nothing(server, tmp_path, monkeypatch):
    monkeypatch.setitem(fetch.SOURCES, "bsr", fetch.Source(BSR_URL, "0" * 32, train_photos=3))
    root = tmp_path / "root"
    with pytest.raises(MissingDataError) as err:
        load_split("mnistm", True, root, cache_dir=tmp_path / "cache", download=True)
    message = str(err.value)
    assert f"{server.url}/BSR_bsds500.tgz arrived with MD5" in message and "nothing was kept" in message
    assert [p for p in (root / "bsds500").rglob("*") if p.is_file()] == [] and not (root / "mnist_m").exists()
    assert leftovers(root) == []


def test_a_cut_transfer_keeps_nothing_and_the_next_run_completes(server, tmp_path):
    root = tmp_path / "root"
    server.cut.add("BSR_bsds500.tgz")
    with pytest.raises(MissingDataError, match=r"stopped after [\d,]+ of [\d,]+ bytes"):
        load_split("mnistm", True, root, cache_dir=tmp_path / "cache", download=True)
    assert [p for p in (root / "bsds500").rglob("*") if p.is_file()] == [] and leftovers(root) == []
    assert missing_files("mnistm", True, root)  # nothing there that looks like MNIST-M
    # MNIST had arrived before the cut: the next run fetches only the archive
    server.cut.clear()
    server.requests.clear()
    split = load_split("mnistm", True, root, cache_dir=tmp_path / "cache", download=True)
    assert split.x.shape == (SIZES["train"], 3, 32, 32) and server.requests == ["BSR_bsds500.tgz"]


def test_offline_message_names_each_file_its_url_its_place_and_the_da_data_command(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port where nothing listens: connection refused, as offline
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(fetch.MIRROR_ENV, f"http://127.0.0.1:{port}")
    root = tmp_path / "root"
    cfg = make_cfg("data=mnist_mnistm", f"data.root={root}", "data.download=true", f"data.cache_dir={tmp_path}")
    with pytest.raises(MissingDataError) as err:
        build_pair(cfg.data)
    message = str(err.value)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        assert f"http://127.0.0.1:{port}/{name}.gz  ->  gunzip to {root / 'MNIST' / 'raw' / name}" in message
    assert f"http://127.0.0.1:{port}/BSR_bsds500.tgz  ->  {root / 'bsds500' / 'BSR_bsds500.tgz'}" in message
    assert f"da-data build-mnistm --root {root} --bsds {root / 'bsds500'}" in message
    assert "Traceback" not in message and leftovers(root) == []
    # without a mirror the message names the official sources
    monkeypatch.delenv(fetch.MIRROR_ENV)
    steps = "\n".join(fetch.manual_steps(root))
    assert BSR_URL in steps and f"{torchvision.datasets.MNIST.mirrors[0]}train-images-idx3-ubyte.gz" in steps


def test_hand_placed_bsr_archive_is_used_and_kept(server, tmp_path, monkeypatch):
    root = tmp_path / "root"
    (root / "bsds500").mkdir(parents=True)
    (root / "bsds500" / "BSR_bsds500.tgz").write_bytes(server.files["BSR_bsds500.tgz"])
    monkeypatch.setitem(fetch.SOURCES, "bsr", fetch.Source(BSR_URL, None, train_photos=4))  # structure check fails
    with pytest.raises(UserError, match=re.escape("holds 3 BSR/BSDS500/data/images/train/*.jpg photos, expected 4")):
        fetch.fetch_bsds_train(root, progress=False)
    assert not (root / "bsds500" / "images" / "train").exists() and leftovers(root) == []
    monkeypatch.setitem(fetch.SOURCES, "bsr", fetch.Source(BSR_URL, None, train_photos=3))
    fetch.fetch_bsds_train(root, progress=False)
    assert len(list((root / "bsds500" / "images" / "train").glob("*.jpg"))) == 3
    assert (root / "bsds500" / "BSR_bsds500.tgz").is_file() and "BSR_bsds500.tgz" not in server.requests


@pytest.fixture(scope="module")
def mnist_and_photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist")
    labels = write_mnist(root, np.random.default_rng(3))
    return root, write_bsds(root / "bsds", np.random.default_rng(4)), labels


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_interrupted_build_resumes_and_equals_an_uninterrupted_one(mnist_and_photos, tmp_path, monkeypatch):
    root, bsds, _ = mnist_and_photos
    whole = tmp_path / "whole" / "mnist_m"
    build_mnistm(root, bsds, whole, progress=False, cache_dir=tmp_path / "cache")

    write_png, calls = mnistm_builder._write_png, []

    def interrupted_after_25(image, path):
        if len(calls) == 25:
            path.with_name(path.name + ".tmp").write_bytes(b"\x89PNG half")  # what a kill mid-write leaves
            raise KeyboardInterrupt
        calls.append(path)
        write_png(image, path)

    out = tmp_path / "resumed" / "mnist_m"  # as <data.root>/mnist_m
    monkeypatch.setattr(mnistm_builder, "_write_png", interrupted_after_25)
    with pytest.raises(KeyboardInterrupt):
        build_mnistm(root, bsds, out, progress=False, cache_dir=tmp_path / "cache")
    assert not (out / "mnist_m").exists() and missing_files("mnistm", True, out.parent)  # not taken for MNIST-M
    first = {p: p.stat().st_mtime_ns for p in calls}

    calls.clear()
    monkeypatch.setattr(mnistm_builder, "_write_png", lambda image, path: (calls.append(path), write_png(image, path)))
    build_mnistm(root, bsds, out, progress=False, cache_dir=tmp_path / "cache")
    assert len(calls) == SIZES["train"] + SIZES["test"] - 25  # only what the first attempt had not written
    assert all((out / "mnist_m" / p.parent.name / p.name).stat().st_mtime_ns == t for p, t in first.items())
    assert _tree(out / "mnist_m") == _tree(whole / "mnist_m") and not (out / "mnist_m.partial").exists()


def test_built_mnistm_has_the_release_layout_sizes_and_label_files(mnist_and_photos, tmp_path):
    root, bsds, mnist = mnist_and_photos
    assert RELEASE_SIZES == {"train": 59001, "test": 9001}  # the release's counts: MNIST's first images
    # the release tarball's member names, for a release of these sizes (fake_digits writes that layout)
    release = tmp_path / "release"
    write_mnistm_tarball(release, np.random.default_rng(0))
    with tarfile.open(release / "mnist_m" / "mnist_m.tar.gz") as tar:
        release_files = {m.name for m in tar.getmembers() if m.isfile()}

    out = tmp_path / "root" / "mnist_m"
    assert build_mnistm(root, bsds, out, seed=0, progress=False, cache_dir=tmp_path / "cache") == SIZES
    built = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert built - {"mnist_m/mnist_m_build.json"} == release_files
    for split in ("train", "test"):
        lines = (out / "mnist_m" / f"mnist_m_{split}_labels.txt").read_text().splitlines()
        assert lines == [f"{i:08d}.png {y}" for i, y in enumerate(mnist[split][1])]
        with Image.open(out / "mnist_m" / f"mnist_m_{split}" / "00000000.png") as image:
            assert image.size == (32, 32) and image.mode == "RGB"
    info = (out / "mnist_m" / "mnist_m_build.json").read_text()
    assert '"seed": 0' in info and "not the release file bit for bit" in info
    split = load_split("mnistm", False, tmp_path / "root", cache_dir=tmp_path / "cache")
    assert torch.equal(split.y, torch.as_tensor(mnist["test"][1]))


def test_default_data_root_is_one_per_user_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("DA_DATA_ROOT", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    (tmp_path / "elsewhere").mkdir()
    for folder in (tmp_path, tmp_path / "elsewhere"):  # the same from any working folder
        monkeypatch.chdir(folder)
        assert make_cfg("data=mnist_mnistm").data.root == str(tmp_path / "xdg" / "da_runner")
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert user_data_dir() == tmp_path / "home" / ".local" / "share" / "da_runner"
    assert make_cfg("data=office31").data.root == str(tmp_path / "home" / ".local" / "share" / "da_runner")
    # DA_DATA_ROOT and data.root=<path> as before
    monkeypatch.setenv("DA_DATA_ROOT", str(tmp_path / "env"))
    assert make_cfg("data=mnist01_mnist23").data.root == str(tmp_path / "env")
    assert make_cfg("data=mnist_usps", f"data.root={tmp_path / 'cli'}").data.root == str(tmp_path / "cli")


def test_help_states_the_default_data_folder(tmp_path):
    result = run_cli(["--help"], cwd=tmp_path)
    assert result.returncode == 0 and "~/.local/share/da_runner" in result.stdout and "DA_DATA_ROOT" in result.stdout


REAL_ROOT = os.environ.get("DA_DATA_ROOT")


@pytest.mark.slow
@pytest.mark.skipif(not (REAL_ROOT and (Path(REAL_ROOT) / "bsds500" / "images" / "train").is_dir()
                         and (Path(REAL_ROOT) / "mnist_m" / "mnist_m.tar.gz").is_file()),
                    reason="set DA_DATA_ROOT to a folder with MNIST/raw, bsds500/images/train and mnist_m/mnist_m.tar.gz")
def test_real_build_has_the_release_layout_sizes_and_label_files(tmp_path):
    real = Path(REAL_ROOT)
    out = tmp_path / "mnist_m"
    assert build_mnistm(real, real / "bsds500", out, progress=False, cache_dir=tmp_path / "cache") == RELEASE_SIZES
    release = {}
    with tarfile.open(real / "mnist_m" / "mnist_m.tar.gz", mode="r|gz") as tar:
        for member in tar:
            if member.isfile():
                release[member.name] = tar.extractfile(member).read() if member.name.endswith(".txt") else None
    built = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} - {"mnist_m/mnist_m_build.json"}
    assert built == set(release)
    for split in ("train", "test"):  # the same label files, byte for byte
        name = f"mnist_m/mnist_m_{split}_labels.txt"
        assert (out / name).read_bytes() == release[name]
