"""Full-ranking and sampled evaluation, with ties that never favour the target.

Tie rule: a scorer's ties are ranked in expectation over uniformly random tie-breaking, so a
constant scorer gets chance-level metrics. The popularity baseline has no ties: it breaks them
by item id (lower id first).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from pipeline.data import Split
from pipeline.data.dataset import SplitName

if TYPE_CHECKING:
    from pipeline.recommender import Recommender

TIE_RULE = "ties ranked in expectation (uniform random tie-breaking); popularity breaks ties by item id"


class Scorer(Protocol):
    """Scores every item for a batch of users."""

    name: str

    def score(self, users: np.ndarray, histories: Sequence[np.ndarray]) -> np.ndarray:
        """`(len(users), n_items)` scores; higher is better."""
        ...


@dataclass
class PopularityScorer:
    """Interaction counts over everything visible before the target, ties broken by item id."""

    histories: Sequence[np.ndarray]
    n_items: int
    name: str = "popularity"

    def __post_init__(self) -> None:
        counts = np.bincount(np.concatenate([np.asarray(h) for h in self.histories]), minlength=self.n_items)
        # The id term is < 1, so it only orders items with equal counts: lower id first.
        self.scores = counts.astype(np.float64) + (1.0 - np.arange(self.n_items) / self.n_items) * 0.5

    def score(self, users: np.ndarray, histories: Sequence[np.ndarray]) -> np.ndarray:
        return np.broadcast_to(self.scores, (len(users), self.n_items))


@dataclass
class RandomScorer:
    """Uniform random scores (seeded per user, so results repeat)."""

    n_items: int
    seed: int = 0
    name: str = "random"

    def score(self, users: np.ndarray, histories: Sequence[np.ndarray]) -> np.ndarray:
        return np.stack([np.random.default_rng([self.seed, int(u)]).random(self.n_items) for u in users])


@dataclass
class FunctionScorer:
    """Wraps a `score(users, histories)` function, e.g. a retriever's exact scores."""

    name: str
    fn: Callable[[np.ndarray, Sequence[np.ndarray]], np.ndarray]

    def score(self, users: np.ndarray, histories: Sequence[np.ndarray]) -> np.ndarray:
        return self.fn(users, histories)


def rank_counts(scores: np.ndarray, targets: np.ndarray, exclude: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """For each row: items scoring strictly above the target, and items tying with it (target included).

    Args:
        scores: `(n, n_items)`.
        targets: `(n,)` target item per row.
        exclude: per row, items removed from the ranking (the user's history).
    """
    scores = np.array(scores, dtype=np.float64)
    rows = np.arange(len(targets))
    for row, banned in enumerate(exclude):
        scores[row, np.asarray(banned, dtype=np.int64)] = -np.inf
    target_scores = scores[rows, targets]
    if np.isneginf(target_scores).any():
        bad = int(np.argmax(np.isneginf(target_scores)))
        raise ValueError(f"row {bad}: the target item {targets[bad]} is in the excluded history or scored -inf")
    greater = (scores > target_scores[:, None]).sum(axis=1)
    ties = (scores == target_scores[:, None]).sum(axis=1)
    return greater, ties


def metrics_from_counts(greater: np.ndarray, ties: np.ndarray, ks: Sequence[int], *, max_rank: int) -> dict[str, np.ndarray]:
    """Per-user Recall@k, NDCG@k and MRR, in expectation over the order among tied items.

    With `g` items above the target and `t` tied (target included) the target sits at each of the
    0-based positions g .. g+t-1 with probability 1/t. `greater` may be +inf for a miss.
    """
    greater = np.asarray(greater, dtype=np.float64)
    ties = np.asarray(ties, dtype=np.float64)
    hit = np.isfinite(greater)
    g = np.where(hit, greater, 0).astype(np.int64)
    t = np.where(hit, ties, 1).astype(np.int64)
    top = max(max(ks), 1)
    discount = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(top) + 2))])
    harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, max_rank + 2))])
    out: dict[str, np.ndarray] = {}
    for k in ks:
        recall = np.clip(k - g, 0, t) / t
        ndcg = (discount[np.minimum(g + t, k)] - discount[np.minimum(g, k)]) / t
        out[f"R@{k}"] = np.where(hit, recall, 0.0)
        out[f"N@{k}"] = np.where(hit, ndcg, 0.0)
    mrr = (harmonic[np.minimum(g + t, max_rank + 1)] - harmonic[np.minimum(g, max_rank + 1)]) / t
    out["MRR"] = np.where(hit, mrr, 0.0)
    return out


def list_counts(ranked: Sequence[Sequence[int]], targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`rank_counts` for ranked lists without ties: position of the target, +inf when absent."""
    greater = np.full(len(targets), np.inf)
    for row, (items, target) in enumerate(zip(ranked, targets, strict=True)):
        where = np.flatnonzero(np.asarray(items) == target)
        if len(where):
            greater[row] = where[0]
    return greater, np.ones(len(targets))


def list_metrics(ranked: Sequence[Sequence[int]], targets: np.ndarray, ks: Sequence[int], n_items: int) -> dict[str, float]:
    """Mean Recall/NDCG@k and MRR of ranked lists (a target not in its list counts as 0)."""
    greater, ties = list_counts(ranked, targets)
    return {k: float(v.mean()) for k, v in metrics_from_counts(greater, ties, ks, max_rank=n_items).items()}


def sample_negatives(sequences: Sequence[np.ndarray], n_items: int, n_negatives: int, seed: int) -> np.ndarray:
    """`(n_users, n_negatives)` items each user never interacted with, drawn uniformly without replacement."""
    out = np.empty((len(sequences), n_negatives), dtype=np.int64)
    for user, seq in enumerate(sequences):
        pool = np.setdiff1d(np.arange(n_items), seq, assume_unique=False)
        if len(pool) < n_negatives:
            raise ValueError(
                f"user index {user} has only {len(pool)} unseen items, fewer than eval.sampled_negatives="
                f"{n_negatives}; lower eval.sampled_negatives"
            )
        out[user] = np.random.default_rng([seed, user]).choice(pool, n_negatives, replace=False)
    return out


@dataclass
class Result:
    """Mean metrics of one scorer on one split."""

    model: str
    split: str
    users: int
    metrics: dict[str, float]
    extra: dict[str, float] = field(default_factory=dict)

    def row(self) -> dict[str, float | str | int]:
        return {"model": self.model, "split": self.split, "users": self.users, **self.metrics, **self.extra}


def evaluate_scorer(
    scorer: Scorer,
    split: Split,
    split_name: SplitName,
    n_items: int,
    *,
    ks: Sequence[int] = (5, 10, 20),
    users: np.ndarray | None = None,
    negatives: np.ndarray | None = None,
    ceiling_n: int | None = None,
    batch_size: int = 256,
    progress: Callable[[int], None] | None = None,
) -> Result:
    """Full ranking over all items (history excluded), plus the sampled track when `negatives` is given.

    Args:
        negatives: `(n_users, n_neg)` sampled negatives for HR@10/NDCG@10 over 1 + n_neg items.
        ceiling_n: also report Recall@N of the full ranking, the ceiling for reranking N candidates.
        progress: called with the number of users finished after each batch.
    """
    targets_all = split.targets(split_name)
    histories_all = split.histories(split_name)
    users = np.arange(len(targets_all)) if users is None else np.asarray(users)
    ks_requested = sorted(set(ks))
    ks = sorted(set(ks) | ({ceiling_n} if ceiling_n else set()))
    sums: dict[str, float] = {}
    for start in range(0, len(users), batch_size):
        batch = users[start : start + batch_size]
        histories = [histories_all[u] for u in batch]
        scores = np.asarray(scorer.score(batch, histories))
        if scores.shape != (len(batch), n_items):
            raise ValueError(f"scorer {scorer.name} returned shape {scores.shape}, expected ({len(batch)}, {n_items})")
        greater, ties = rank_counts(scores, targets_all[batch], histories)
        for key, values in metrics_from_counts(greater, ties, ks, max_rank=n_items).items():
            sums[key] = sums.get(key, 0.0) + float(values.sum())
        if negatives is not None:
            columns = np.concatenate([targets_all[batch, None], negatives[batch]], axis=1)
            sampled = np.take_along_axis(scores, columns, axis=1)
            g, t = rank_counts(sampled, np.zeros(len(batch), dtype=np.int64), [()] * len(batch))
            for key, values in metrics_from_counts(g, t, [10], max_rank=columns.shape[1]).items():
                if key in ("R@10", "N@10"):
                    name = "sampled_HR@10" if key == "R@10" else "sampled_N@10"
                    sums[name] = sums.get(name, 0.0) + float(values.sum())
        if progress:
            progress(len(batch))
    means = {key: value / len(users) for key, value in sums.items()}
    requested = {f"R@{k}" for k in ks_requested} | {f"N@{k}" for k in ks_requested} | {"MRR"}
    metrics = {k: v for k, v in means.items() if k in requested}
    extra = {k: v for k, v in means.items() if k.startswith("sampled")}
    if ceiling_n:
        extra[f"ceiling_R@{ceiling_n}"] = means[f"R@{ceiling_n}"]
    return Result(scorer.name, split_name, len(users), metrics, extra)


def chance_recall(k: int, n_candidates: int) -> float:
    """Expected Recall@k of a ranking that carries no information."""
    return min(k, n_candidates) / n_candidates


def chance_ndcg(k: int, n_candidates: int) -> float:
    """Expected NDCG@k of a ranking that carries no information."""
    return sum(1.0 / math.log2(p + 2) for p in range(min(k, n_candidates))) / n_candidates


def evaluate_recommender(rec: Recommender, *, stage: str = "retrieval", progress: bool = False) -> dict:
    """Evaluate the configured baselines (and the pipeline stage) on the configured splits.

    Returns:
        A JSON-ready report: dataset, protocol, tie rule and one row per (model, split).
    """
    from pipeline.ui import rate_progress

    if stage not in ("retrieval", "rerank"):
        raise ValueError(f"--stage {stage!r} is not available; use --stage retrieval or --stage rerank")
    if stage == "rerank":
        return evaluate_rerank(rec, progress=progress)
    cfg = rec.cfg.eval
    data = rec.dataset
    users = np.arange(data.n_users if cfg.max_users is None else min(cfg.max_users, data.n_users))
    negatives = sample_negatives([data.sequences[u] for u in range(data.n_users)], data.n_items, cfg.sampled_negatives, cfg.seed)
    rows = []
    with rate_progress("users", enabled=progress) as bar:
        for split_name in cfg.splits:
            scorers: list[tuple[Scorer, int | None]] = []
            for name in cfg.baselines:
                if name == "popularity":
                    scorers.append((PopularityScorer(rec.split.histories(split_name), data.n_items), None))
                elif name == "random":
                    scorers.append((RandomScorer(data.n_items, cfg.seed), None))
                elif name == "text":
                    scorer = FunctionScorer(f"text:{rec.cfg.retrieval.query}", lambda u, h, s=split_name: rec.text_scores(u, s))
                    scorers.append((scorer, rec.cfg.retrieval.num_candidates))
            if rec.trained is not None:
                scorer = FunctionScorer(f"tower (run, round {rec.trained.best_round})", lambda u, h, s=split_name: rec.score_users(u, s))
                scorers.append((scorer, rec.cfg.retrieval.num_candidates))
            for scorer, ceiling in scorers:
                task = bar.add_task(f"{split_name}: {scorer.name}", total=len(users))
                result = evaluate_scorer(
                    scorer, rec.split, split_name, data.n_items, ks=cfg.ks, users=users, negatives=negatives,
                    ceiling_n=ceiling, batch_size=cfg.batch_size, progress=lambda n, t=task: bar.advance(t, n),
                )
                rows.append(result.row())
    return _report(rec, users, stage, rows)


def _report(rec: Recommender, users: np.ndarray, stage: str, rows: list[dict], **extra: object) -> dict:
    data, cfg = rec.dataset, rec.cfg.eval
    return {
        "dataset": data.name,
        "users": int(len(users)),
        "items": data.n_items,
        "interactions": data.n_interactions,
        "protocol": "full ranking over all items, user history excluded; leave-one-out by (timestamp, item id)",
        "sampled_track": f"1 positive + {cfg.sampled_negatives} sampled unseen negatives (seed {cfg.seed})",
        "tie_rule": TIE_RULE,
        "stage": stage,
        "retrieval": rec.retrieval_source,
        "rows": rows,
        **extra,
    }


def _list_result(name: str, split: str, ranked: Sequence[Sequence[int]], targets: np.ndarray, ks: Sequence[int], n_items: int, ceiling: float) -> dict:
    metrics = list_metrics(ranked, targets, ks, n_items)
    return Result(name, split, len(targets), metrics, {f"ceiling_R@{len(ranked[0]) if ranked else 0}": ceiling}).row()


def evaluate_rerank(rec: Recommender, *, progress: bool = False) -> dict:
    """Rerank the retrieved candidates with the LLM and evaluate over all users.

    A user whose target was not retrieved counts as a miss. The fusion weight is chosen on the
    validation split (unless `rerank.fusion_weight` fixes it) and saved for `fedrec recommend`;
    weight 0 is the retrieval order, so the chosen weight never scores below retrieval on validation.
    """
    import time

    from pipeline.io import write_json
    from pipeline.rerank import VerbalizerReranker, choose_fusion_weight, fuse, order_by
    from pipeline.ui import rate_progress

    cfg = rec.cfg.eval
    data = rec.dataset
    users = np.arange(data.n_users if cfg.max_users is None else min(cfg.max_users, data.n_users))
    reranker = rec.reranker(fusion_weight=1.0)
    splits = ["valid", *[s for s in cfg.splits if s != "valid"]] if rec.cfg.rerank.fusion_weight is None else list(cfg.splits)
    requests, llm, seconds = {}, {}, {}
    with rate_progress("users", enabled=progress) as bar:
        for split_name in splits:
            requests[split_name] = rec.rerank_requests(users, split_name)
            task = bar.add_task(f"rerank {split_name}", total=len(users))
            scores, start = [], time.perf_counter()
            for begin in range(0, len(users), 16):
                chunk = requests[split_name][begin : begin + 16]
                if isinstance(reranker, VerbalizerReranker):
                    scores += reranker.llm_scores(chunk)
                else:
                    scores += [_listwise_scores(r) for r in reranker.rerank_batch(chunk)]
                bar.advance(task, len(chunk))
            llm[split_name], seconds[split_name] = scores, time.perf_counter() - start
    weight = rec.cfg.rerank.fusion_weight
    table = None
    if weight is None:
        valid_targets = rec.split.targets("valid")[users]
        weight, table = choose_fusion_weight(requests["valid"], llm["valid"], valid_targets, rec.cfg.rerank.fusion_grid)
        write_json(rec.fusion_path(), {"weight": weight, "ndcg@10_by_weight": table, "users": int(len(users))})
    rows = []
    method = rec.cfg.rerank.method
    for split_name in cfg.splits:
        targets = rec.split.targets(split_name)[users]
        reqs, scores = requests[split_name], llm[split_name]
        items = [[c.item for c in r.candidates] for r in reqs]
        ceiling = float(np.mean([t in i for t, i in zip(targets, items, strict=True)]))
        n = rec.cfg.retrieval.num_candidates
        variants = [(f"retrieval top-{n}", 0.0), (f"{method}", 1.0), (f"{method}+fusion {weight:g}", weight)]
        for name, w in variants:
            ranked = [[i[j] for j in order_by(fuse(np.array([c.score for c in r.candidates]), sc, w))] for r, sc, i in zip(reqs, scores, items, strict=True)]
            row = _list_result(name, split_name, ranked, targets, cfg.ks, data.n_items, ceiling)
            if w:
                row["users_per_s"] = len(users) / seconds[split_name]
            rows.append(row)
    trained = rec.trained is not None and rec.trained.has_soft_prompt and rec.cfg.rerank.method == "verbalizer"
    prompt = f"the run's trained soft prompt (round {rec.trained.best_round})" if trained else "the zero-shot prompt"
    return _report(rec, users, "rerank", rows, fusion_weight=weight, fusion_table=table, backend=rec.backend.describe(), prompt=prompt)


def _listwise_scores(ranked: Sequence) -> np.ndarray:
    """Listwise output as per-candidate scores in retrieval order (higher = ranked earlier)."""
    scores = np.zeros(len(ranked))
    for position, item in enumerate(ranked):
        scores[item.retrieval_rank] = -position
    return scores


def evaluate_state(rec: Recommender, state: dict[str, np.ndarray], split: str, users: np.ndarray | None = None) -> dict[str, float]:
    """Full-ranking metrics of a tower state on `split` (exact scores: the per-round validation)."""
    from retrieval.tower import RetrievalTower

    tower = RetrievalTower.from_arrays(rec.item_vectors, rec.cfg.tower, state)
    items = tower.item_matrix()
    scorer = FunctionScorer("tower", lambda u, histories: tower.encode(histories) @ items.T)
    return evaluate_scorer(scorer, rec.split, split, rec.dataset.n_items, ks=rec.cfg.eval.ks, users=users).metrics


def evaluate_served(rec: Recommender, split: str, users: np.ndarray) -> dict[str, float]:
    """Full-ranking metrics of what `rec` serves: the tower query searched in each user's client FAISS index."""
    scorer = FunctionScorer("tower", lambda u, h: rec.score_users(u, split))
    return evaluate_scorer(scorer, rec.split, split, rec.dataset.n_items, ks=rec.cfg.eval.ks, users=users).metrics


def evaluate_rerank_served(rec: Recommender, split: str, users: np.ndarray, clients: list[np.ndarray] | None = None, *,
                           personal: Callable[[int], dict[str, np.ndarray]] | None = None) -> dict[str, Any]:
    """The served candidates (tower → client FAISS index) reranked with the run's soft prompt and item tokens
    (misses count as 0).

    With `personal` (partition → that client's personal tokens, read where the client's data is), each client's
    users are reranked with its own tokens. With `clients`,
    the result also has `by_client`: each client's mean metrics over its users.
    """
    assert rec.trained is not None
    cfg = rec.cfg
    requests = dict(zip(users.tolist(), rec.rerank_requests(users, split), strict=True))
    wanted = set(users.tolist())
    groups = [(i, np.array([u for u in c if u in wanted], dtype=np.int64)) for i, c in enumerate(clients or [users])]
    groups = [(i, g) for i, g in groups if len(g)]
    ranked: dict[int, list[int]] = {}
    for partition, members in groups:
        reranker = rec.trained.reranker(rec, personal=personal(partition) if clients and personal else None)
        for u, result in zip(members.tolist(), reranker.rerank_batch([requests[int(u)] for u in members]), strict=True):
            ranked[u] = [x.item for x in result]
    order = np.array(sorted(ranked), dtype=np.int64)
    greater, ties = list_counts([ranked[u] for u in order.tolist()], rec.split.targets(split)[order])
    per_user = metrics_from_counts(greater, ties, cfg.eval.ks, max_rank=rec.dataset.n_items)
    out: dict[str, Any] = {k: float(v.mean()) for k, v in per_user.items()}
    if clients:
        position = {u: i for i, u in enumerate(order.tolist())}
        out["by_client"] = [{"client": p, "users": len(g), **{k: float(v[[position[u] for u in g.tolist()]].mean()) for k, v in per_user.items()}}
                            for p, g in groups]
    return out
