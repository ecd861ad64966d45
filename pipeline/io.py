"""Crash-safe file writing: outputs appear complete or not at all."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `target`; rename it onto `target` only on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces `target` only on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(target: str | Path, text: str) -> Path:
    """Atomically write UTF-8 text."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_json(target: str | Path, payload: Any) -> Path:
    """Atomically write indented JSON."""
    return write_text(target, json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in chunks."""
    return prefix_digest(path, None, algorithm).hexdigest()


def prefix_digest(path: str | Path, size: int | None, algorithm: str = "sha256") -> Any:
    """Hash object over the first `size` bytes of a file (all of it if shorter, or when `size` is None), read in chunks.

    The object is returned, not its hex digest, so a caller appending to the file can keep feeding it.
    """
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        left = size
        while left is None or left > 0:
            chunk = handle.read(1 << 20 if left is None else min(left, 1 << 20))
            if not chunk:
                break
            digest.update(chunk)
            left = None if left is None else left - len(chunk)
    return digest


def check_writable(path: str | Path, what: str, *, folder: bool = False) -> Path:
    """Make sure `path` (a file, or with `folder` a directory) can be written, before any long work starts.

    Missing parent folders are created; `path` itself is not.

    Raises:
        FedrecError: naming `what` (e.g. `--output`), the path and the fix.
    """
    from pipeline.errors import FedrecError

    path = Path(path)
    if not folder and path.is_dir():
        raise FedrecError(f"{what} {path} is a folder; give a file path, e.g. {path / 'report.json'}")
    if not folder and path.exists() and not path.is_file():
        raise FedrecError(f"{what} {path} is not a regular file; give the path of a file to write")
    if folder and path.exists() and not path.is_dir():
        raise FedrecError(f"{what} {path} is a file, not a folder; give a folder path")
    above = next((p for p in path.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise FedrecError(f"cannot create the folder for {what} {path}: {above} is a file, not a folder; choose another path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FedrecError(f"cannot create the folder {path.parent} for {what}: {exc.strerror}; choose a writable path") from None
    writable = os.access(path, os.W_OK | (os.X_OK if folder else 0)) if path.exists() else os.access(path.parent, os.W_OK | os.X_OK)
    if not writable:
        raise FedrecError(f"{what} {path} is not writable; choose a writable path or fix its permissions")
    return path
