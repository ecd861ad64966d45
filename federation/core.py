"""Federation mechanics independent of Flower: updates, their validation, privacy accounting, bytes.

A state is a dict of named numpy arrays; an update is the difference between a client's locally
trained state and the global state it started from. The server validates every update before
the Flower strategy aggregates it (`federation.strategies`), accounts central DP with
dp-accounting (RDP and PLD), and counts the bytes that travel each way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

State = dict[str, np.ndarray]


def subtract(a: State, b: State) -> State:
    """`a - b`, key by key."""
    return {k: (a[k] - b[k]).astype(a[k].dtype) for k in a}


def delta_of(arrays: State, reference: State) -> State:
    """`arrays - reference` when both hold the same names and shapes; else `arrays` as sent (validation names the mismatch)."""
    if set(arrays) != set(reference) or any(np.shape(arrays[k]) != np.shape(reference[k]) for k in reference):
        return arrays
    return subtract(arrays, reference)


def add(a: State, b: State, scale: float = 1.0) -> State:
    """`a + scale · b`, key by key (keys missing from `b` are kept)."""
    return {k: (a[k] + scale * b[k]).astype(a[k].dtype) if k in b else a[k].copy() for k in a}


def l2_norm(update: State) -> float:
    """Global L2 norm over every array."""
    return float(math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in update.values())))


def non_finite(arrays: State) -> list[str]:
    """Names of the floating-point arrays that hold NaN or infinite values."""
    return [k for k, v in arrays.items() if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all()]


def validate_update(update: State, reference: State, *, max_norm: float | None = None, norm: float | None = None) -> str | None:
    """Why `update` must be rejected, or None when it is acceptable.

    Checks: the same keys as the reference, the same shapes and dtypes, only finite values, and
    (when given) an L2 norm of at most `max_norm` (`norm`: the update's L2 norm, when the caller has it already).
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
        norm = l2_norm(update) if norm is None else norm
        if norm > max_norm:
            return f"L2 norm {norm:.4g} exceeds the bound {max_norm:.4g}"
    return None


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

    def report(self, delta: float) -> dict[str, float]:
        """`epsilon_rdp`, `epsilon_pld` and `epsilon`, the tighter of the two (each is a valid upper bound on ε)."""
        rdp, pld = self.epsilon_rdp(delta), self.epsilon_pld(delta)
        return {"epsilon_rdp": rdp, "epsilon_pld": pld, "epsilon": min(rdp, pld)}

    def epsilon(self, delta: float) -> float:
        """The tighter of the two bounds."""
        return self.report(delta)["epsilon"]


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
