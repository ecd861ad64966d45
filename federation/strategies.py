"""Flower's own strategies (`flwr.serverapp.strategy`), picked by `federation.strategy`, with their state as plain arrays.

The ServerApp drives a strategy one round at a time (`configure_train` → send → validate →
`aggregate_train`), so fedrec's layers stay around it: seeded client sampling, update
validation, payload accounting, per-round checkpoints and early stopping. Clients reply with
their full arrays, as Flower's strategies expect; the server derives the delta it validates.
Central DP wraps the strategy in Flower's `DifferentialPrivacyServerSideFixedClipping` (or, with
`dp_adaptive`, `...AdaptiveClipping`, which spends part of the same noise budget on the clipped
count, so ε is still that of `dp_noise_multiplier`); its mean is unweighted (every client carries
weight 1), as the noise calibration requires.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid
from flwr.serverapp import strategy as fl

from federation.core import State
from pipeline.errors import FedrecError

if TYPE_CHECKING:
    from pipeline.config import FederationConfig

EXAMPLES_KEY = "num-examples"
"""Reply metric that weights a client in the mean (its training windows)."""
UNIT_KEY = "unit-weight"
"""Reply metric that is always 1: the weight under central DP."""


class _TowardsQuantile:
    """Andrew et al.'s geometric update, C ← C·exp(−η(b̄ − γ)) with b̄ the (noised) fraction of updates left *unclipped*.

    Flower 1.42's adaptive wrappers feed the fraction that was clipped into that formula, so a norm
    that clips most updates shrinks further and one that clips none grows: measured here, an initial
    norm of 0.5 under update norms of about 4.6 fell to 0.075 in 18 rounds. This mixin passes
    1 − (clipped fraction), which moves the norm towards the `target_clipped_quantile`-th quantile
    of the update norms (`federation.dp_target_quantile` is the fraction left unclipped).
    """

    def _geometric_update(self, clipped_fraction: float) -> None:
        super()._geometric_update(1.0 - clipped_fraction)  # type: ignore[misc]


class ServerSideAdaptiveClipping(_TowardsQuantile, fl.DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping, its norm moving towards the target quantile (see `_TowardsQuantile`)."""


class ClientSideAdaptiveClipping(_TowardsQuantile, fl.DifferentialPrivacyClientSideAdaptiveClipping):
    """Flower's client-side adaptive clipping, its norm moving towards the target quantile (see `_TowardsQuantile`)."""


def make_strategy(cfg: FederationConfig, sampled: int) -> fl.Strategy:
    """The configured strategy, for rounds of `sampled` clients (all of them train; none evaluates)."""
    common: dict[str, Any] = {
        "fraction_train": 1.0, "fraction_evaluate": 0.0, "min_train_nodes": 1, "min_evaluate_nodes": 0, "min_available_nodes": 1,
        "weighted_by_key": UNIT_KEY if cfg.dp_clip is not None else EXAMPLES_KEY,
    }
    name = cfg.strategy
    if name == "fedavg":
        strategy: fl.Strategy = fl.FedAvg(**common)
    elif name == "fedprox":
        strategy = fl.FedProx(**common, proximal_mu=cfg.prox_mu)
    elif name == "fedadam":
        strategy = fl.FedAdam(**common, eta=cfg.server_lr)
    elif name == "fedyogi":
        strategy = fl.FedYogi(**common, eta=cfg.server_lr)
    elif name == "fedavgm":
        strategy = fl.FedAvgM(**common, server_learning_rate=cfg.server_lr, server_momentum=cfg.server_momentum)
    elif name == "fedtrimmedavg":
        strategy = fl.FedTrimmedAvg(**common, beta=cfg.trim_fraction)
    elif name == "fedmedian":
        strategy = fl.FedMedian(**common)
    elif name == "krum":
        strategy = fl.Krum(**common, num_malicious_nodes=cfg.num_malicious)
    else:
        strategy = fl.Bulyan(**common, num_malicious_nodes=cfg.num_malicious)
    if cfg.dp_clip is None:
        return strategy
    client = cfg.dp_clip_on == "client"
    if cfg.dp_adaptive:
        wrapper = ClientSideAdaptiveClipping if client else ServerSideAdaptiveClipping
        try:
            return wrapper(strategy, cfg.dp_noise_multiplier, sampled, initial_clipping_norm=cfg.dp_clip,
                           target_clipped_quantile=cfg.dp_target_quantile, clip_norm_lr=cfg.dp_clip_lr)
        except ValueError as exc:  # the clipped-count query needs part of the noise budget; too few clients leave none
            raise FedrecError(f"federation.dp_adaptive with {sampled} clients per round and dp_noise_multiplier="
                              f"{cfg.dp_noise_multiplier}: {exc}; sample more clients, or lower the noise, or set dp_adaptive=false") from None
    wrapper = fl.DifferentialPrivacyClientSideFixedClipping if client else fl.DifferentialPrivacyServerSideFixedClipping
    return wrapper(strategy, cfg.dp_noise_multiplier, cfg.dp_clip, sampled)


def client_mods(cfg: FederationConfig) -> list:
    """The ClientApp mods the configured DP needs: Flower's clipping mod when clients clip their own updates."""
    if cfg.dp_clip is None or cfg.dp_clip_on != "client":
        return []
    from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod

    return [adaptiveclipping_mod if cfg.dp_adaptive else fixedclipping_mod]


_ADAPTIVE = (fl.DifferentialPrivacyServerSideAdaptiveClipping, fl.DifferentialPrivacyClientSideAdaptiveClipping)


def _inner(strategy: fl.Strategy) -> fl.Strategy:
    return getattr(strategy, "strategy", strategy)  # a DP wrapper holds the strategy it wraps


def strategy_state(strategy: fl.Strategy) -> State:
    """What the strategy carries between rounds (FedOpt moments, FedAvgM momentum and arrays, the adaptive clipping
    norm), as named arrays."""
    inner, out = _inner(strategy), {}
    if isinstance(strategy, _ADAPTIVE):
        out["dp/clipping_norm"] = np.array([strategy.clipping_norm], np.float64)
    for moment in ("m_t", "v_t"):
        for key, value in (getattr(inner, moment, None) or {}).items():
            out[f"{moment}/{key}"] = np.asarray(value)
    if isinstance(inner, fl.FedAvgM) and inner.current_arrays is not None:
        keys = list(inner.current_arrays.keys())
        out.update({f"current/{k}": inner.current_arrays[k].numpy() for k in keys})
        for key, value in zip(keys, inner.momentum_vector or [], strict=False):
            out[f"momentum/{key}"] = np.asarray(value)
    return out


def load_strategy_state(strategy: fl.Strategy, arrays: State) -> None:
    """Restore `strategy_state` into a fresh strategy of the same kind."""
    from flwr.app import Array, ArrayRecord

    inner = _inner(strategy)
    if isinstance(strategy, _ADAPTIVE) and "dp/clipping_norm" in arrays:
        strategy.clipping_norm = float(arrays["dp/clipping_norm"][0])
    for moment in ("m_t", "v_t"):
        found = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(f"{moment}/")}
        if found:
            setattr(inner, moment, found)
    current = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("current/")}
    if isinstance(inner, fl.FedAvgM) and current:
        inner.current_arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in current.items()})
        momentum = [arrays[f"momentum/{k}"] for k in current if f"momentum/{k}" in arrays]
        inner.momentum_vector = momentum or None


class SampledGrid(Grid):
    """The real grid as seen by a strategy for one round: only the nodes fedrec sampled (seeded) exist."""

    def __init__(self, grid: Grid, nodes: list[int]) -> None:
        self._grid, self._nodes = grid, nodes

    @property
    def run(self):  # noqa: ANN201 - flwr Run
        return self._grid.run

    def set_run(self, run_id: int) -> None:
        self._grid.set_run(run_id)

    def create_message(self, content, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None) -> Message:  # noqa: ANN001
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)
