"""Atomic checkpoints of the server state after every round."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from federation.core import FedAdam, RDPAccountant, State
from federation.task import ServerState
from pipeline.errors import FedrecError
from pipeline.io import atomic_path


def save(server: ServerState, path: Path) -> Path:
    """Write the global state, optimizer moments, accountant and history to one `.npz`, atomically."""
    arrays = {f"state/{k}": v for k, v in server.state.items()}
    if server.optimizer is not None:
        arrays.update({f"opt/{k}": v for k, v in server.optimizer.to_state().items()})
    meta = {
        "round": server.round,
        "history": server.history,
        "accountant": None if server.accountant is None else {
            "noise_multiplier": server.accountant.noise_multiplier, "sample_rate": server.accountant.sample_rate,
            "rounds": server.accountant.rounds,
        },
        "optimizer": None if server.optimizer is None else {"lr": server.optimizer.lr},
    }
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with atomic_path(path) as tmp:
        with tmp.open("wb") as handle:
            np.savez(handle, **arrays)
    return path


def load(path: Path, expected: State | None = None) -> ServerState:
    """Read a checkpoint written by `save`; with `expected`, its arrays must have exactly those names and shapes.

    Raises:
        FedrecError: the file is empty, truncated, corrupt, or holds a state of another shape.
    """
    fix = "run with --restart to start over (the checkpoint is replaced)"
    try:
        with np.load(path) as payload:
            meta = json.loads(payload["meta"].tobytes())
            state = {k.removeprefix("state/"): payload[k] for k in payload.files if k.startswith("state/")}
            opt_arrays = {k.removeprefix("opt/"): payload[k] for k in payload.files if k.startswith("opt/")}
        meta["round"], meta["history"], meta["optimizer"], meta["accountant"]  # noqa: B018 - every key must be there
    except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
        raise FedrecError(f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc or 'empty file'}); {fix}") from None
    if expected is not None:
        wrong = sorted(set(expected) ^ set(state)) + sorted(k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape)
        if wrong:
            shown = ", ".join(f"{k} {state[k].shape if k in state else 'missing'} vs {expected[k].shape if k in expected else 'unexpected'}"
                              for k in wrong[:3])
            raise FedrecError(f"checkpoint {path} was written for another model shape ({shown}); {fix}")
    optimizer = None
    if meta["optimizer"] is not None:
        optimizer = FedAdam(lr=meta["optimizer"]["lr"])
        optimizer.load_state(opt_arrays)
    accountant = None
    if meta["accountant"] is not None:
        accountant = RDPAccountant(meta["accountant"]["noise_multiplier"], meta["accountant"]["sample_rate"], meta["accountant"]["rounds"])
    return ServerState(meta["round"], state, optimizer, accountant, meta["history"])
