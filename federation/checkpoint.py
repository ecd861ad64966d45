"""Atomic checkpoints of the server state after every round."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, model_validator

from federation.core import PrivacyAccountant, State, non_finite
from federation.task import ServerState
from pipeline.errors import FedrecError
from pipeline.io import atomic_path


def save(server: ServerState, path: Path) -> Path:
    """Write the global state, the strategy's state, the accountant and the history to one `.npz`, atomically."""
    arrays = {f"state/{k}": v for k, v in server.state.items()}
    arrays.update({f"strategy/{k}": v for k, v in server.strategy_state.items()})
    meta = {
        "round": server.round,
        "history": server.history,
        "accountant": None if server.accountant is None else {
            "noise_multiplier": server.accountant.noise_multiplier, "sample_rate": server.accountant.sample_rate,
            "rounds": server.accountant.rounds,
        },
    }
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with atomic_path(path) as tmp:
        with tmp.open("wb") as handle:
            np.savez(handle, **arrays)
    return path


class _Accountant(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    noise_multiplier: float = Field(ge=0)
    sample_rate: float = Field(gt=0, le=1)
    rounds: StrictInt = Field(ge=0)


class _Meta(BaseModel):
    """What a checkpoint says beside its arrays; every round it has run left one report in `history`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    round: StrictInt = Field(ge=0)
    history: list[dict[str, Any]]
    accountant: _Accountant | None

    @model_validator(mode="after")
    def _one_report_per_round(self) -> _Meta:
        rounds = [h.get("round") for h in self.history]
        if len(rounds) != self.round or rounds != list(range(1, self.round + 1)):
            raise ValueError(f"round is {self.round} but the history reports rounds {str(rounds)[:80]}")
        return self


def load(path: Path, expected: State | None = None) -> ServerState:
    """Read a checkpoint written by `save`; with `expected`, its arrays must have exactly those names, shapes and dtypes.

    Raises:
        FedrecError: the file is empty, truncated, corrupt, inconsistent, holds non-finite weights, or holds a state
            of another shape.
    """
    fix = "run with --restart to start over (the checkpoint is replaced)"
    try:
        with np.load(path) as payload:
            raw = json.loads(payload["meta"].tobytes())
            state = {k.removeprefix("state/"): payload[k] for k in payload.files if k.startswith("state/")}
            strategy = {k.removeprefix("strategy/"): payload[k] for k in payload.files if k.startswith("strategy/")}
        meta = _Meta.model_validate(raw)
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(map(str, problem["loc"])) or "meta"
        raise FedrecError(f"checkpoint {path} is inconsistent ({where}: {problem['msg'].removeprefix('Value error, ')}); {fix}") from None
    except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
        raise FedrecError(f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc or 'empty file'}); {fix}") from None
    if expected is not None:
        wrong = sorted(set(expected) ^ set(state)) + sorted(k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape)
        if wrong:
            shown = ", ".join(f"{k} {state[k].shape if k in state else 'missing'} vs {expected[k].shape if k in expected else 'unexpected'}"
                              for k in wrong[:3])
            raise FedrecError(f"checkpoint {path} was written for another model shape ({shown}); {fix}")
        cast = [k for k in expected if state[k].dtype != expected[k].dtype]
        if cast:
            raise FedrecError(f"checkpoint {path} holds {cast[0]} as {state[cast[0]].dtype}, expected {expected[cast[0]].dtype}; {fix}")
    broken = non_finite({**state, **strategy})
    if broken:
        raise FedrecError(f"checkpoint {path} holds NaN or infinite values in {', '.join(broken[:3])}; {fix}")
    accountant = None
    if meta.accountant is not None:
        accountant = PrivacyAccountant(meta.accountant.noise_multiplier, meta.accountant.sample_rate, meta.accountant.rounds)
    return ServerState(meta.round, state, strategy, accountant, meta.history)
