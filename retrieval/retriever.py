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
    client: int = 0
    """Which client asks: its local index answers."""


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

    def score_items(self, query: Query, items: Sequence[int]) -> np.ndarray:
        """`(len(items),)` retrieval scores of given items for one query (for caller-chosen candidates)."""
        raise NotImplementedError(f"{type(self).__name__} cannot score given candidates")


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

    def score_items(self, query: Query, items: Sequence[int]) -> np.ndarray:
        return self.query_vectors([query])[0] @ self.item_vectors[np.asarray(items, dtype=np.int64)].T

    def retrieve(self, query: Query, k: int) -> list[Candidate]:
        return self.retrieve_batch([query], k)[0]

    def retrieve_batch(self, queries: Sequence[Query], k: int) -> list[list[Candidate]]:
        scores, ids = self.index.search(self.query_vectors(queries), k, exclude=[q.history for q in queries])
        return [
            [Candidate(int(i), float(s)) for i, s in zip(row_ids, row_scores, strict=True) if i >= 0]
            for row_ids, row_scores in zip(ids, scores, strict=True)
        ]


class TowerRetriever(Retriever):
    """Retrieval with a trained tower: the history's tower query searched in the asking client's local FAISS index.

    Args:
        encode: histories → `(n, dim)` tower query vectors.
        item_vectors: `(n_items, dim)` the tower's item embeddings (what the indices hold).
        index_for: client id → that client's index over `item_vectors`.
        fallback: answers queries with an empty history (the tower has nothing to encode), e.g. zero-shot text retrieval.
    """

    def __init__(self, encode: Callable[[list[Sequence[int]]], np.ndarray], item_vectors: np.ndarray,
                 index_for: Callable[[int], ItemIndex], fallback: Retriever | None = None) -> None:
        self.encode = encode
        self.item_vectors = np.ascontiguousarray(item_vectors, dtype=np.float32)
        self.index_for = index_for
        self.fallback = fallback

    def score_items(self, query: Query, items: Sequence[int]) -> np.ndarray:
        if not len(query.history):
            if self.fallback is None:
                raise ValueError("an empty history has no tower query; give at least one item")
            return self.fallback.score_items(query, items)
        return self.encode([query.history])[0] @ self.item_vectors[np.asarray(items, dtype=np.int64)].T

    def retrieve(self, query: Query, k: int) -> list[Candidate]:
        return self.retrieve_batch([query], k)[0]

    def search(self, queries: Sequence[Query], k: int) -> tuple[np.ndarray, np.ndarray]:
        """`(scores, ids)`, each `(n, k)`, from each query's client index; history excluded; -inf / -1 where unfilled."""
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        vectors = self.encode([q.history for q in queries]) if queries else None
        for client in sorted({q.client for q in queries}):
            rows = [i for i, q in enumerate(queries) if q.client == client]
            s, i = self.index_for(client).search(vectors[rows], k, exclude=[queries[r].history for r in rows])
            scores[rows], ids[rows] = s, i
        return scores, ids

    def retrieve_batch(self, queries: Sequence[Query], k: int) -> list[list[Candidate]]:
        empty = [i for i, q in enumerate(queries) if not len(q.history)]
        if empty and self.fallback is None:
            raise ValueError(f"query {empty[0]} has an empty history and the tower has nothing to encode; give at least one item")
        out: list[list[Candidate]] = [[] for _ in queries]
        if empty:
            assert self.fallback is not None
            for row, found in zip(empty, self.fallback.retrieve_batch([queries[i] for i in empty], k), strict=True):
                out[row] = found
        skipped = set(empty)
        rows = [i for i in range(len(queries)) if i not in skipped]
        if rows:
            scores, ids = self.search([queries[i] for i in rows], k)
            for row, row_ids, row_scores in zip(rows, ids, scores, strict=True):
                out[row] = [Candidate(int(i), float(s)) for i, s in zip(row_ids, row_scores, strict=True) if i >= 0]
        return out

    def score_all(self, queries: Sequence[Query], n_items: int) -> np.ndarray:
        """`(n, n_items)` scores of every item through the FAISS search (k = all items), for full-ranking evaluation."""
        scores, ids = self.search(queries, n_items)
        out = np.full((len(queries), n_items), -np.inf, dtype=np.float64)
        rows, cols = np.nonzero(ids >= 0)
        out[rows, ids[rows, cols]] = scores[rows, cols]
        return out
