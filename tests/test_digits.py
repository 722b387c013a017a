"""Real digit loaders on tiny files in the real formats (IDX, libsvm .bz2, .mat, PNG tarball)."""

import os
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets

from da_runner.config_tree import config_dir
from da_runner.data import digits
from da_runner.data.digits import MissingDataError, load_split, to_format
from da_runner.data.mnistm_builder import build_mnistm
from da_runner.data_cli import main as da_data
from da_runner.trainer import train
from conftest import make_cfg, run_cli
from fake_digits import SIZES, write_all, write_bsds


@pytest.fixture(autouse=True)
def accept_fake_svhn(monkeypatch):
    # torchvision checks the real SVHN files' MD5; the fabricated ones cannot match it.
    monkeypatch.setattr(torchvision.datasets.SVHN, "_check_integrity", lambda self: True)


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return root, write_all(root)


@pytest.mark.parametrize("name", ["mnist", "usps", "svhn", "mnistm"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_loader_reads_the_real_format(fake_root, tmp_path, name, split):
    root, written = fake_root
    loaded = load_split(name, split == "train", root, cache_dir=tmp_path)
    x_expected, y_expected = written[name][split]
    channels = 3 if name in ("svhn", "mnistm") else 1
    size = 16 if name == "usps" else (32 if channels == 3 else 28)
    assert loaded.x.dtype == torch.uint8 and loaded.y.dtype == torch.int64
    assert loaded.x.shape == (SIZES[split], channels, size, size)
    assert 0 <= loaded.y.min() and loaded.y.max() <= 9
    assert torch.equal(loaded.y, torch.as_tensor(y_expected, dtype=torch.long))
    expected = torch.as_tensor(np.asarray(x_expected)).reshape(loaded.x.shape)
    if name == "usps":  # libsvm text keeps 6 decimals: allow one grey level
        assert (loaded.x.int() - expected.int()).abs().max() <= 1
    else:
        assert torch.equal(loaded.x, expected)


def test_mnistm_extracted_folders_equal_the_tarball(fake_root, tmp_path):
    root, _ = fake_root
    extracted = tmp_path / "root"
    (extracted / "mnist_m").mkdir(parents=True)
    with tarfile.open(root / "mnist_m" / "mnist_m.tar.gz") as tar:
        tar.extractall(extracted / "mnist_m", filter="data")
    from_tar = load_split("mnistm", True, root, cache_dir=tmp_path / "c1")
    from_dir = load_split("mnistm", True, extracted, cache_dir=tmp_path / "c2")
    assert torch.equal(from_tar.x, from_dir.x) and torch.equal(from_tar.y, from_dir.y)


def test_decoded_splits_are_cached_and_refreshed_when_files_change(fake_root, tmp_path, monkeypatch):
    root, _ = fake_root
    copy = tmp_path / "root"
    shutil.copytree(root / "MNIST", copy / "MNIST")
    first = load_split("mnist", True, copy, cache_dir=tmp_path)
    assert (tmp_path / "mnist_train.pt").is_file()

    decoder = digits.DATASETS["mnist"]

    def must_not_decode(*args):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setitem(digits.DATASETS, "mnist", (decoder[0], must_not_decode))
    second = load_split("mnist", True, copy, cache_dir=tmp_path)
    assert torch.equal(first.x, second.x)

    # a changed source file invalidates the cache
    images = copy / "MNIST" / "raw" / "train-images-idx3-ubyte"
    os.utime(images, (images.stat().st_atime, images.stat().st_mtime - 100))
    with pytest.raises(AssertionError, match="decoded again"):
        load_split("mnist", True, copy, cache_dir=tmp_path)


def test_read_only_cache_dir_still_loads(fake_root, tmp_path):
    root, _ = fake_root
    cache = tmp_path / "ro"
    cache.mkdir()
    cache.chmod(0o500)
    try:
        assert len(load_split("usps", False, root, cache_dir=cache).y) == SIZES["test"]
    finally:
        cache.chmod(0o700)


@pytest.mark.parametrize("name, files", [
    ("mnist", ["MNIST/raw/train-images-idx3-ubyte", "MNIST/raw/train-labels-idx1-ubyte"]),
    ("usps", ["usps/usps.bz2"]),
    ("svhn", ["svhn/train_32x32.mat"]),
    ("mnistm", ["mnist_m/mnist_m.tar.gz"]),
])
def test_missing_files_are_named_with_their_paths(tmp_path, name, files):
    with pytest.raises(MissingDataError) as err:
        load_split(name, True, tmp_path, cache_dir=tmp_path / "cache")
    for f in files:
        assert str(tmp_path / f) in str(err.value)
    assert ("build-mnistm" in str(err.value)) == (name == "mnistm")


def test_missing_data_from_the_cli_is_one_clear_message(tmp_path):
    result = run_cli(["data=mnist_mnistm", f"data.root={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    # every missing file of the pair, both datasets, in one message
    assert str(tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte") in result.stderr
    assert result.stderr.count(str(tmp_path / "mnist_m" / "mnist_m.tar.gz")) == 1
    assert "build-mnistm" in result.stderr and "data.download=true" in result.stderr


def test_to_format_converts_channels_and_size():
    grey = torch.full((2, 1, 16, 16), 100, dtype=torch.uint8)
    rgb = to_format(grey, 28, 3)
    assert rgb.shape == (2, 3, 28, 28) and rgb.dtype == torch.uint8 and (rgb == 100).all()
    colour = torch.zeros((1, 3, 32, 32), dtype=torch.uint8)
    colour[:, 1] = 200
    assert to_format(colour, 32, 1).flatten().unique().tolist() == [round(0.587 * 200)]


def test_mnistm_builder_layout_determinism_and_recipe(fake_root, tmp_path):
    root, written = fake_root
    bsds = write_bsds(tmp_path / "bsds", np.random.default_rng(1))
    sizes = {"train": 30, "test": 10}
    build_mnistm(root, bsds, tmp_path / "a" / "mnist_m", seed=0, sizes=sizes, progress=False)
    build_mnistm(root, bsds, tmp_path / "b" / "mnist_m", seed=0, sizes=sizes, progress=False)
    build_mnistm(root, bsds, tmp_path / "c" / "mnist_m", seed=1, sizes=sizes, progress=False)
    out = tmp_path / "a" / "mnist_m" / "mnist_m"  # the release tarball's layout
    assert len(list((out / "mnist_m_train").glob("*.png"))) == 30
    lines = (out / "mnist_m_test_labels.txt").read_text().splitlines()
    assert lines[0] == f"00000000.png {written['mnist']['test'][1][0]}" and len(lines) == 10
    a = load_split("mnistm", True, tmp_path / "a", cache_dir=tmp_path / "ca")
    b = load_split("mnistm", True, tmp_path / "b", cache_dir=tmp_path / "cb")
    c = load_split("mnistm", True, tmp_path / "c", cache_dir=tmp_path / "cc")
    assert a.x.shape == (30, 3, 32, 32) and torch.equal(a.x, b.x) and not torch.equal(a.x, c.x)
    assert torch.equal(a.y, torch.as_tensor(written["mnist"]["train"][1][:30]))
    # |patch - digit|: where the digit is 255 the output is 255 - patch, where it is 0 the patch itself;
    # so out(digit=255) + out(digit=0) over the same patch is 255. Check the recipe on a white and a black digit.
    white, black = np.full((1, 32, 32), 255, np.uint8), np.zeros((1, 32, 32), np.uint8)
    from da_runner.data.mnistm_builder import blend_mnistm, load_bsds_train

    photos = load_bsds_train(bsds)
    w = blend_mnistm(white, photos, np.random.default_rng(5)).astype(int)
    k = blend_mnistm(black, photos, np.random.default_rng(5)).astype(int)
    assert (w + k == 255).all()


def test_da_data_cli_builds_and_reports(fake_root, tmp_path, capsys):
    root, _ = fake_root
    bsds = write_bsds(tmp_path / "bsds", np.random.default_rng(2))
    assert da_data(["build-mnistm", "--root", str(root), "--bsds", str(bsds), "--out", str(tmp_path / "m"),
                    "--train-size", "5", "--test-size", "3"]) == 0
    assert "5 train, 3 test" in capsys.readouterr().out
    assert da_data(["build-mnistm", "--root", str(root), "--bsds", str(tmp_path / "nothing")]) == 1
    assert "no BSDS500 train photos" in capsys.readouterr().err


PAIRS = ["mnist_mnistm", "mnist_usps", "usps_mnist", "svhn_mnist", "mnist_svhn", "mnist_usps_adda", "usps_mnist_adda"]


@pytest.mark.parametrize("pair", PAIRS)
def test_each_pair_composes_and_trains_three_steps(fake_root, tmp_path, pair):
    root, _ = fake_root
    backbone = {"svhn_mnist": "dtn", "mnist_svhn": "dtn", "mnist_mnistm": "dann_mnist"}.get(pair, "lenet")
    cfg = make_cfg(f"data={pair}", f"backbone={backbone}", f"data.root={root}", f"data.cache_dir={tmp_path}",
                   "trainer.max_steps=3", "trainer.batch_size=4", "trainer.progress=false",
                   *(["data.source_subset=20", "data.target_subset=18"] if pair.endswith("adda") else []))
    metrics = train(cfg, tmp_path / "run")
    assert metrics["step"] == 3 and metrics["data"] == pair
    size, channels = {"mnist_mnistm": (28, 3), "svhn_mnist": (32, 3), "mnist_svhn": (32, 3)}.get(pair, (28, 1))
    assert (cfg.data.size, cfg.data.channels) == (size, channels)


def test_adda_protocol_sizes():
    cfg = make_cfg("data=mnist_usps_adda")
    assert (cfg.data.source, cfg.data.target, cfg.data.source_subset, cfg.data.target_subset) == ("mnist", "usps", 2000, 1800)
    cfg = make_cfg("data=usps_mnist_adda")
    assert (cfg.data.source, cfg.data.target, cfg.data.source_subset, cfg.data.target_subset) == ("usps", "mnist", 1800, 2000)


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml")))
def test_experiments_compose(experiment):
    cfg = make_cfg(f"experiment={experiment}")
    if cfg.data.get("task") == "segmentation":  # a segmentation network and a method that trains one
        method = {"digits_seg": "source_only"}.get(experiment, experiment.split("_")[0])
        assert cfg.method.name == method and cfg.optim.schedule == "poly"
        assert (cfg.data.name, cfg.backbone.name) in {("digits_seg", "fcn_digits"), ("gta5_cityscapes", "deeplabv3")}
        if cfg.method.name == "minent":  # over pixels the class-balance term would shrink the background
            assert cfg.method.balance_weight == 0
        return
    if experiment.startswith("digits_"):  # the digits table's columns: any method, DANN by default
        assert cfg.method.name == "dann" and cfg.optim.schedule == "ganin" and cfg.grl.name == "ganin"
        assert (cfg.data.name, cfg.trainer.max_steps) == {"digits_embedded": ("embedded_digits", 5000),
                                                          "digits_mnistm": ("mnist_mnistm", 10000)}[experiment]
        return
    if "_resnet" in experiment:  # the real-image recipes: method, network and data named by the experiment
        method, network, data = re.fullmatch(r"(\w+)_(resnet\d+)_(office31|office_home)", experiment).groups()
        assert (cfg.method.name, cfg.backbone.name, cfg.data._target_) == (
            method, network, f"da_runner.data.images.build_{data}")
        if network == "resnet18":  # the tutorial: the replaced last layer, a 100-unit discriminator, Adam 1e-3
            assert cfg.optim.name == "adam" and cfg.optim.lr == 0.001 and cfg.optim.lr_mult.backbone == 1.0
            assert cfg.backbone.bottleneck.width is None and list(cfg.backbone.label_head) == []
            assert list(cfg.backbone.domain_head) == [100] and not cfg.backbone.domain_head_batch_norm
            return
        # Transfer-Learning-Library's Office recipe
        assert cfg.backbone.pretrained and cfg.optim.lr_mult.backbone == 0.1 and cfg.trainer.batch_size == 32
        assert cfg.optim.nesterov and cfg.optim.weight_decay == 0.001 and cfg.optim.schedule == "inv"
        assert cfg.grl.name == "warm_start" and cfg.backbone.bottleneck.width == 256
        assert list(cfg.backbone.domain_head) == [1024, 1024] and cfg.backbone.domain_head_batch_norm
        assert cfg.trainer.max_steps == {"office31": 20000, "office_home": 30000}[data]
        assert not cfg.method.separate_forward
        if method == "cdan_e":
            assert cfg.method.entropy_normalization == "batch" and not cfg.method.entropy_gradient
        return
    assert experiment.startswith(cfg.method.name + "_") and cfg.data.name in experiment
    if experiment.endswith(("_paper", "_toy2d")):  # the DANN paper's recipe
        assert cfg.trainer.batch_size == 64 and cfg.optim.name == "sgd" and cfg.grl.name == "ganin"
        assert cfg.optim.schedule == "ganin" and not cfg.optim.nesterov
    elif experiment.endswith("_mnist01_mnist23"):  # ADDA's digits recipe on the binary class-subset pair
        assert cfg.data.name == "mnist01_mnist23" and cfg.backbone.name == "lenet" and cfg.optim.name == "adam"
        assert cfg.backbone.bottleneck.width is None and cfg.trainer.batch_size == 64
        if cfg.method.name == "adda":
            assert cfg.trainer.select == "im" and cfg.method.pretrain_steps == 1000
    elif experiment.endswith("_strong"):  # the BatchNorm DANN reimplementations' recipe
        assert cfg.trainer.batch_size == 128 and cfg.optim.name == "adam" and cfg.optim.schedule == "constant"
        assert cfg.grl.name == "ganin" and cfg.method.get("domain_outputs", 2) == 2
        assert (list(cfg.backbone.channels), cfg.backbone.batch_norm, cfg.backbone.dropout) == ([64, 50], True, 0.5)
        assert cfg.backbone.label_head_batch_norm and cfg.backbone.domain_head_batch_norm
        if cfg.method.name == "dann":  # one pass per domain, the two domains' losses summed (fungtion/DANN)
            assert cfg.method.separate_forward and cfg.method.domain_weight == 2
    elif cfg.method.name in ("vada", "dirt_t"):  # the authors' recipe (run_dirtt.py)
        assert cfg.backbone.name == "vada_small" and cfg.backbone.input_norm == "instance"
        assert cfg.optim.name == "adam" and cfg.optim.lr == 0.001 and list(cfg.optim.betas) == [0.5, 0.999]
        assert cfg.optim.schedule == "constant" and cfg.trainer.batch_size == 64 and cfg.trainer.ema == 0.998
    else:  # Transfer-Learning-Library's digits recipe
        assert cfg.trainer.batch_size == 128 and cfg.trainer.max_steps == 50000
        assert cfg.optim.name == "sgd" and cfg.optim.nesterov and cfg.optim.momentum == 0.9
        assert cfg.optim.schedule == "inv" and cfg.optim.decay == 0.75 and cfg.grl.name == "warm_start"
        # adaptation methods on the 256-d BatchNorm bottleneck, the ERM baseline without one
        width = None if cfg.method.name == "source_only" else 256
        assert cfg.backbone.bottleneck.width == width and cfg.backbone.name in ("lenet", "dtn")
        if cfg.method.name.startswith("cdan"):  # the full map into TLL's 1024-1024 BatchNorm discriminator
            assert cfg.method.randomized is False
            assert list(cfg.backbone.domain_head) == [1024, 1024] and cfg.backbone.domain_head_batch_norm
            assert not cfg.method.separate_forward  # tllib's cdan.py: one pass over both domains
        if cfg.method.name == "cdan_e":  # tllib's CDAN+E weights, not the authors' code (the method's default)
            assert cfg.method.entropy_normalization == "batch" and not cfg.method.entropy_gradient


REAL_ROOT = os.environ.get("DA_DATA_ROOT")


@pytest.mark.slow
@pytest.mark.skipif(not REAL_ROOT, reason="set DA_DATA_ROOT to a folder with the real datasets")
def test_real_mnist_and_mnistm(tmp_path):
    mnist = load_split("mnist", True, REAL_ROOT, cache_dir=tmp_path)
    mnist_test = load_split("mnist", False, REAL_ROOT, cache_dir=tmp_path)
    assert mnist.x.shape == (60000, 1, 28, 28) and mnist_test.x.shape == (10000, 1, 28, 28)
    if (Path(REAL_ROOT) / "mnist_m").exists():
        mnistm = load_split("mnistm", True, REAL_ROOT, cache_dir=tmp_path)
        mnistm_test = load_split("mnistm", False, REAL_ROOT, cache_dir=tmp_path)
        assert mnistm.x.shape == (59001, 3, 32, 32) and mnistm_test.x.shape == (9001, 3, 32, 32)
        # image i of MNIST-M is MNIST image i: the labels agree
        assert torch.equal(mnistm.y, mnist.y[:59001]) and torch.equal(mnistm_test.y, mnist_test.y[:9001])


def test_download_fetches_the_official_files_with_checksums(fake_root, tmp_path, monkeypatch):
    """data.download=true hands the missing files to torchvision's downloader (official URLs, MD5)."""
    import shutil as sh
    import torchvision.datasets.mnist as tv_mnist

    root, _ = fake_root
    requests = []

    def fake_download(url, download_root, filename, md5):  # stands in for the network
        requests.append((url, md5))
        name = filename.removesuffix(".gz")
        sh.copy(root / "MNIST" / "raw" / name, Path(download_root) / name)

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", fake_download)
    split = load_split("mnist", True, tmp_path / "fresh", cache_dir=tmp_path / "cache", download=True)
    assert len(split.y) == SIZES["train"]
    assert {md5 for _, md5 in requests} == {md5 for _, md5 in torchvision.datasets.MNIST.resources}
    assert all(url.startswith(torchvision.datasets.MNIST.mirrors[0]) for url, _ in requests)


def test_failed_download_names_the_files_to_place_by_hand(tmp_path, monkeypatch):
    import torchvision.datasets.mnist as tv_mnist
    from urllib.error import URLError

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", offline)
    with pytest.raises(MissingDataError) as err:
        load_split("mnist", False, tmp_path, cache_dir=tmp_path / "cache", download=True)
    assert "downloading mnist" in str(err.value)
    assert str(tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte") in str(err.value)
