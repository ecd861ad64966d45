"""User-level DP in the cross-device setting: Poisson client sampling, the fixed-denominator noised mean, the kept round,
and the FM item side (a shared projection of the text embeddings, nothing per item)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from pipeline.config import FederationConfig, load_config
from pipeline.recommender import Recommender

TINY = REPO / "configs" / "tiny.yaml"


def _recommender(tmp_path: Path, *overrides: str) -> Recommender:
    cfg = load_config(TINY, ["federation.rounds=2", "tower.dim=16", "tower.max_len=10", "tower.layers=1",
                             "eval.max_users=30", f"output_dir={tmp_path}", *overrides])
    return Recommender.from_config(cfg)


def _kept(rec: Recommender) -> dict[str, np.ndarray]:
    from pipeline.trained import run_dir

    with np.load(run_dir(rec) / "best.npz") as saved:
        return {k: saved[k] for k in saved.files if k.startswith("tower/")}


def test_poisson_sampling_picks_each_client_independently(tmp_path: Path) -> None:
    from federation.runner import train

    rec = _recommender(tmp_path, "federation.rounds=6", "federation.patience=null", "federation.clients_per_round=2",
                       "federation.sampling=poisson", "federation.seed=3")
    results = train(rec)
    n = results["clients"]
    expected = [int(np.sum(np.random.default_rng([3, r]).random(n) < 2 / n)) for r in range(1, 7)]  # the rule, written out
    assert [h["asked"] for h in results["history"]] == expected
    assert len(set(expected)) > 1  # the count varies from round to round


def test_poisson_dp_divides_the_noised_sum_by_the_expected_count(tmp_path: Path) -> None:
    """No noise and a clip no update reaches: a Poisson round that happened to pick all 4 clients at rate 1/2 moves the state
    by Σ Δ / (q·N) = 2 × the unweighted mean that the same DP round with every client sampled (fixed) applies."""
    from federation.runner import train

    seed = next(s for s in range(1000) if (np.random.default_rng([s, 1]).random(4) < 0.5).all())
    common = ["federation.rounds=1", f"federation.seed={seed}", "federation.select=last", "federation.dp_clip=1000000"]
    fixed_rec = _recommender(tmp_path / "fixed", *common)
    poisson_rec = _recommender(tmp_path / "poisson", *common, "federation.clients_per_round=2", "federation.sampling=poisson")
    assert train(fixed_rec)["history"][0]["accepted"] == 4 == train(poisson_rec)["history"][0]["accepted"]
    from federation.task import Recipe, initial_state

    start = initial_state(fixed_rec.item_vectors, Recipe.of(fixed_rec.cfg))
    after_fixed, after_poisson = _kept(fixed_rec), _kept(poisson_rec)
    for key, value in after_fixed.items():
        assert np.allclose(after_poisson[key] - start[key], 2 * (value - start[key]), atol=1e-6), key
    assert any(np.abs(value - start[key]).max() > 1e-4 for key, value in after_fixed.items())


def test_a_round_that_samples_nobody_keeps_the_state_and_still_counts_towards_epsilon(tmp_path: Path) -> None:
    from federation.runner import train

    seed = next(s for s in range(1000) if not (np.random.default_rng([s, 1]).random(4) < 0.25).any()
                and (np.random.default_rng([s, 2]).random(4) < 0.25).any())
    rec = _recommender(tmp_path, "federation.clients_per_round=1", "federation.sampling=poisson", f"federation.seed={seed}",
                       "federation.dp_clip=1.0", "federation.dp_noise_multiplier=1.0", "federation.patience=null")
    results = train(rec)
    first, second = results["history"]
    assert first["asked"] == 0 and not first["applied"] and "picked no client" in first["reason"]
    assert 0 < first["epsilon"] < second["epsilon"] == results["epsilon"]
    assert second["applied"]


def test_select_last_keeps_the_last_round(tmp_path: Path) -> None:
    from federation.runner import train

    results = train(_recommender(tmp_path, "federation.rounds=3", "federation.patience=null", "federation.select=last"))
    assert results["best_round"] == 3 and results["valid"] == results["history"][-1]["valid"]


def test_the_projection_item_side_sends_nothing_per_item_and_learns(tmp_path: Path) -> None:
    from federation.runner import train

    full = train(_recommender(tmp_path / "a"))
    fm = train(_recommender(tmp_path / "b", "tower.item_init=projection"))
    n_items = _recommender(tmp_path / "c").dataset.n_items
    assert full["state_bytes"] - fm["state_bytes"] == n_items * 16 * 4  # exactly the residual table
    assert fm["history"][-1]["train_loss"] < fm["history"][0]["train_loss"] and fm["test"]["R@10"] > 0


def test_poisson_sampling_refuses_what_it_cannot_do() -> None:
    with pytest.raises(ValueError, match=r"secagg"):
        FederationConfig(secagg=True, sampling="poisson")
    with pytest.raises(ValueError, match=r"only the mean for fedavg and fedprox, not fedadam"):
        FederationConfig(sampling="poisson", dp_clip=1.0, strategy="fedadam")
    FederationConfig(sampling="poisson", strategy="fedadam")  # without DP any strategy takes the replies as they come


def test_adaptive_clipping_moves_the_norm_towards_the_target_quantile() -> None:
    """Andrew et al.: C ← C·exp(−η(b̄ − γ)), b̄ the fraction left unclipped. Flower 1.42 feeds the clipped fraction
    (its own class drifts away from the quantile); ours settles at the γ-quantile of the update norms."""
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping, FedAvg

    from federation.strategies import ServerSideAdaptiveClipping

    norms = np.random.default_rng(0).lognormal(mean=1.5, sigma=0.3, size=500)  # median e^1.5 ≈ 4.48

    def settle(cls, target: float) -> float:
        wrapper = cls(FedAvg(), 0.0, 100, initial_clipping_norm=0.5, target_clipped_quantile=target, clip_norm_lr=0.2, clipped_count_stddev=0.0)
        reference = 0.5
        for _ in range(300):
            clipped = float(np.mean(norms > wrapper.clipping_norm))
            wrapper._geometric_update(clipped)  # what aggregate_train passes: the (noised) clipped fraction
            reference *= np.exp(-0.2 * (np.mean(norms <= reference) - target))
        if cls is ServerSideAdaptiveClipping:
            assert wrapper.clipping_norm == pytest.approx(reference, rel=1e-9)
        return wrapper.clipping_norm

    for target in (0.5, 0.9):
        assert settle(ServerSideAdaptiveClipping, target) == pytest.approx(np.quantile(norms, target), rel=0.1)
    assert settle(DifferentialPrivacyServerSideAdaptiveClipping, 0.5) < norms.min() / 10  # the upstream direction: away


def test_an_adaptive_norm_below_every_update_grows(tmp_path: Path) -> None:
    from federation.runner import train

    rec = _recommender(tmp_path, "federation.rounds=3", "federation.patience=null", "federation.dp_clip=0.001",
                       "federation.dp_adaptive=true", "federation.dp_noise_multiplier=0.05")
    norms = [h["dp_clipping_norm"] for h in train(rec)["history"]]
    assert norms[0] > 0.001 and norms[0] < norms[1] < norms[2]
