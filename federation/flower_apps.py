"""Flower adapters (flwr 1.42 Message API): they only translate Messages to and from `federation.task`.

The ClientApp unpacks the global arrays, calls `local_train` on its own partition and replies
with its new arrays and its example count. The ServerApp loops over rounds: it samples clients
(seeded), lets the configured Flower strategy build the messages, collects replies (failed,
missing or malformed clients are logged and skipped), validates each client's delta
(`review_round`), and hands the valid replies to the strategy's `aggregate_train`.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from federation.compression import decode
from federation.core import Payload, State, add, delta_of
from federation.strategies import EXAMPLES_KEY, UNIT_KEY, SampledGrid, load_strategy_state, make_strategy, strategy_state
from federation.task import (
    ClientData,
    ClientResult,
    Recipe,
    ServerState,
    account_round,
    keep_going,
    local_train,
    review_round,
    upload,
)

log = logging.getLogger(__name__)
UPDATE_KEY = "update"
"""Reply record that holds a compressed update (instead of the full "arrays")."""
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


def make_client_app(load: ClientLoader, mods: list | None = None) -> ClientApp:
    """A ClientApp whose data comes from `load(partition_id)`, which runs on the client only; `mods` wrap it
    (`federation.strategies.client_mods`: Flower's clipping mod under client-side DP)."""
    app = ClientApp(mods=list(mods or []))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        partition = int(context.node_config["partition-id"])
        recipe = Recipe.from_json(str(msg.content["config"]["recipe"]))
        round_ = int(msg.content["config"]["round"])
        start = from_record(msg.content["arrays"])
        data = load(partition)
        delta, examples, metrics = local_train(start, data, recipe, seed=round_ * 100_003 + partition, round_=round_)
        if recipe.federation.compresses_uploads:  # the server decodes it into full arrays for the strategy
            arrays = {UPDATE_KEY: to_record(upload(delta, data, recipe.federation, round_=round_))}
        else:  # Flower's strategies take the clients' full arrays
            arrays = {"arrays": to_record(add(start, delta))}
        reply = RecordDict({
            **arrays,
            "metrics": MetricRecord({EXAMPLES_KEY: int(examples), UNIT_KEY: 1, "loss": float(metrics["loss"]), "partition-id": partition,
                                     **({"soft_prompt_loss": float(metrics["soft_prompt_loss"])} if "soft_prompt_loss" in metrics else {})}),
        })
        return Message(reply, reply_to=msg)

    app.query()(partition_reply)
    return app


def partition_reply(msg: Message, context: Context) -> Message:
    """A ClientApp's answer to the server's query: which partition this node holds (see `partition_order`)."""
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": int(context.node_config["partition-id"])})}), reply_to=msg)


def partition_order(grid: Grid, nodes: list[int], timeout: float) -> list[int]:
    """`nodes` in the order of the partitions they hold (asked once), so that seeded sampling picks the same partitions in
    every engine (node ids are random in the Simulation and Deployment Engines); nodes that do not say come last."""
    messages = [Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY, group_id="partitions") for node in nodes]
    held: dict[int, int] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        try:
            held[reply.metadata.src_node_id] = int(reply.content["metrics"]["partition-id"])
        except (KeyError, TypeError, ValueError, AttributeError):  # an error reply or a malformed one: order it last
            log.warning("node %s did not say which partition it holds", reply.metadata.src_node_id)
    return sorted(nodes, key=lambda node: (held.get(node, len(nodes)), node))


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
    aggregating with the configured Flower strategy and calling `on_round` after each."""
    app = ServerApp()
    cfg = recipe.federation

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        logging.getLogger("flwr").setLevel(logging.WARNING)  # Flower logs every sampling and aggregation at INFO
        nodes = partition_order(grid, wait_for_nodes(grid, n_clients), reply_timeout)
        sampled = min(cfg.clients_per_round or len(nodes), len(nodes))
        rate = sampled / len(nodes)  # Poisson sampling: each node's chance per round
        strategy = make_strategy(cfg, sampled)
        load_strategy_state(strategy, server.strategy_state)
        while keep_going(server, cfg):
            server.round += 1
            rng = np.random.default_rng([cfg.seed, server.round])
            # Sample positions, not ids: node ids are unsigned 64-bit and numpy would turn them into floats.
            if cfg.sampling == "poisson":
                picked = np.flatnonzero(rng.random(len(nodes)) < rate)
            else:
                picked = rng.choice(len(nodes), size=sampled, replace=False)
            chosen = sorted(nodes[int(i)] for i in picked)
            asked = set(chosen)
            random.seed(cfg.seed * 1_000_003 + server.round)  # the order Flower's sampler visits the chosen nodes
            config = ConfigRecord({"round": server.round, "recipe": recipe.to_json()})
            messages = list(strategy.configure_train(server.round, to_record(server.state), config, SampledGrid(grid, chosen))) if chosen else []
            for message in messages:
                message.metadata.group_id = str(server.round)
            replies = list(grid.send_and_receive(messages, timeout=reply_timeout))
            results, failures, valid, seen = [], [], {}, set()
            for reply in replies:
                node = reply.metadata.src_node_id
                if node not in asked or node in seen:  # never averaged: it was not asked, or already answered
                    failures.append({"node": node, "reason": "not sampled this round" if node not in asked else "a second reply"})
                    continue
                seen.add(node)
                if reply.has_error():
                    failures.append({"node": node, "reason": reply.error.reason})
                    continue
                try:
                    metrics = reply.content["metrics"]
                    client = int(metrics["partition-id"])
                    if UPDATE_KEY in reply.content:
                        sent = from_record(reply.content[UPDATE_KEY])
                        delta = decode(sent, server.state)  # a CompressionError (a ValueError) names what is wrong
                        del reply.content[UPDATE_KEY]
                        reply.content["arrays"] = to_record(add(server.state, delta))
                    else:
                        delta = delta_of(from_record(reply.content["arrays"]), server.state)
                        sent = delta
                    losses = {"loss": float(metrics["loss"])}
                    if "soft_prompt_loss" in metrics:
                        losses["soft_prompt_loss"] = float(metrics["soft_prompt_loss"])
                    result = ClientResult(client, delta, int(metrics[EXAMPLES_KEY]), losses)
                except (KeyError, TypeError, ValueError) as exc:  # a malformed reply is a failed client, never a crash
                    failures.append({"node": node, "reason": f"malformed reply: {exc}"})
                    continue
                if client in valid:
                    failures.append({"node": node, "reason": f"claims partition {client}, which another node answered"})
                    continue
                results.append(result)
                valid[client] = reply
                if payload is not None:
                    payload.record(server.round, client, "down", server.state)
                    payload.record(server.round, client, "up", sent)
            results.sort(key=lambda r: r.client)  # replies arrive in any order; aggregation must not depend on it
            missing = len(chosen) - len(seen)
            for failure in failures:
                log.warning("round %d: client node %s failed: %s", server.round, failure["node"], failure["reason"])
            report, accepted = review_round(server, results, cfg, expected=len(chosen))
            if not chosen:
                report["reason"] = "Poisson sampling picked no client this round"
                account_round(server, cfg, report)  # the round still counts towards ε
            if accepted:
                np.random.seed(cfg.seed * 1_000_003 + server.round)  # Flower's DP noise draws from numpy's global generator
                for r in accepted:  # the weight the strategy reads, after review_round's bound
                    valid[r.client].content["metrics"][EXAMPLES_KEY] = r.examples
                poisson_dp = cfg.sampling == "poisson" and cfg.dp_clip is not None
                if poisson_dp:  # Flower's noise on the mean of n is std z·C/n: the Gaussian sum mechanism, divided by n
                    strategy.num_sampled_clients = len(accepted)
                aggregated, _ = strategy.aggregate_train(server.round, [valid[r.client] for r in accepted])
                if aggregated is None:
                    report.update({"applied": False, "reason": "the strategy aggregated nothing"})
                else:
                    arrays = from_record(aggregated)
                    if poisson_dp:  # divide the noised sum by the expected count instead (fixed-denominator estimator)
                        arrays = add(server.state, delta_of(arrays, server.state), len(accepted) / (rate * len(nodes)))
                    server.state = {k: arrays[k].astype(v.dtype) for k, v in server.state.items()}
                    server.strategy_state = strategy_state(strategy)
                    account_round(server, cfg, report)
                    if "dp/clipping_norm" in server.strategy_state:
                        report["dp_clipping_norm"] = float(server.strategy_state["dp/clipping_norm"][0])
            report.update({"failed": failures, "missing": missing})
            on_round(server, json.loads(json.dumps(report, default=str)))

    return app
