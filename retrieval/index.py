"""FAISS inner-product indices over item vectors, built from a factory string."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import ConfigError, IndexMismatchError
from pipeline.io import atomic_path

if TYPE_CHECKING:
    import faiss

FORMAT_VERSION = 1


def _faiss():  # noqa: ANN202
    try:
        import faiss
    except ImportError:
        raise ImportError("the FAISS index needs faiss-cpu; install it with `pip install faiss-cpu`") from None
    return faiss


def _as_matrix(vectors: np.ndarray, name: str, dim: int | None = None) -> np.ndarray:
    array = np.ascontiguousarray(vectors, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a (n, dim) matrix, got shape {array.shape}")
    if dim is not None and array.shape[1] != dim:
        raise IndexMismatchError(
            f"{name} have dimension {array.shape[1]} but the index was built for dimension {dim}; "
            "rebuild the index with the same embedder (`fedrec index build`)"
        )
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return array


class ItemIndex:
    """An inner-product FAISS index over `(n_items, dim)` vectors; ids are item indices.

    Args:
        index: the FAISS index.
        factory: the factory string it was built from.
        meta: provenance (embedder fingerprint, texts hash) checked on load.
    """

    def __init__(self, index: faiss.Index, factory: str, meta: dict[str, Any] | None = None) -> None:
        self.index = index
        self.factory = factory
        self.meta = dict(meta or {})

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @classmethod
    def build(
        cls, vectors: np.ndarray, factory: str = "Flat", *, nprobe: int = 16, ef_search: int = 128,
        meta: dict[str, Any] | None = None,
    ) -> ItemIndex:
        """Build (and train, for IVF/PQ; FAISS k-means is seeded, so builds repeat) an index over `vectors` `(n_items, dim)`.

        Raises:
            ConfigError: the factory string is invalid or needs more vectors than given.
        """
        faiss = _faiss()
        vectors = _as_matrix(vectors, "item vectors")
        n, dim = vectors.shape
        if n == 0:
            raise ValueError("cannot build an index over an empty catalogue (0 item vectors)")
        try:
            index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise ConfigError(
                f"index.factory={factory!r} is not a valid FAISS factory string for dimension {dim} "
                f"({str(exc).strip().splitlines()[-1]}); use Flat, HNSW32 or IVF<nlist>,PQ<m> with m dividing {dim}"
            ) from None
        if not index.is_trained:
            nlist = getattr(faiss.extract_index_ivf(index), "nlist", 0) if "IVF" in factory else 0
            if nlist and n < nlist:
                raise ConfigError(
                    f"index.factory={factory!r} needs at least {nlist} vectors to train {nlist} lists, got {n}; "
                    f"use IVF{max(1, int(np.sqrt(n)))} or Flat for a catalogue this small"
                )
            index.train(vectors)
        index.add(vectors)
        built = cls(index, factory, {"dim": dim, **(meta or {})})
        built.configure(nprobe=nprobe, ef_search=ef_search)
        return built

    def configure(self, *, nprobe: int = 16, ef_search: int = 128) -> None:
        """Set search-time knobs for IVF and HNSW indices."""
        faiss = _faiss()
        if "IVF" in self.factory:
            faiss.extract_index_ivf(self.index).nprobe = nprobe
        if "HNSW" in self.factory:
            hnsw = faiss.downcast_index(self.index)
            if hasattr(hnsw, "hnsw"):
                hnsw.hnsw.efSearch = ef_search

    def search(
        self, queries: np.ndarray, k: int, exclude: Sequence[Sequence[int]] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k items per query, skipping each query's excluded items.

        Args:
            queries: `(n_queries, dim)`.
            k: results per query.
            exclude: per query, item indices never returned (the user's history).

        Returns:
            `(scores, ids)`, both `(n_queries, k)`; slots that could not be filled hold -inf / -1.
        """
        queries = _as_matrix(queries, "query vectors", self.dim)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        exclude = exclude or [()] * len(queries)
        if len(exclude) != len(queries):
            raise ValueError(f"exclude must have one entry per query: {len(exclude)} for {len(queries)} queries")
        fetch = min(len(self), k + max((len(e) for e in exclude), default=0))
        raw_scores, raw_ids = self.index.search(queries, fetch)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        for row, banned in enumerate(exclude):
            keep = raw_ids[row] >= 0
            if len(banned):
                keep &= ~np.isin(raw_ids[row], np.asarray(banned, dtype=np.int64))
            found_ids, found_scores = raw_ids[row][keep][:k], raw_scores[row][keep][:k]
            ids[row, : len(found_ids)] = found_ids
            scores[row, : len(found_scores)] = found_scores
        return scores, ids

    def save(self, path: str | Path) -> Path:
        """Write the index and its metadata to one file, atomically."""
        faiss = _faiss()
        path = Path(path)
        header = json.dumps({"version": FORMAT_VERSION, "factory": self.factory, "meta": self.meta}).encode()
        with atomic_path(path) as tmp:
            with tmp.open("wb") as handle:
                np.savez(handle, header=np.frombuffer(header, dtype=np.uint8), index=faiss.serialize_index(self.index))
        return path

    @classmethod
    def load(cls, path: str | Path, *, expected_dim: int | None = None, expected_meta: dict[str, Any] | None = None) -> ItemIndex:
        """Read an index saved by `save`, checking it fits the caller's vectors.

        Raises:
            IndexMismatchError: wrong dimension or different provenance.
            FileNotFoundError / ValueError: missing or unreadable file.
        """
        faiss = _faiss()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"index file {path} does not exist; build it with `fedrec index build`")
        try:
            with np.load(path) as payload:
                header = json.loads(payload["header"].tobytes())
                index = faiss.deserialize_index(payload["index"])
        except (OSError, EOFError, KeyError, ValueError, RuntimeError, zipfile.BadZipFile) as exc:  # empty, truncated or not ours
            raise ValueError(f"{path} is not a fedrec index file ({type(exc).__name__}: {exc}); rebuild it with `fedrec index build`") from None
        loaded = cls(index, header["factory"], header.get("meta"))
        if expected_dim is not None and loaded.dim != expected_dim:
            raise IndexMismatchError(
                f"{path} was built for {loaded.dim}-dim vectors but the embedder gives {expected_dim}-dim; "
                "rebuild it with `fedrec index build`"
            )
        for key, value in (expected_meta or {}).items():
            if loaded.meta.get(key) != value:
                raise IndexMismatchError(
                    f"{path} was built with {key}={loaded.meta.get(key)!r}, expected {value!r}; "
                    "rebuild it with `fedrec index build`"
                )
        return loaded


def brute_force(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product with numpy (the reference FAISS results are checked against)."""
    scores = queries @ vectors.T
    if k < scores.shape[1]:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    top = np.take_along_axis(scores, part, axis=1)
    order = np.take_along_axis(part, np.argsort(-top, axis=1, kind="stable"), axis=1)
    return np.take_along_axis(scores, order, axis=1), order
