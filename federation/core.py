"""Federation mechanics independent of Flower: updates, validation, aggregation, privacy, bytes.

A state is a dict of named numpy arrays; an update is the difference between a client's locally
trained state and the global state it started from. The server validates every update, can clip
and noise them (central DP, accounted with dp-accounting's RDP and PLD), aggregates them, and counts the bytes that
travel each way.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

State = dict[str, np.ndarray]


def subtract(a: State, b: State) -> State:
    """`a - b`, key by key."""
    return {k: (a[k] - b[k]).astype(a[k].dtype) for k in a}


def add(a: State, b: State, scale: float = 1.0) -> State:
    """`a + scale · b`, key by key (keys missing from `b` are kept)."""
    return {k: (a[k] + scale * b[k]).astype(a[k].dtype) if k in b else a[k].copy() for k in a}


def l2_norm(update: State) -> float:
    """Global L2 norm over every array."""
    return float(math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in update.values())))


def clip(update: State, max_norm: float) -> tuple[State, float]:
    """Scale `update` down to L2 norm `max_norm` if it is larger; returns the update and the factor used."""
    norm = l2_norm(update)
    factor = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return {k: (v * factor).astype(v.dtype) for k, v in update.items()}, factor


def validate_update(update: State, reference: State, *, max_norm: float | None = None) -> str | None:
    """Why `update` must be rejected, or None when it is acceptable.

    Checks: the same keys as the reference, the same shapes and dtypes, only finite values, and
    (when given) an L2 norm of at most `max_norm`.
    """
    missing, extra = sorted(set(reference) - set(update)), sorted(set(update) - set(reference))
    if missing or extra:
        return f"keys differ from the global state (missing {missing}, unexpected {extra})"
    for key, value in update.items():
        ref = reference[key]
        if value.shape != ref.shape:
            return f"{key}: shape {value.shape}, expected {ref.shape}"
        if value.dtype != ref.dtype:
            return f"{key}: dtype {value.dtype}, expected {ref.dtype}"
        if not np.isfinite(value).all():
            return f"{key}: contains NaN or infinite values"
    if max_norm is not None:
        norm = l2_norm(update)
        if norm > max_norm:
            return f"L2 norm {norm:.4g} exceeds the bound {max_norm:.4g}"
    return None


class Aggregator(ABC):
    """Combines client updates into one update."""

    name: str = "aggregator"

    @abstractmethod
    def aggregate(self, updates: Sequence[State], weights: Sequence[float]) -> State:
        """One update from many; `weights` are usually the clients' example counts."""


class FedAvg(Aggregator):
    """Example-weighted mean (McMahan et al.)."""

    name = "fedavg"

    def aggregate(self, updates: Sequence[State], weights: Sequence[float]) -> State:
        w = np.asarray(weights, dtype=np.float64)
        if len(updates) == 0 or w.sum() <= 0:
            raise ValueError("FedAvg needs at least one update with a positive weight")
        w = w / w.sum()
        return {k: sum(wi * u[k].astype(np.float64) for wi, u in zip(w, updates, strict=True)).astype(updates[0][k].dtype)
                for k in updates[0]}


class TrimmedMean(Aggregator):
    """Coordinate-wise mean after dropping the `beta` fraction of largest and smallest values (unweighted)."""

    name = "trimmed_mean"

    def __init__(self, beta: float = 0.1) -> None:
        if not 0 <= beta < 0.5:
            raise ValueError(f"federation.trim_fraction must be in [0, 0.5), got {beta}")
        self.beta = beta

    def aggregate(self, updates: Sequence[State], weights: Sequence[float]) -> State:
        cut = int(math.floor(self.beta * len(updates)))
        out = {}
        for k in updates[0]:
            stacked = np.sort(np.stack([u[k] for u in updates]).astype(np.float64), axis=0)
            kept = stacked[cut : len(updates) - cut] if len(updates) - 2 * cut > 0 else stacked
            out[k] = kept.mean(axis=0).astype(updates[0][k].dtype)
        return out


class Median(Aggregator):
    """Coordinate-wise median (unweighted)."""

    name = "median"

    def aggregate(self, updates: Sequence[State], weights: Sequence[float]) -> State:
        return {k: np.median(np.stack([u[k] for u in updates]).astype(np.float64), axis=0).astype(updates[0][k].dtype) for k in updates[0]}


@dataclass
class FedAdam:
    """Server-side Adam on the aggregated update treated as a pseudo-gradient (Reddi et al., FedOpt)."""

    lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    m: State = field(default_factory=dict)
    v: State = field(default_factory=dict)

    def step(self, state: State, update: State) -> State:
        new = {}
        for k, delta in update.items():
            d = delta.astype(np.float64)
            self.m[k] = self.beta1 * self.m.get(k, np.zeros_like(d)) + (1 - self.beta1) * d
            self.v[k] = self.beta2 * self.v.get(k, np.zeros_like(d)) + (1 - self.beta2) * d * d
            new[k] = (state[k] + self.lr * self.m[k] / (np.sqrt(self.v[k]) + self.tau)).astype(state[k].dtype)
        return {**state, **new}

    def to_state(self) -> State:
        """Moments as named arrays, for checkpoints."""
        return {**{f"m/{k}": v for k, v in self.m.items()}, **{f"v/{k}": v for k, v in self.v.items()}}

    def load_state(self, arrays: State) -> None:
        self.m = {k[2:]: v for k, v in arrays.items() if k.startswith("m/")}
        self.v = {k[2:]: v for k, v in arrays.items() if k.startswith("v/")}


@dataclass
class PrivacyAccountant:
    """(ε, δ) of the subsampled Gaussian mechanism composed over rounds, from `dp-accounting` (RDP and PLD).

    Each round releases the noised mean of the sampled clients' clipped updates; a round is
    accounted as Poisson sampling with rate `sample_rate` (clients per round / clients), the
    amplification the user-level DP literature states for federated rounds.
    """

    noise_multiplier: float
    sample_rate: float = 1.0
    rounds: int = 0

    def step(self, rounds: int = 1) -> None:
        self.rounds += rounds

    def _event(self):  # noqa: ANN202 - dp_accounting.DpEvent
        from dp_accounting import dp_event

        gaussian = dp_event.GaussianDpEvent(self.noise_multiplier)
        one = gaussian if self.sample_rate >= 1 else dp_event.PoissonSampledDpEvent(self.sample_rate, gaussian)
        return dp_event.SelfComposedDpEvent(one, self.rounds)

    def epsilon_rdp(self, delta: float) -> float:
        """ε at `delta` from Rényi DP (orders 1.01..256, dp-accounting's conversion)."""
        if self.noise_multiplier <= 0:
            return math.inf
        if self.rounds == 0:
            return 0.0
        import logging

        from dp_accounting.rdp import RdpAccountant

        accountant = RdpAccountant()
        absl = logging.getLogger("absl")
        level = absl.level
        absl.setLevel(logging.ERROR)  # orders whose series does not converge are skipped with a warning each; that is expected
        try:
            accountant.compose(self._event())
            return float(accountant.get_epsilon(delta))
        finally:
            absl.setLevel(level)

    def epsilon_pld(self, delta: float, discretization: float = 1e-3) -> float:
        """ε at `delta` from privacy loss distributions (tighter; `discretization` trades time for a looser bound)."""
        if self.noise_multiplier <= 0:
            return math.inf
        if self.rounds == 0:
            return 0.0
        from dp_accounting.pld import PLDAccountant

        accountant = PLDAccountant(value_discretization_interval=discretization)
        accountant.compose(self._event())
        return float(accountant.get_epsilon(delta))

    def epsilon(self, delta: float) -> float:
        """The tighter of the two bounds (each is a valid upper bound on ε)."""
        return min(self.epsilon_rdp(delta), self.epsilon_pld(delta))


def gaussian_noise(update: State, std: float, rng: np.random.Generator) -> State:
    """Add N(0, std²) to every coordinate."""
    return {k: (v + rng.normal(0.0, std, size=v.shape)).astype(v.dtype) for k, v in update.items()}


@dataclass
class Payload:
    """Bytes that travel per client per round, by array name."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    def record(self, round_: int, client: int | str, direction: str, arrays: State) -> int:
        total = 0
        for name, value in arrays.items():
            self.rows.append({"round": round_, "client": client, "direction": direction, "array": name, "bytes": int(value.nbytes)})
            total += int(value.nbytes)
        return total

    def totals(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for row in self.rows:
            out[row["direction"]] = out.get(row["direction"], 0) + row["bytes"]
        return out
