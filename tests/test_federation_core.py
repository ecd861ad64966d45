"""Federation mechanics: validation, Flower's strategies against plain references, their checkpointed state, the DP accountant, payload bytes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from federation.core import Payload, PrivacyAccountant, add, subtract, validate_update


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


def _replies(start: dict, deltas: list[dict], weights: list[int]) -> list:
    """Train replies as Flower's strategies receive them: each client's full arrays and its weights."""
    from flwr.app import Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from federation.core import add
    from federation.flower_apps import to_record
    from federation.strategies import EXAMPLES_KEY, UNIT_KEY

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1  # Flower needs these to build a Message
    return [Message(RecordDict({"arrays": to_record(add(start, d)), "metrics": MetricRecord({EXAMPLES_KEY: w, UNIT_KEY: 1})}),
                    dst_node_id=1000 + n, message_type="train") for n, (d, w) in enumerate(zip(deltas, weights, strict=True))]


def _strategy(**overrides: object):  # noqa: ANN202 - flwr Strategy
    from federation.strategies import make_strategy
    from pipeline.config import FederationConfig

    return make_strategy(FederationConfig(**overrides), 9)


def _arrays(record) -> dict:  # noqa: ANN001
    return {k: a.numpy() for k, a in record.items()}


def test_strategies_match_plain_references() -> None:
    """FedAvg is the example-weighted mean, FedMedian the coordinate median, FedTrimmedAvg the mean after trimming
    int(beta * n) values at each end, each computed here with numpy on the same seeded updates."""
    rng = np.random.default_rng(0)
    start = {"items": rng.normal(size=(7, 3)).astype(np.float32), "bias": rng.normal(size=5).astype(np.float32)}
    deltas = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in start.items()} for _ in range(5)]
    weights = [3, 10, 1, 7, 2]
    w = np.asarray(weights, np.float64) / sum(weights)
    for name, reference in (
        ("fedavg", lambda stack: np.tensordot(w, stack, axes=1)),
        ("fedmedian", lambda stack: np.median(stack, axis=0)),
        ("fedtrimmedavg", lambda stack: np.sort(stack, axis=0)[1:-1].mean(axis=0)),  # beta 0.2 of 5 trims one each end
    ):
        out, _ = _strategy(strategy=name, trim_fraction=0.2).aggregate_train(1, _replies(start, deltas, weights))
        for key in start:
            stack = np.stack([start[key] + d[key] for d in deltas]).astype(np.float64)
            np.testing.assert_allclose(_arrays(out)[key], reference(stack), rtol=0, atol=1e-5, err_msg=name)


def test_robust_strategies_resist_an_outlier() -> None:
    start = {"w": np.zeros(5, np.float32)}
    honest = [{"w": np.full(5, 1.0 + 0.01 * i, np.float32)} for i in range(8)]
    attacker = [{"w": np.full(5, 1e6, np.float32)}]
    replies = lambda: _replies(start, honest + attacker, [1] * 9)  # noqa: E731
    assert np.abs(_arrays(_strategy(strategy="fedmedian").aggregate_train(1, replies())[0])["w"] - 1.04).max() < 0.05
    assert np.abs(_arrays(_strategy(strategy="fedtrimmedavg", trim_fraction=0.2).aggregate_train(1, replies())[0])["w"] - 1.035).max() < 0.05
    assert np.abs(_arrays(_strategy(strategy="krum", num_malicious=1).aggregate_train(1, replies())[0])["w"] - 1.0).max() < 0.1
    assert _arrays(_strategy(strategy="fedavg").aggregate_train(1, replies())[0])["w"][0] > 1e4


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedavgm"])
def test_server_optimizer_state_round_trips_exactly(name: str) -> None:
    """Two rounds straight equal one round, a checkpoint of the strategy's state, and the second round in a fresh strategy."""
    from flwr.app import ConfigRecord
    from flwr.clientapp import ClientApp

    from federation.flower_apps import to_record
    from federation.inprocess import InProcessGrid
    from federation.strategies import load_strategy_state, strategy_state

    grid = InProcessGrid(ClientApp(), 3)
    rng = np.random.default_rng(1)
    start = {"w": rng.normal(size=(4, 3)).astype(np.float32)}
    rounds = [[{"w": rng.normal(size=(4, 3)).astype(np.float32)} for _ in range(3)] for _ in range(2)]

    def run(strategy, state: dict, round_: int) -> dict:  # noqa: ANN001
        strategy.configure_train(round_, to_record(state), ConfigRecord({}), grid)
        return {k: v.astype(np.float32) for k, v in _arrays(strategy.aggregate_train(round_, _replies(state, rounds[round_ - 1], [1, 2, 3]))[0]).items()}

    straight = _strategy(strategy=name, server_lr=0.1)
    after_one = run(straight, start, 1)
    saved = {k: v.copy() for k, v in strategy_state(straight).items()}
    assert saved, f"{name} keeps state between rounds"
    expected = run(straight, after_one, 2)
    fresh = _strategy(strategy=name, server_lr=0.1)
    load_strategy_state(fresh, saved)
    np.testing.assert_array_equal(run(fresh, after_one, 2)["w"], expected["w"])
    assert not np.array_equal(expected["w"], after_one["w"])


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
    # A history that leaves fewer than n unseen items gets only those, never a seen one.
    _, short = tower.top_candidates([np.arange(37)], 5)
    assert sorted(c.item for c in short[0]) == [37, 38, 39]
