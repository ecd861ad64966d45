"""The retrieval contract and the zero-shot embedding retriever."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from retrieval.index import ItemIndex

QueryMode = Literal["profile", "history", "hybrid"]


@dataclass(frozen=True)
class Query:
    """What a client knows about its user when it asks for candidates."""

    history: Sequence[int] = field(default_factory=tuple)
    """Item indices, oldest first; never returned as candidates."""
    profile: str | None = None
    """The user's text profile."""


@dataclass(frozen=True)
class Candidate:
    """A retrieved item and its retrieval score."""

    item: int
    score: float


class Retriever(ABC):
    """One required method; `retrieve_batch` may be overridden when batching is cheaper."""

    @abstractmethod
    def retrieve(self, query: Query, k: int) -> list[Candidate]:
        """Top-k candidates for one query, best first."""

    def retrieve_batch(self, queries: Sequence[Query], k: int) -> list[list[Candidate]]:
        """Top-k candidates for each query."""
        return [self.retrieve(q, k) for q in queries]


def _unit(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms > 0, norms, 1.0)


class EmbeddingRetriever(Retriever):
    """Zero-shot retrieval: the query is the profile's embedding and/or pooled history item vectors.

    Args:
        index: FAISS index over `item_vectors`.
        item_vectors: `(n_items, dim)` item-text embeddings, row = item index.
        embed: turns profile texts into `(n, dim)` vectors (needed for `profile` and `hybrid`).
        mode: which query to build.
        history_weight: weight of the pooled history in `hybrid`.
        recency_decay: pooling weight ratio between consecutive items (1 = mean).
        max_history: most recent items pooled.
    """

    def __init__(
        self,
        index: ItemIndex,
        item_vectors: np.ndarray,
        embed: Callable[[list[str]], np.ndarray] | None = None,
        *,
        mode: QueryMode = "hybrid",
        history_weight: float = 0.5,
        recency_decay: float = 0.9,
        max_history: int = 50,
    ) -> None:
        if item_vectors.shape != (len(index), index.dim):
            raise ValueError(
                f"item_vectors has shape {item_vectors.shape} but the index holds ({len(index)}, {index.dim}); "
                "rebuild the index from these vectors"
            )
        if mode != "history" and embed is None:
            raise ValueError(f"retrieval.query={mode!r} embeds the profile and needs an embedder; pass embed=")
        self.index = index
        self.item_vectors = np.ascontiguousarray(item_vectors, dtype=np.float32)
        self.embed = embed
        self.mode = mode
        self.history_weight = history_weight
        self.recency_decay = recency_decay
        self.max_history = max_history

    def pooled_history(self, histories: Sequence[Sequence[int]]) -> np.ndarray:
        """`(n, dim)` recency-weighted mean of each history's item vectors (zeros for an empty history)."""
        out = np.zeros((len(histories), self.item_vectors.shape[1]), dtype=np.float32)
        for row, history in enumerate(histories):
            recent = np.asarray(history, dtype=np.int64)[-self.max_history :]
            if len(recent):
                weights = self.recency_decay ** np.arange(len(recent) - 1, -1, -1, dtype=np.float32)
                out[row] = weights @ self.item_vectors[recent] / weights.sum()
        return _unit(out)

    def query_vectors(self, queries: Sequence[Query]) -> np.ndarray:
        """`(n, dim)` unit query vectors."""
        pooled = self.pooled_history([q.history for q in queries])
        if self.mode == "history":
            return pooled
        missing = [i for i, q in enumerate(queries) if q.profile is None]
        if missing:
            raise ValueError(f"retrieval.query={self.mode!r} needs a profile; query {missing[0]} has none")
        assert self.embed is not None
        profile = _unit(np.asarray(self.embed([q.profile for q in queries]), dtype=np.float32))  # type: ignore[misc]
        if self.mode == "profile":
            return profile
        has_history = np.array([len(q.history) > 0 for q in queries])[:, None]
        weight = np.where(has_history, self.history_weight, 0.0).astype(np.float32)
        return _unit(weight * pooled + (1 - weight) * profile)

    def score_all(self, queries: Sequence[Query]) -> np.ndarray:
        """`(n, n_items)` exact scores for full-ranking evaluation (history not masked)."""
        return self.query_vectors(queries) @ self.item_vectors.T

    def retrieve(self, query: Query, k: int) -> list[Candidate]:
        return self.retrieve_batch([query], k)[0]

    def retrieve_batch(self, queries: Sequence[Query], k: int) -> list[list[Candidate]]:
        scores, ids = self.index.search(self.query_vectors(queries), k, exclude=[q.history for q in queries])
        return [
            [Candidate(int(i), float(s)) for i, s in zip(row_ids, row_scores, strict=True) if i >= 0]
            for row_ids, row_scores in zip(ids, scores, strict=True)
        ]
