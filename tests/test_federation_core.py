"""Federation mechanics without Flower: validation, aggregators, DP accountant, payload bytes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from federation.core import (
    FedAdam,
    FedAvg,
    Median,
    Payload,
    PrivacyAccountant,
    TrimmedMean,
    add,
    clip,
    gaussian_noise,
    l2_norm,
    subtract,
    validate_update,
)


def _state(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"soft_prompt": rng.normal(size=(4, 8)).astype(np.float32), "tower/items": rng.normal(size=(10, 3)).astype(np.float32)}


def test_delta_round_trip() -> None:
    a, b = _state(0), _state(1)
    back = add(b, subtract(a, b))
    for k in a:
        np.testing.assert_allclose(back[k], a[k], atol=1e-6)


def test_validation_reasons() -> None:
    ref = _state(0)
    assert validate_update(_state(1), ref) is None
    assert "missing ['tower/items']" in validate_update({"soft_prompt": ref["soft_prompt"]}, ref)
    assert "shape (4, 7), expected (4, 8)" in validate_update({**ref, "soft_prompt": np.zeros((4, 7), np.float32)}, ref)
    assert "dtype float64, expected float32" in validate_update({**ref, "soft_prompt": np.zeros((4, 8))}, ref)
    bad = {**ref, "tower/items": ref["tower/items"].copy()}
    bad["tower/items"][0, 0] = np.nan
    assert "NaN or infinite" in validate_update(bad, ref)
    assert "exceeds the bound" in validate_update(ref, ref, max_norm=0.5)


def test_clip_bounds_the_norm() -> None:
    update = _state(2)
    clipped, factor = clip(update, 1.0)
    assert l2_norm(clipped) == pytest.approx(1.0, rel=1e-5) and factor < 1
    same, factor = clip(update, 1e9)
    assert factor == 1.0 and all(np.array_equal(same[k], update[k]) for k in update)


def test_fedavg_is_the_weighted_mean() -> None:
    updates = [_state(i) for i in range(3)]
    out = FedAvg().aggregate(updates, [1, 2, 7])
    expected = (updates[0]["soft_prompt"] * 1 + updates[1]["soft_prompt"] * 2 + updates[2]["soft_prompt"] * 7) / 10
    np.testing.assert_allclose(out["soft_prompt"], expected, atol=1e-6)
    with pytest.raises(ValueError, match="at least one update"):
        FedAvg().aggregate([], [])


def test_robust_aggregators_resist_an_outlier() -> None:
    honest = [{"w": np.full(5, 1.0 + 0.01 * i, np.float32)} for i in range(8)]
    attacker = [{"w": np.full(5, 1e6, np.float32)}]
    assert np.abs(Median().aggregate(honest + attacker, [1] * 9)["w"] - 1.04).max() < 0.05
    assert np.abs(TrimmedMean(0.2).aggregate(honest + attacker, [1] * 9)["w"] - 1.035).max() < 0.05
    assert FedAvg().aggregate(honest + attacker, [1] * 9)["w"][0] > 1e4
    with pytest.raises(ValueError, match=r"trim_fraction must be in \[0, 0\.5\)"):
        TrimmedMean(0.5)


def test_fedadam_moves_along_the_update_and_checkpoints() -> None:
    state = {"w": np.zeros(3, np.float32)}
    opt = FedAdam(lr=0.1)
    new = opt.step(state, {"w": np.array([1.0, -1.0, 0.0], np.float32)})
    assert new["w"][0] > 0 > new["w"][1] and new["w"][2] == 0
    copy = FedAdam(lr=0.1)
    copy.load_state(opt.to_state())
    u = {"w": np.array([0.5, 0.5, 0.5], np.float32)}
    np.testing.assert_array_equal(opt.step(new, u)["w"], copy.step(new, u)["w"])


def _exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """ε of a Gaussian mechanism with privacy parameter `mu` (sensitivity / σ), exact (Balle & Wang 2018), by bisection."""
    from scipy.stats import norm

    def delta_at(eps: float) -> float:
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)

    low, high = 0.0, 500.0
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if delta_at(mid) > delta else (low, mid)
    return high


@pytest.mark.parametrize(("z", "q", "rounds"), [(0.3, 1.0, 10), (1.0, 50 / 610, 100), (2.0, 0.01, 500), (4.0, 61 / 610, 150)])
def test_epsilon_is_dp_accountings(z: float, q: float, rounds: int) -> None:
    from dp_accounting import dp_event
    from dp_accounting.pld import PLDAccountant
    from dp_accounting.rdp import RdpAccountant

    acct = PrivacyAccountant(z, q)
    for _ in range(rounds):
        acct.step()
    event = dp_event.GaussianDpEvent(z) if q >= 1 else dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z))
    rdp, pld = RdpAccountant(), PLDAccountant(value_discretization_interval=1e-3)
    rdp.compose(event, rounds)
    pld.compose(event, rounds)
    assert acct.epsilon_rdp(1e-5) == pytest.approx(rdp.get_epsilon(1e-5), rel=1e-9)
    assert acct.epsilon_pld(1e-5) == pytest.approx(pld.get_epsilon(1e-5), rel=1e-9)
    assert acct.epsilon(1e-5) == min(acct.epsilon_rdp(1e-5), acct.epsilon_pld(1e-5))


def test_epsilon_against_the_exact_gaussian_mechanism() -> None:
    """Without subsampling, T rounds of noise z compose to one Gaussian with mu = sqrt(T) / z, whose ε is known exactly:
    PLD lands just above it, RDP further above (both are upper bounds)."""
    for z, rounds in ((1.0, 10), (2.0, 100), (5.0, 4)):
        acct = PrivacyAccountant(z, 1.0, rounds)
        exact = _exact_gaussian_epsilon(math.sqrt(rounds) / z, 1e-5)
        assert exact <= acct.epsilon_pld(1e-5) <= exact * 1.01 + 1e-3
        assert acct.epsilon_pld(1e-5) <= acct.epsilon_rdp(1e-5) <= exact * 1.5
    assert PrivacyAccountant(0.0, 1.0, 5).epsilon(1e-5) == math.inf
    assert PrivacyAccountant(1.0, 1.0, 0).epsilon(1e-5) == 0.0
    assert PrivacyAccountant(4.0, 1.0, 10).epsilon(1e-5) < PrivacyAccountant(1.0, 1.0, 10).epsilon(1e-5)
    assert PrivacyAccountant(1.0, 0.01, 10).epsilon(1e-5) < PrivacyAccountant(1.0, 0.1, 10).epsilon(1e-5)


def test_noise_has_the_requested_scale() -> None:
    out = gaussian_noise({"w": np.zeros(20000, np.float32)}, 0.5, np.random.default_rng(0))
    assert out["w"].std() == pytest.approx(0.5, rel=0.03)


def test_payload_counts_bytes_by_direction_and_name() -> None:
    payload = Payload()
    state = _state(0)
    assert payload.record(1, 0, "down", state) == 4 * 8 * 4 + 10 * 3 * 4
    payload.record(1, 0, "up", {"soft_prompt": state["soft_prompt"]})
    assert payload.totals() == {"down": 248, "up": 128}


def test_tower_candidates_are_deterministic_and_exclude_the_history() -> None:
    """Candidate retrieval runs without dropout even on a tower left in training mode, and never returns seen items."""
    from retrieval.tower import RetrievalTower, TowerConfig, train_tower

    rng = np.random.default_rng(0)
    tower = RetrievalTower(rng.normal(size=(40, 12)).astype(np.float32), TowerConfig(dim=8, max_len=6, layers=1, dropout=0.5))
    histories = [rng.choice(40, size=8, replace=False) for _ in range(6)]
    train_tower(tower, histories, epochs=1)
    tower.train()
    _, first = tower.top_candidates(histories, 5)
    _, second = tower.top_candidates(histories, 5)
    assert first == second and tower.training
    assert all(not {c.item for c in found} & set(h.tolist()) for found, h in zip(first, histories, strict=True))


def test_flowers_strategies_give_the_hand_written_global_state() -> None:
    """Seeded check before the hand-written aggregators go: Flower's FedAvg, FedMedian and FedTrimmedAvg produce the same
    global state from the same client updates; Flower's FedAdam is ours with Adam's bias correction folded into the rate."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import strategy as fl

    from federation.core import FedAdam, FedAvg, Median, TrimmedMean, add
    from federation.inprocess import InProcessGrid

    grid = InProcessGrid(ClientApp(), 5)
    rng = np.random.default_rng(0)
    start = {"items": rng.normal(size=(7, 3)).astype(np.float32), "bias": rng.normal(size=5).astype(np.float32)}
    deltas = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in start.items()} for _ in range(5)]
    weights = [3, 10, 1, 7, 2]

    def record(arrays: dict) -> ArrayRecord:
        return ArrayRecord({k: Array(v) for k, v in arrays.items()})

    def replies() -> list[Message]:
        return [Message(RecordDict({"arrays": record(add(start, d)), "metrics": MetricRecord({"num-examples": w})}),
                        dst_node_id=1000 + n, message_type="train") for n, (d, w) in enumerate(zip(deltas, weights, strict=True))]

    def close(flower: ArrayRecord, ours: dict) -> None:
        for key in start:
            np.testing.assert_allclose(flower[key].numpy(), ours[key], rtol=0, atol=1e-6)

    for strategy, ours in ((fl.FedAvg(), FedAvg()), (fl.FedMedian(), Median()), (fl.FedTrimmedAvg(beta=0.2), TrimmedMean(0.2))):
        close(strategy.aggregate_train(1, replies())[0], add(start, ours.aggregate(deltas, weights)))
    adam = fl.FedAdam(eta=0.01, beta_1=0.9, beta_2=0.99, tau=1e-3)
    adam.configure_train(1, record(start), ConfigRecord({}), grid)
    corrected = 0.01 * math.sqrt(1 - 0.99**2) / (1 - 0.9**2)  # Flower's bias correction at round 1
    close(adam.aggregate_train(1, replies())[0], FedAdam(lr=corrected).step(start, FedAvg().aggregate(deltas, weights)))
