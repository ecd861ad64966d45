"""The end-to-end recommender: history → tower query → the client's local FAISS index → (LLM rerank) → ranked items.

With a trained run (`fedrec train`), retrieval is the run's tower over each client's local index of
the tower's item embeddings, and reranking uses the run's soft prompt when it has one. With no run,
retrieval falls back to zero-shot text embeddings and says so (`retrieval_source`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from pipeline.config import FedrecConfig
from pipeline.data import Dataset, load_dataset, partition_users
from pipeline.data.dataset import SplitName
from pipeline.errors import RequestError, show_ids
from pipeline.llm.base import resolve_dtype
from pipeline.profile import build_profile
from retrieval import Candidate, EmbeddingRetriever, ItemIndex, Query, Retriever, TextEmbedder, TowerRetriever

if TYPE_CHECKING:
    import torch

    from pipeline.explain import Explanation, Pick, Space
    from pipeline.llm.base import LLMBackend
    from pipeline.rerank import Reranker, RerankRequest
    from pipeline.trained import TrainedRun

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recommendation:
    """One recommended item."""

    rank: int
    item_id: object
    title: str
    score: float
    retrieval_rank: int | None = None
    """1-based position before reranking (None when not reranked)."""
    llm_score: float | None = None
    """Label log-probability from the LLM (None when not reranked)."""


class Recommender:
    """Holds the dataset, the item embeddings and the index; answers per-user queries.

    Build it with `Recommender.from_config`; heavy parts (embedder, item vectors, index, run) load on
    first use and come from the cache when their inputs have not changed.

    Args:
        run: a `fedrec train` folder to serve, `"auto"` for the newest run made for this dataset, tower and LLM
            (zero-shot text retrieval when there is none), or None for zero-shot text retrieval.
    """

    def __init__(self, cfg: FedrecConfig, dataset: Dataset, *, progress: bool = False, run: Path | str | None = "auto") -> None:
        self.cfg = cfg
        self.dataset = dataset
        self.progress = progress
        self.cache_dir = cfg.resolved_cache_dir()
        self.run_spec = run
        self._warned_untuned = False

    @classmethod
    def from_config(cls, cfg: FedrecConfig, *, progress: bool = False, run: Path | str | None = "auto") -> Recommender:
        """Load the dataset named by `cfg` (nothing heavy yet)."""
        return cls(cfg, load_dataset(cfg.data, cfg.resolved_cache_dir()), progress=progress, run=run)

    @cached_property
    def trained(self) -> TrainedRun | None:
        """The run this recommender serves (see `run`), checked against the config; None = zero-shot text retrieval."""
        from pipeline.trained import find_run, load_trained

        if self.run_spec is None:
            return None
        folder = find_run(self) if self.run_spec == "auto" else Path(self.run_spec)
        return load_trained(folder, self) if folder is not None else None

    def _sharing(self, cfg: FedrecConfig, run: Path | str | None, *shared: str) -> Recommender:
        """A recommender over the same dataset that reuses this one's loaded parts named in `shared` (when loaded)."""
        other = Recommender(cfg, self.dataset, progress=self.progress, run=run)
        other.__dict__.update({k: self.__dict__[k] for k in ("split", "embedder", "item_texts", "item_vectors", "backend", *shared)
                               if k in self.__dict__})
        return other

    def with_run(self, run: TrainedRun) -> Recommender:
        """This recommender (same dataset and caches) serving `run`."""
        served = self._sharing(self.cfg, run.folder)
        served.trained = run
        return served

    def with_cfg(self, cfg: FedrecConfig) -> Recommender:
        """This recommender (same dataset, caches and run) under another config (e.g. fewer evaluation users)."""
        return self._sharing(cfg, self.run_spec, "trained")

    @property
    def retrieval_source(self) -> str:
        """Where candidates come from, in words (shown by every entry point)."""
        if self.trained is not None:
            return self.trained.describe()
        return "zero-shot text retrieval (no trained run for this dataset and tower; `fedrec train` makes one)"

    @cached_property
    def client_of(self) -> np.ndarray:
        """`(n_users,)` the client (partition) holding each user."""
        owner = np.zeros(self.dataset.n_users, dtype=np.int64)
        for client, users in enumerate(partition_users(self.dataset, self.split.train(), self.cfg.partition)):
            owner[users] = client
        return owner

    @cached_property
    def split(self):  # noqa: ANN201 - pipeline.data.Split
        return self.dataset.split()

    @cached_property
    def embedder(self) -> TextEmbedder:
        e = self.cfg.embedder
        return TextEmbedder(
            e.model, batch_size=e.batch_size, normalize=e.normalize,
            cache_dir=self.cache_dir / "embeddings", device=e.device,
        )

    @cached_property
    def item_texts(self) -> list[str]:
        return self.dataset.catalog.texts(max_tags=self.cfg.data.max_tags if self.cfg.data.use_tags else 0)

    @cached_property
    def item_vectors(self) -> np.ndarray:
        """`(n_items, dim)` item-text embeddings."""
        return self.embedder.encode(self.item_texts, progress=self.progress, description="embed items")

    def index_key(self) -> str:
        """Hash of what the index depends on: embedder, item texts and factory string."""
        payload = json.dumps([self.embedder.cache_key(self.item_texts), self.cfg.index.factory])
        return hashlib.sha256(payload.encode()).hexdigest()[:24]

    def index_path(self, client: int | None = None) -> Path:
        """Cache location of the catalogue index, or of one client's local copy."""
        name = "catalog.faiss" if client is None else f"client-{client}.faiss"
        return self.cache_dir / "indexes" / self.index_key() / name

    @cached_property
    def index(self) -> ItemIndex:
        """The catalogue index, loaded from the cache or built."""
        return self.build_index(self.index_path())

    def build_index(self, path: Path, *, rebuild: bool = False) -> ItemIndex:
        """Load the index at `path` if it matches the current vectors, else build and save it."""
        meta = {"key": self.index_key(), "n_items": self.dataset.n_items}
        if path.is_file() and not rebuild:
            try:
                return ItemIndex.load(path, expected_dim=self.item_vectors.shape[1], expected_meta=meta)
            except (ValueError, OSError) as exc:
                log.warning("rebuilding %s: %s", path, exc)
        c = self.cfg.index
        index = ItemIndex.build(self.item_vectors, c.factory, nprobe=c.nprobe, ef_search=c.ef_search, meta=meta)
        index.save(path)
        return index

    def client_indices(self, *, rebuild: bool = False) -> dict[int, Path]:
        """One local index file per client of the configured partition.

        At zero shot every client indexes the same public item texts; each keeps its own copy
        because training later changes its item vectors.
        """
        clients = partition_users(self.dataset, self.split.train(), self.cfg.partition)
        paths = {}
        for client in range(len(clients)):
            path = self.index_path(client)
            self.build_index(path, rebuild=rebuild)
            paths[client] = path
        return paths

    @cached_property
    def retriever(self) -> Retriever:
        """The run's tower over each client's local index, or zero-shot text retrieval without a run."""
        if self.trained is None:
            return self.text_retriever
        return TowerRetriever(self.trained.tower.encode, self.trained.item_embeddings, self.trained.index, fallback=self.text_retriever)

    @cached_property
    def text_retriever(self) -> EmbeddingRetriever:
        """Zero-shot retrieval over MiniLM item-text vectors (the baseline, and the fallback for an empty history)."""
        r = self.cfg.retrieval
        return EmbeddingRetriever(
            self.index, self.item_vectors, self.embedder.encode, mode=r.query,
            history_weight=r.history_weight, recency_decay=r.recency_decay, max_history=r.max_history,
        )

    def profile(self, user: int, split: SplitName = "test") -> str:
        """The text profile of user index `user` from what precedes the split's target."""
        history = self.split.histories(split)[user]
        return self.text_profile(history, self.dataset.ratings[user][: len(history)])

    def text_profile(self, history: Sequence[int], ratings: Sequence[float] | None = None) -> str:
        """The text profile of any history (item indices, oldest first), bounded in the embedder's tokens."""
        return build_profile(history, self.dataset.catalog, self.cfg.profile, ratings=ratings, count_tokens=self.embedder.count_tokens)

    def queries(self, users: np.ndarray, split: SplitName = "test", *, text: bool = False) -> list[Query]:
        """Each user's query for its own client; `text`: with the profile the text retriever needs."""
        histories = self.split.histories(split)
        needs_profile = (text or self.trained is None) and self.cfg.retrieval.query != "history"
        return [Query(tuple(histories[u].tolist()), self.profile(u, split) if needs_profile else None, int(self.client_of[u]))
                for u in users]

    def score_users(self, users: np.ndarray, split: SplitName = "test") -> np.ndarray:
        """`(len(users), n_items)` scores of the serving retriever for full-ranking evaluation (through FAISS with a run)."""
        if isinstance(self.retriever, TowerRetriever):
            return self.retriever.score_all(self.queries(users, split), self.dataset.n_items)
        return self.text_scores(users, split)

    def text_scores(self, users: np.ndarray, split: SplitName = "test") -> np.ndarray:
        """`(len(users), n_items)` exact zero-shot text retrieval scores."""
        return self.text_retriever.score_all(self.queries(users, split, text=True))

    def candidates(self, users: np.ndarray, split: SplitName = "test") -> list[list[Candidate]]:
        """Top `retrieval.num_candidates` unseen items per user from the local index."""
        return self.retriever.retrieve_batch(self.queries(users, split), self.cfg.retrieval.num_candidates)

    def rerank_requests(self, users: np.ndarray, split: SplitName = "test") -> list[RerankRequest]:
        """Profile, history and retrieved candidates of each user, ready for the reranker."""
        from pipeline.rerank import RerankRequest

        histories = self.split.histories(split)
        return [
            RerankRequest(self.profile(int(u), split), tuple(histories[u].tolist()), tuple(cands))
            for u, cands in zip(users, self.candidates(users, split), strict=True)
        ]

    @cached_property
    def backend(self) -> LLMBackend:
        """The configured LLM backend (loaded on first use)."""
        from pipeline.llm.factory import make_backend

        return make_backend(self.cfg.llm, self.cache_dir)

    def fusion_key(self) -> str:
        """Hash of everything a tuned fusion weight depends on."""
        run = self.trained.manifest.get("files", {}).get("best.npz") if self.trained is not None else None
        llm = self.cfg.llm
        parts = [self.index_key(), run, llm.model, resolve_dtype(llm.dtype, llm.device), self.cfg.rerank.model_dump_json(exclude={"fusion_weight"}),
                 self.cfg.retrieval.model_dump_json(), self.cfg.profile.model_dump_json()]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]

    def fusion_path(self) -> Path:
        return self.cache_dir / "fusion" / f"{self.fusion_key()}.json"

    def fusion_weight(self) -> float:
        """The configured weight, else the one tuned on validation by `fedrec evaluate --stage rerank`, else 1 (LLM only)."""
        if self.cfg.rerank.fusion_weight is not None:
            return self.cfg.rerank.fusion_weight
        if self.fusion_path().is_file():
            return float(json.loads(self.fusion_path().read_text())["weight"])
        if not self._warned_untuned:
            log.warning("no fusion weight tuned for this setup yet (run `fedrec evaluate --stage rerank`); using the LLM score alone")
            self._warned_untuned = True
        return 1.0

    def reranker(self, *, soft_prompt: torch.Tensor | None = None, fusion_weight: float | None = None, trained: bool = True) -> Reranker:
        """The configured reranker over this recommender's catalogue and backend: with the run's soft prompt and item
        tokens when the run has them (and `trained`), else the zero-shot prompt (or the given `soft_prompt`)."""
        from pipeline.rerank import ListwiseReranker, PromptBuilder, VerbalizerReranker

        builder = PromptBuilder(self.backend, self.dataset.catalog, self.cfg.rerank)
        if self.cfg.rerank.method == "listwise":
            return ListwiseReranker(self.backend, builder)
        weight = self.fusion_weight() if fusion_weight is None else fusion_weight
        if trained and soft_prompt is None and self.trained is not None and self.trained.has_soft_prompt:
            return self.trained.reranker(self, fusion_weight=weight)
        return VerbalizerReranker(self.backend, builder, fusion_weight=weight, soft_prompt=soft_prompt)

    def request(
        self, *, user_id: object = None, history: Sequence[object] | None = None, ratings: Sequence[float | None] | None = None,
        candidates: Sequence[object] | None = None, split: SplitName | None = None,
    ) -> RerankRequest:
        """One rerank request from outside input; every id from a batch row, an API call or Python is checked here, once.

        Args:
            user_id: an existing user: their history before `split`'s target item (all of it when `split` is None).
            history: instead of `user_id`, raw item ids the user liked, oldest first (answered by client 0's index).
            ratings: one rating (or None) per `history` item.
            candidates: raw item ids to rerank (scored by the retriever); retrieved when None.

        Raises:
            DataError: `user_id` is not in the dataset.
            RequestError: naming the field: both or neither of user_id and history, unknown or duplicate ids, empty
                lists, more candidates than labels.
        """
        from pipeline.rerank import RerankRequest
        from prompts import labels_for

        if (user_id is None) == (history is None):
            raise RequestError("user_id", "give exactly one of user_id (an existing user) or history (item ids, oldest first)")
        if history is not None:
            items = self._known_items("history", history)
            if ratings is not None and len(ratings) != len(items):
                raise RequestError("ratings", f"{len(ratings)} ratings for {len(items)} history items; give one per item (or none)")
            values = np.array([np.nan if r is None else r for r in ratings], dtype=np.float64) if ratings is not None else None
            if values is not None and not np.isfinite(values[~np.isnan(values)]).all():
                raise RequestError("ratings", "ratings must be finite numbers (or null)")
            client = 0
        else:
            user = self.dataset.user_index(user_id)
            items = self.dataset.sequences[user] if split is None else self.split.histories(split)[user]
            values, client = self.dataset.ratings[user][: len(items)], int(self.client_of[user])
        profile = self.text_profile(items, values)
        query = Query(tuple(int(i) for i in items), profile, client)
        if candidates is None:
            found = self.retriever.retrieve(query, self.cfg.retrieval.num_candidates)
        else:
            wanted = self._known_items("candidates", candidates)
            counts = Counter(wanted)
            if len(counts) < len(wanted):  # 3 and "3" name one item too
                repeated = [raw for raw, i in zip(candidates, wanted, strict=True) if counts[i] > 1]
                raise RequestError("candidates", f"has duplicate item ids {show_ids(list(dict.fromkeys(repeated)))}; list each item once")
            scores = self.retriever.score_items(query, wanted)
            found = [Candidate(i, float(s)) for i, s in zip(wanted, scores, strict=True)]
        try:
            labels_for(len(found), self.cfg.rerank.label_set)
        except ValueError as exc:
            raise RequestError("candidates", str(exc)) from None
        return RerankRequest(profile, query.history, tuple(found))

    def _known_items(self, field: str, raw_ids: Sequence[object]) -> list[int]:
        if not raw_ids:
            raise RequestError(field, "is empty; list at least one item id (or omit it)")
        cat = self.dataset.catalog
        found = [cat.index_of(i) for i in raw_ids]
        unknown = [i for i, j in zip(raw_ids, found, strict=True) if j is None]
        if unknown:
            raise RequestError(field, f"has {len(unknown)} item id(s) not in {self.dataset.name}: {show_ids(unknown)}; use ids from the catalogue")
        return found  # type: ignore[return-value]

    def recommend(self, user_id: object, k: int = 10, split: SplitName = "test", *, rerank: bool = False) -> list[Recommendation]:
        """Top-k unseen items for a user id of the dataset, optionally reranked by the LLM."""
        user = np.array([self.dataset.user_index(user_id)])
        cat = self.dataset.catalog
        if not rerank:
            found = self.retriever.retrieve(self.queries(user, split)[0], k)
            return [Recommendation(r + 1, cat.item_id(c.item), cat.label(c.item), c.score) for r, c in enumerate(found)]
        ranked = self.reranker().rerank(self.rerank_requests(user, split)[0])[:k]
        return [
            Recommendation(r + 1, cat.item_id(x.item), cat.label(x.item), x.score, x.retrieval_rank + 1, x.llm_score)
            for r, x in enumerate(ranked)
        ]

    def explanation_space(self) -> tuple[Space, np.ndarray]:
        """The space picks are explained in, and its `(n_items, dim)` item vectors: the served run's tower, else the item texts."""
        if self.trained is not None:
            return "tower", self.trained.item_embeddings
        return "text", self.item_vectors

    def explain_picks(self, history: Sequence[int], picks: Sequence[Pick], *, mode: Literal["template", "llm"] | None = None) -> list[Explanation]:
        """Each pick's grounded facts (nearest history items, shared genres, rank movement) and one sentence stating them.

        Args:
            history: the user's item indices, oldest first.
            picks: the recommended items, best first.
            mode: `template` or `llm` (default: `rerank.explain_mode`).
        """
        from pipeline.explain import explain_picks, pick_facts

        space, vectors = self.explanation_space()
        facts = pick_facts(self.dataset.catalog, vectors, space, history, picks)
        mode = mode or self.cfg.rerank.explain_mode
        if mode == "template":
            return explain_picks(facts, mode)
        return explain_picks(facts, mode, backend=self.backend, cfg=self.cfg.rerank, catalog=self.dataset.catalog)

    def explain(self, user_id: object, picks: Sequence[Recommendation | str], split: SplitName = "test") -> str:
        """Grounded sentences on why `picks` (from `recommend`, or their titles) suit the user, one per pick.

        Raises:
            DataError: `user_id` is not in the dataset.
            RequestError: a title is not in the catalogue.
        """
        from pipeline.explain import Pick

        cat = self.dataset.catalog
        history = self.split.histories(split)[self.dataset.user_index(user_id)]
        found: list[Pick] = []
        by_label = {cat.label(i): i for i in range(len(cat))} if any(isinstance(p, str) for p in picks) else {}
        for rank, p in enumerate(picks, start=1):
            if isinstance(p, str):
                if p not in by_label:
                    raise RequestError("picks", f"title {p!r} is not in {self.dataset.name}; give titles as `recommend` prints them")
                found.append(Pick(by_label[p], rank, reranked=None))
            else:
                item = cat.index_of(p.item_id)
                if item is None:
                    raise RequestError("picks", f"item id {p.item_id!r} is not in {self.dataset.name}; use ids from the catalogue")
                found.append(Pick(item, p.rank, p.retrieval_rank, reranked=p.retrieval_rank is not None))
        lines = []
        for e in self.explain_picks(history.tolist(), found):
            lines.append(e.sentence + (f" [{e.fallback}]" if e.fallback else ""))
        return "\n".join(lines)
