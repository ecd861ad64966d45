"""The evaluator: exact expectations over ties, chance for uninformative scorers, baselines."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import Split
from pipeline.evaluate import (
    FunctionScorer,
    PopularityScorer,
    RandomScorer,
    chance_ndcg,
    chance_recall,
    evaluate_scorer,
    list_counts,
    metrics_from_counts,
    rank_counts,
    sample_negatives,
)


def _brute_expectation(scores: np.ndarray, target: int, k: int) -> tuple[float, float, float]:
    """Average Recall@k, NDCG@k and RR over every order of the tied items (the definition)."""
    tied = [i for i in range(len(scores)) if scores[i] == scores[target]]
    above = int((scores > scores[target]).sum())
    recalls, ndcgs, rrs = [], [], []
    for perm in itertools.permutations(tied):
        pos = above + perm.index(target)
        recalls.append(1.0 if pos < k else 0.0)
        ndcgs.append(1 / math.log2(pos + 2) if pos < k else 0.0)
        rrs.append(1 / (pos + 1))
    return float(np.mean(recalls)), float(np.mean(ndcgs)), float(np.mean(rrs))


@pytest.mark.parametrize("seed", range(6))
def test_tie_expectation_matches_enumeration(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 3, size=8).astype(float)
    target = int(rng.integers(0, 8))
    greater, ties = rank_counts(scores[None], np.array([target]), [()])
    for k in (1, 2, 3, 5):
        m = metrics_from_counts(greater, ties, [k], max_rank=8)
        r, n, rr = _brute_expectation(scores, target, k)
        assert m[f"R@{k}"][0] == pytest.approx(r)
        assert m[f"N@{k}"][0] == pytest.approx(n)
        assert m["MRR"][0] == pytest.approx(rr)


def _toy_split(n_users: int = 50, n_items: int = 40, seed: int = 0) -> Split:
    rng = np.random.default_rng(seed)
    return Split([rng.choice(n_items, size=rng.integers(3, 12), replace=False) for _ in range(n_users)])


def test_constant_scorer_gets_chance_not_perfect() -> None:
    split, n_items = _toy_split(), 40
    const = FunctionScorer("constant", lambda users, h: np.zeros((len(users), n_items)))
    result = evaluate_scorer(const, split, "test", n_items, ks=[5, 10])
    candidates = [n_items - len(h) for h in split.histories("test")]
    for k in (5, 10):
        assert result.metrics[f"R@{k}"] == pytest.approx(np.mean([chance_recall(k, c) for c in candidates]))
        assert result.metrics[f"N@{k}"] == pytest.approx(np.mean([chance_ndcg(k, c) for c in candidates]))
    assert result.metrics["R@10"] < 0.5


def test_oracle_scorer_is_perfect_and_history_is_excluded() -> None:
    split, n_items = _toy_split(), 40
    targets = split.targets("valid")

    def oracle(users, histories):
        scores = np.zeros((len(users), n_items))
        for row, (u, h) in enumerate(zip(users, histories, strict=True)):
            scores[row, h] = 100.0  # history scores highest but must be ignored
            scores[row, targets[u]] = 50.0
        return scores

    result = evaluate_scorer(FunctionScorer("oracle", oracle), split, "valid", n_items, ks=[1])
    assert result.metrics == {"R@1": 1.0, "N@1": 1.0, "MRR": 1.0}


def test_popularity_breaks_ties_by_item_id() -> None:
    pop = PopularityScorer([np.array([3, 3, 1, 2])], n_items=5)
    order = np.argsort(-pop.score(np.array([0]), [])[0], kind="stable")
    assert order.tolist() == [3, 1, 2, 0, 4]  # 1 and 2 tie on one count → lower id first; 0 and 4 on zero


def test_popularity_equals_an_independent_computation(data_dir: Path, tmp_path: Path) -> None:
    """Popularity on ml-latest-small test, recomputed with plain Python counting and sorting."""
    from collections import Counter

    from pipeline.config import DataConfig
    from pipeline.data import load_dataset

    dataset = load_dataset(DataConfig(name="ml-latest-small", path=data_dir / "ml-latest-small"), tmp_path)
    split = dataset.split()
    result = evaluate_scorer(PopularityScorer(split.histories("test"), dataset.n_items), split, "test", dataset.n_items, ks=[10])
    counts = Counter(i for h in split.histories("test") for i in h.tolist())
    ranking = sorted(range(dataset.n_items), key=lambda i: (-counts[i], i))
    hits, gains = [], []
    for history, target in zip(split.histories("test"), split.targets("test"), strict=True):
        seen = set(history.tolist())
        top = [i for i in ranking if i not in seen][:10]
        hits.append(target in top)
        gains.append(1 / math.log2(top.index(target) + 2) if target in top else 0.0)
    assert result.metrics["R@10"] == pytest.approx(np.mean(hits))
    assert result.metrics["N@10"] == pytest.approx(np.mean(gains))


def test_ranked_lists_count_misses_as_zero() -> None:
    greater, ties = list_counts([[5, 3, 9], [1, 2], [7]], np.array([3, 4, 7]))
    m = metrics_from_counts(greater, ties, [1, 2], max_rank=10)
    assert m["R@1"].tolist() == [0.0, 0.0, 1.0]
    assert m["R@2"].tolist() == [1.0, 0.0, 1.0]
    assert m["MRR"].tolist() == [0.5, 0.0, 1.0]


def test_sampled_negatives_are_unseen_distinct_and_seeded() -> None:
    split = _toy_split()
    neg = sample_negatives(split.sequences, 40, 20, seed=1)
    assert neg.shape == (50, 20)
    for row, seq in zip(neg, split.sequences, strict=True):
        assert len(set(row.tolist())) == 20 and not set(row.tolist()) & set(seq.tolist())
    assert np.array_equal(neg, sample_negatives(split.sequences, 40, 20, seed=1))
    with pytest.raises(ValueError, match=r"fewer than eval\.sampled_negatives=39"):
        sample_negatives(split.sequences, 40, 39, seed=1)


def test_sampled_track_of_random_scorer_is_near_chance() -> None:
    split = _toy_split(n_users=400, n_items=200, seed=3)
    neg = sample_negatives(split.sequences, 200, 99, seed=0)
    result = evaluate_scorer(RandomScorer(200, seed=0), split, "test", 200, ks=[10], negatives=neg, ceiling_n=20)
    assert abs(result.extra["sampled_HR@10"] - 0.1) < 0.05
    assert result.extra["ceiling_R@20"] == result.metrics.get("R@20", result.extra["ceiling_R@20"])


def test_bad_scorer_shape_and_target_in_history() -> None:
    split = _toy_split()
    bad = FunctionScorer("bad", lambda users, h: np.zeros((len(users), 3)))
    with pytest.raises(ValueError, match=r"scorer bad returned shape \(50, 3\), expected \(50, 40\)"):
        evaluate_scorer(bad, split, "test", 40)
    with pytest.raises(ValueError, match=r"target item 2 is in the excluded history"):
        rank_counts(np.zeros((1, 4)), np.array([2]), [np.array([2])])
