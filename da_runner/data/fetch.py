"""Downloads for the digit datasets, and MNIST-M built from its public ingredients.

MNIST-M's release link is dead in every library, but its recipe (Ganin & Lempitsky, ICML 2015) needs
only MNIST and the BSDS500 train photos, both still published. With `data.download=true` and no
MNIST-M under data.root, `fetch_mnistm` chains:

1. MNIST through torchvision (its mirrors, the MD5 of each .gz)       -> <root>/MNIST/raw/
2. Berkeley's BSR archive (MD5-checked); only the 200 train photos
   BSR/BSDS500/data/images/train/*.jpg are extracted                  -> <root>/bsds500/images/train/
3. `build_mnistm` (da_runner/data/mnistm_builder.py), seed 0          -> <root>/mnist_m/mnist_m/

Each step is skipped when its result is there, so a second run sends no request.

Nothing half-written is ever taken for complete: a download goes to `<name>.part-<pid>` and is renamed
once its size and checksum are right; the photos are extracted into a temporary folder renamed into
place; torchvision downloads into a temporary root whose files are moved in once torchvision has
checked them; the MNIST-M build works in `<root>/mnist_m/mnist_m.partial/` (resumed by the next run)
and is renamed when complete.

Mirror: with DA_DATA_MIRROR=<base URL>, every file of this chain comes from `<base>/<file name>`
(MNIST's four .gz files and BSR_bsds500.tgz, with the same checksums) instead of the official
sources: for machines behind a proxy, or a local copy server.
"""

import hashlib
import logging
import os
import re
import shutil
import tarfile
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from da_runner.errors import MissingDataError, UserError

log = logging.getLogger("da_runner")

MIRROR_ENV = "DA_DATA_MIRROR"


@dataclass(frozen=True)
class Source:
    url: str
    md5: str | None            # of the whole file; None: not checked
    train_photos: int | None = None  # the BSR archive's structure check: BSDS500 train photos it holds

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


# The files this module downloads itself (MNIST comes through torchvision's own table,
# torchvision.datasets.MNIST.mirrors / .resources). Tests swap entries for small archives.
SOURCES = {
    # BSDS500 (Arbelaez, Maire, Fowlkes & Malik, TPAMI 2011): the BSR archive as linked from Berkeley's
    # page https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/resources.html
    # (http://www.eecs.berkeley.edu/... redirects to https://www2.eecs.berkeley.edu/...).
    # Berkeley publishes no checksum. The MD5 is the one an open-source BSDS500 dataset class lists for
    # this URL (`dataset_md5sum` in Marc Bermejo's MIT-licensed super-resolution datasets); it could not
    # be recomputed where this was written (no network), so the archive's structure is checked as well:
    # its BSR/BSDS500/data/images/train/ holds the 200 train photos (200 train / 100 val / 200 test).
    "bsr": Source(
        url="http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/BSR/BSR_bsds500.tgz",
        md5="0b17383ff0b21fe43d2f28e624203169",
        train_photos=200,
    ),
}

# Only these members of the BSR archive are extracted (flat, by their file name).
_BSDS_TRAIN_MEMBER = re.compile(r"^(?:\./)?BSR/BSDS500/data/images/train/([^/]+\.jpg)$")


class DownloadError(Exception):
    """A download that did not deliver the expected file (short transfer, wrong checksum)."""


def mirror() -> str | None:
    base = os.environ.get(MIRROR_ENV)
    return base.rstrip("/") if base else None


def source_url(source: Source) -> str:
    """Where `source` is fetched from: the mirror when DA_DATA_MIRROR is set, else its official URL."""
    base = mirror()
    return f"{base}/{source.filename}" if base else source.url


def bsds_dir(root: Path) -> Path:
    """<root>/bsds500: the layout of BSR/BSDS500/data in the BSR archive (images/train/*.jpg)."""
    return Path(root) / "bsds500"


def download_file(url: str, dest: Path, md5: str | None = None, progress: bool = True) -> Path:
    """Stream `url` to `dest` through `<dest>.part-<pid>`, renamed only when the whole body arrived and
    its MD5 matches; on any failure nothing is left at either name."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f"{dest.name}.part-{os.getpid()}")
    digest = hashlib.md5()
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "da_runner"})
        with urllib.request.urlopen(request, timeout=60) as response, open(part, "wb") as out:
            total = response.length  # Content-Length (None when the server sends none)
            received = 0
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        # http.client returns a short body without an error when the server closes early: count it.
        if total is not None and received != total:
            raise DownloadError(f"the transfer of {url} stopped after {received:,} of {total:,} bytes; "
                                "nothing was kept")
        if md5 is not None and digest.hexdigest() != md5:
            raise DownloadError(f"{url} arrived with MD5 {digest.hexdigest()}, not the expected {md5}; "
                                "the file was deleted, nothing was kept")
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    return dest


def fetch_with_torchvision(name: str, root: Path, train: bool, loader) -> None:
    """Run a torchvision download (`loader(root, train, download=True)`) into a temporary root under
    `root`, then move the files it verified into `root`: torchvision writes straight to the final
    names, so an interrupted download there would look complete to the next run."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".download-{name}-", dir=root))
    try:
        loader(tmp, train, True)
        for path in sorted(tmp.rglob("*")):
            target = root / path.relative_to(tmp)
            if path.is_file() and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def extract_bsds_train(archive: Path, dest: Path, expected: int | None = None, progress: bool = True) -> Path:
    """Extract only BSR/BSDS500/data/images/train/*.jpg of the BSR archive into `dest` (flat), through a
    temporary folder renamed when all photos are out; checks that there are `expected` of them."""
    archive, dest = Path(archive), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        count = 0
        try:
            with tarfile.open(archive, mode="r|gz") as tar:  # one sequential pass over the .tgz
                for member in tqdm(tar, desc=f"{archive.name}: train photos", unit=" members", disable=not progress):
                    match = _BSDS_TRAIN_MEMBER.match(member.name)
                    if match and member.isfile():
                        (tmp / match.group(1)).write_bytes(tar.extractfile(member).read())
                        count += 1
        except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
            raise UserError(f"{archive} cannot be read as the BSR archive ({type(err).__name__}: {err}); "
                            "delete it and run again") from err
        if count == 0 or (expected is not None and count != expected):
            raise UserError(f"{archive} is not the BSR archive: it holds {count} BSR/BSDS500/data/images/train/*.jpg "
                            f"photos, expected {expected or 'some'}; delete it and run again")
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def fetch_bsds_train(root: Path, progress: bool = True) -> Path:
    """<root>/bsds500 holding images/train/*.jpg: present already, extracted from a BSR archive put at
    <root>/bsds500/BSR_bsds500.tgz by hand (kept), or downloaded (MD5-checked, deleted once extracted)."""
    folder = bsds_dir(root)
    photos = folder / "images" / "train"
    if photos.is_dir():  # only ever created by a rename, once complete (or by hand)
        return folder
    source = SOURCES["bsr"]
    archive = folder / source.filename
    downloaded = not archive.is_file()
    if downloaded:
        log.info("downloading the BSDS500 photos (BSR archive) from %s", source_url(source))
        download_file(source_url(source), archive, source.md5, progress)
    extract_bsds_train(archive, photos, source.train_photos, progress)
    if downloaded:
        archive.unlink()  # 70 MB, of which the 200 train photos are all MNIST-M needs
    return folder


def manual_steps(root: Path) -> list[str]:
    """What to put where by hand when MNIST-M cannot be fetched: each file, its URL, its place, and the
    da-data command that builds MNIST-M from them."""
    from da_runner.data.digits import _by_hand, missing_files

    root = Path(root)
    lines = []
    for train in (True, False):
        lines += _by_hand("mnist", train, missing_files("mnist", train, root))
    if not (bsds_dir(root) / "images" / "train").is_dir():
        source = SOURCES["bsr"]
        lines.append(f"  {source_url(source)}  ->  {bsds_dir(root) / source.filename} "
                     f"(or only its BSR/BSDS500/data/images/train/*.jpg in {bsds_dir(root) / 'images' / 'train'}/)")
    lines.append(f"then run again with data.download=true, or build MNIST-M from the local files with "
                 f"`da-data build-mnistm --root {root} --bsds {bsds_dir(root)}`; "
                 f"or put the MNIST-M release tarball at {root / 'mnist_m' / 'mnist_m.tar.gz'}")
    return lines


def fetch_mnistm(root: Path, cache_dir=None, progress: bool = True) -> None:
    """Make <root>/mnist_m/mnist_m/ (the release tarball's layout) from MNIST and the BSDS500 train
    photos, downloading whichever of them is missing; raises MissingDataError naming each file, its URL
    and its place when a download fails."""
    from da_runner.data.digits import _load_mnist, missing_files
    from da_runner.data.mnistm_builder import build_mnistm

    root = Path(root).expanduser()
    try:
        if missing_files("mnist", True, root) or missing_files("mnist", False, root):
            log.info("downloading MNIST into %s", root)
            fetch_with_torchvision("mnist", root, True, _load_mnist)
        bsds = fetch_bsds_train(root, progress)
    except UserError:
        raise
    except Exception as err:  # network errors come in many types; all mean the same to the user
        reason = str(err) if isinstance(err, DownloadError) else f"{type(err).__name__}: {err}"
        reason = " ".join(reason.split())  # torchvision's messages span lines
        raise MissingDataError("\n".join([f"downloading the files to build MNIST-M under data.root={root} failed "
                                          f"({reason}). Put them there by hand:", *manual_steps(root)])) from err
    log.info("building MNIST-M from MNIST and the BSDS500 train photos into %s", root / "mnist_m")
    build_mnistm(root, bsds, root / "mnist_m", progress=progress, cache_dir=cache_dir)
