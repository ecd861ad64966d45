"""Flower adapters (flwr 1.42 Message API): they only translate Messages to and from `federation.task`.

The ClientApp unpacks the global arrays, calls `local_train` on its own partition and replies
with the delta and its example count. The ServerApp loops over rounds, sends the global state,
collects replies (failed or missing clients are logged and skipped) and calls `server_round`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from federation.core import Payload, State
from federation.task import ClientData, ClientResult, Recipe, ServerState, keep_going, local_train, server_round

log = logging.getLogger(__name__)
ClientLoader = Callable[[int], ClientData]
"""partition id → that client's private data."""


def to_record(state: State) -> ArrayRecord:
    """Named arrays → ArrayRecord (bit-exact; Flower stores 0-d arrays as shape (1,), so they are refused)."""
    scalars = [k for k, v in state.items() if np.ndim(v) == 0]
    if scalars:
        raise ValueError(f"arrays {scalars} are 0-d; Flower would return them as shape (1,); store them as shape (1,)")
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def from_record(record: ArrayRecord) -> State:
    """ArrayRecord → named arrays."""
    return {k: a.numpy() for k, a in record.items()}


def make_client_app(load: ClientLoader) -> ClientApp:
    """A ClientApp whose data comes from `load(partition_id)`, which runs on the client only."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        partition = int(context.node_config["partition-id"])
        recipe = Recipe.from_json(str(msg.content["config"]["recipe"]))
        round_ = int(msg.content["config"]["round"])
        delta, examples, metrics = local_train(from_record(msg.content["arrays"]), load(partition), recipe, seed=round_ * 100_003 + partition, round_=round_)
        reply = RecordDict({
            "arrays": to_record(delta),
            "metrics": MetricRecord({"num-examples": int(examples), "loss": float(metrics["loss"]), "partition-id": partition}),
        })
        return Message(reply, reply_to=msg)

    return app


def wait_for_nodes(grid: Grid, n: int, timeout: float = 300.0) -> list[int]:
    """Node ids once at least `n` nodes have registered (they may join after the ServerApp starts)."""
    start = time.monotonic()
    while len(ids := sorted(grid.get_node_ids())) < n:
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"only {len(ids)} of {n} clients connected within {timeout:.0f} s")
        time.sleep(0.5)
    return ids


def make_server_app(
    server: ServerState, recipe: Recipe, n_clients: int, *, on_round: Callable[[ServerState, dict[str, Any]], None],
    payload: Payload | None = None, reply_timeout: float = 3600.0,
) -> ServerApp:
    """A ServerApp that runs rounds from `server.round + 1` while `keep_going` (rounds left, validation still improving),
    calling `on_round` after each."""
    app = ServerApp()
    cfg = recipe.federation

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        nodes = wait_for_nodes(grid, n_clients)
        while keep_going(server, cfg):
            server.round += 1
            rng = np.random.default_rng([cfg.seed, server.round])
            # Sample positions, not ids: node ids are unsigned 64-bit and numpy would turn them into floats.
            picked = rng.choice(len(nodes), size=min(cfg.clients_per_round or len(nodes), len(nodes)), replace=False)
            chosen = sorted(nodes[int(i)] for i in picked)
            config = ConfigRecord({"round": server.round, "recipe": recipe.to_json()})
            messages = [
                Message(RecordDict({"arrays": to_record(server.state), "config": config}), dst_node_id=node,
                        message_type="train", group_id=str(server.round))
                for node in chosen
            ]
            replies = list(grid.send_and_receive(messages, timeout=reply_timeout))
            results, failures = [], []
            for reply in replies:
                if reply.has_error():
                    failures.append({"node": reply.metadata.src_node_id, "reason": reply.error.reason})
                    continue
                metrics = reply.content["metrics"]
                client = int(metrics["partition-id"])
                delta = from_record(reply.content["arrays"])
                results.append(ClientResult(client, delta, int(metrics["num-examples"]), {"loss": float(metrics["loss"])}))
                if payload is not None:
                    payload.record(server.round, client, "down", server.state)
                    payload.record(server.round, client, "up", delta)
            results.sort(key=lambda r: r.client)  # replies arrive in any order; aggregation must not depend on it
            missing = len(chosen) - len(replies)
            for failure in failures:
                log.warning("round %d: client node %s failed: %s", server.round, failure["node"], failure["reason"])
            report = server_round(server, results, cfg, expected=len(chosen))
            report.update({"failed": failures, "missing": missing})
            on_round(server, json.loads(json.dumps(report, default=str)))

    return app
