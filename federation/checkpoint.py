"""Atomic checkpoints of the server state after every round."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from federation.core import FedAdam, RDPAccountant
from federation.task import ServerState
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


def load(path: Path) -> ServerState:
    """Read a checkpoint written by `save`."""
    with np.load(path) as payload:
        meta = json.loads(payload["meta"].tobytes())
        state = {k.removeprefix("state/"): payload[k] for k in payload.files if k.startswith("state/")}
        opt_arrays = {k.removeprefix("opt/"): payload[k] for k in payload.files if k.startswith("opt/")}
    optimizer = None
    if meta["optimizer"] is not None:
        optimizer = FedAdam(lr=meta["optimizer"]["lr"])
        optimizer.load_state(opt_arrays)
    accountant = None
    if meta["accountant"] is not None:
        accountant = RDPAccountant(meta["accountant"]["noise_multiplier"], meta["accountant"]["sample_rate"], meta["accountant"]["rounds"])
    return ServerState(meta["round"], state, optimizer, accountant, meta["history"])
