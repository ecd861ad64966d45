"""Where a dataset's files come from, and checks that they are the files we think they are.

Resolution order: explicit `data.path` → `$FEDREC_DATA_DIR/<name>` → the cache → the copy of
ml-100k packaged in the `recbole` wheel → a checksum-verified download from GroupLens.
"""

from __future__ import annotations

import os
import shutil
import urllib.request
import zipfile
from dataclasses import dataclass
from importlib import util as importlib_util
from pathlib import Path

from pipeline.config import DataConfig
from pipeline.errors import DataError
from pipeline.io import atomic_dir, atomic_path, file_digest

GROUPLENS = "https://files.grouplens.org/datasets/movielens"


@dataclass(frozen=True)
class Archive:
    """A GroupLens zip: its folder inside the archive and its published digest."""

    folder: str
    digest: str
    algorithm: str = "sha256"
    size: int | None = None


# Digests of the published archives (ml-10m is only published with an MD5).
ARCHIVES: dict[str, Archive] = {
    "ml-100k": Archive("ml-100k", "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229", size=4924029),
    "ml-latest-small": Archive("ml-latest-small", "696d65a3dfceac7c45750ad32df2c259311949efec81f0f144fdfb91ebc9e436", size=978202),
    "ml-1m": Archive("ml-1m", "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20", size=5917549),
    "ml-10m": Archive("ml-10M100K", "ce571fd55effeba0271552578f2648bd", "md5", size=65566137),
    "ml-25m": Archive("ml-25m", "8b21cfb7eb1706b4ec0aac894368d90acf26ebdfb6aced3ebd4ad5bd1eb9c6aa", size=261978986),
    "ml-32m": Archive("ml-32m", "e4a68655d7386b8f95f2f2424b2ff975dfdd15ffd59e0d864a14dca43e99d6ee", size=238950008),
}

# SHA-256 of the files fedrec reads, per release, so a corrupt or different copy is caught.
FILE_DIGESTS: dict[str, dict[str, str]] = {
    "ml-100k": {
        "u.data": "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490",
        "u.item": "553841ebc7de3a0fd0d6b62a204ea30c1e651aacfb2814c7a6584ac52f2c5701",
    },
    "ml-latest-small": {
        "ratings.csv": "aa289ca83157595d0df6aea1be6a4ded676ddc4385472e8313a8ed9805352646",
        "movies.csv": "5a5f32dd9bb3797b8e728a1b98958789d2b13f294a69fdfbc5727f8a9611aa07",
        "tags.csv": "92a9f8bb7916dceef6151209845788c3643f794dfa79d1feaec7121b5960399d",
    },
}

_FORMAT_MARKERS = (
    ("u.data", "ml-100k"),
    ("ratings.csv", "movielens-csv"),
    ("ratings.dat", "movielens-dat"),
)


@dataclass(frozen=True)
class DataSource:
    """A resolved dataset location."""

    path: Path
    format: str
    origin: str
    """explicit, env, cache, packaged or download."""


def detect_format(path: Path) -> str:
    """Guess the layout of a dataset directory from the files it holds."""
    if path.is_file():
        return "interactions"
    for marker, fmt in _FORMAT_MARKERS:
        if (path / marker).is_file():
            return fmt
    if any(path.glob("*.inter")):
        return "recbole"
    present = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
    raise DataError(
        f"{path} holds no recognised dataset files (found: {present}); expected u.data (ml-100k), "
        "ratings.csv (ml-latest-small/25m/32m), ratings.dat (ml-1m/10m) or *.inter (RecBole), "
        "or set data.format explicitly"
    )


def packaged_ml100k() -> Path | None:
    """The ml-100k atomic files shipped inside the `recbole` wheel, if installed."""
    spec = importlib_util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "dataset_example" / "ml-100k"
    return path if (path / "ml-100k.inter").is_file() else None


def verify_files(name: str, root: Path) -> None:
    """Check the files of a named release against their known (or shipped) SHA-256 sums."""
    expected = dict(FILE_DIGESTS.get(name, {}))
    sums = root / "SHA256SUMS"
    if sums.is_file():
        for line in sums.read_text(encoding="utf-8").splitlines():
            digest, _, filename = line.strip().partition("  ")
            if filename:
                expected.setdefault(filename, digest)
    for filename, digest in expected.items():
        path = root / filename
        if not path.is_file():
            continue
        actual = file_digest(path)
        if actual != digest:
            raise DataError(
                f"{path} does not match the SHA-256 of {name} (expected {digest[:12]}…, got {actual[:12]}…): "
                f"the file is corrupt or from another release; re-download it, or load it as-is with "
                f"data.name=custom data.path={root}"
            )


def resolve_source(cfg: DataConfig, cache_dir: Path) -> DataSource:
    """Find the files for `cfg`, downloading them if allowed and needed."""
    if cfg.path is not None:
        if not cfg.path.exists():
            raise DataError(f"data.path {cfg.path} does not exist; point it at a dataset directory or file")
        fmt = cfg.format if cfg.format != "auto" else detect_format(cfg.path)
        if cfg.name != "custom":
            verify_files(cfg.name, cfg.path)
        return DataSource(cfg.path, fmt, "explicit")
    looked = []
    env = os.environ.get("FEDREC_DATA_DIR")
    candidates = [(Path(env) / cfg.name, "env")] if env else []
    candidates.append((cache_dir / "data" / cfg.name, "cache"))
    for path, origin in candidates:
        looked.append(str(path))
        if path.is_dir():
            verify_files(cfg.name, path)
            return DataSource(path, cfg.format if cfg.format != "auto" else detect_format(path), origin)
    if cfg.name == "ml-100k":
        packaged = packaged_ml100k()
        if packaged is not None:
            return DataSource(packaged, "recbole", "packaged")
        looked.append("the recbole package (not installed)")
    if not cfg.download:
        raise DataError(
            f"dataset {cfg.name} not found (looked in: {'; '.join(looked)}); set data.path, "
            "set FEDREC_DATA_DIR, or allow data.download=true"
        )
    path = download(cfg.name, cache_dir / "data")
    return DataSource(path, detect_format(path), "download")


def download(name: str, target_root: Path, base_url: str = GROUPLENS) -> Path:
    """Download and unpack a GroupLens archive, verifying its digest before anything is kept."""
    archive = ARCHIVES.get(name)
    if archive is None:
        raise DataError(f"no download is known for dataset {name!r}; set data.path to your copy")
    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

    url = f"{base_url}/{name}.zip"
    target = target_root / name
    zip_target = target_root / f"{name}.zip"
    try:
        with atomic_path(zip_target) as tmp:
            with urllib.request.urlopen(url, timeout=60) as response, tmp.open("wb") as out:
                total = int(response.headers.get("Content-Length") or 0) or archive.size
                with Progress(*Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn(), transient=True) as bar:
                    task = bar.add_task(f"download {name}", total=total)
                    for chunk in iter(lambda: response.read(1 << 20), b""):
                        out.write(chunk)
                        bar.advance(task, len(chunk))
            actual = file_digest(tmp, archive.algorithm)
            if actual != archive.digest:
                raise DataError(
                    f"{url} has {archive.algorithm} {actual}, expected {archive.digest}; the download is "
                    "corrupt or the release changed. Nothing was kept; retry, or set data.path to a local copy"
                )
    except OSError as exc:
        raise DataError(
            f"could not download {url} ({exc}); without a network, set data.path or FEDREC_DATA_DIR "
            "to a local copy of the dataset"
        ) from None
    with atomic_dir(target) as tmp_dir:
        with zipfile.ZipFile(zip_target) as zf:
            zf.extractall(tmp_dir)
        inner = tmp_dir / archive.folder
        if inner.is_dir():
            for entry in inner.iterdir():
                shutil.move(str(entry), tmp_dir / entry.name)
            inner.rmdir()
    zip_target.unlink(missing_ok=True)
    verify_files(name, target)
    return target
