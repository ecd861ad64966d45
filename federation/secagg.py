"""Secure aggregation (SecAgg+) through Flower 1.42's legacy workflow.

In Flower 1.42 SecAgg+ exists only as `SecAggPlusWorkflow` inside the legacy `DefaultWorkflow`
with a legacy strategy and a `NumPyClient` wrapped with `secaggplus_mod`. The server then sees
only the example-weighted mean of the clients' deltas, never a single update, so per-update
validation, robust aggregation and central DP do not apply; the config rejects those combinations.
Values are clipped to `secagg_clipping_range` and quantised to `secagg_quantization_range` levels
after being scaled by examples / max_weight, which bounds the error against plain FedAvg.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import ndarrays_to_parameters
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp

from federation.core import add
from federation.flower_apps import ClientLoader, wait_for_nodes
from federation.task import Recipe, ServerState, keep_going, local_train


def make_secagg_client_app(load: ClientLoader, recipe: Recipe) -> ClientApp:
    """A ClientApp whose `fit` returns its delta (sorted by name) for secure averaging."""

    class _Client(NumPyClient):
        def __init__(self, partition: int) -> None:
            self.partition = partition

        def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict[str, Any]]:
            keys = sorted(str(k) for k in str(config["keys"]).split(","))
            state = dict(zip(keys, parameters, strict=True))
            round_ = int(config["round"])
            delta, examples, metrics = local_train(state, load(self.partition), recipe, seed=round_ * 100_003 + self.partition, round_=round_)
            return [delta[k].astype(np.float64) for k in keys], examples, {"loss": float(metrics["loss"])}

    def client_fn(context: Context):  # noqa: ANN202 - flwr.client.Client
        return _Client(int(context.node_config["partition-id"])).to_client()

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod])


def make_secagg_server_app(
    server: ServerState, recipe: Recipe, n_clients: int, *, max_weight: float,
    on_round: Callable[[ServerState, dict[str, Any]], None],
) -> ServerApp:
    """Rounds from `server.round + 1` while `keep_going`, each a SecAgg+ weighted mean of the client deltas."""
    app = ServerApp()
    cfg = recipe.federation

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        wait_for_nodes(grid, n_clients)
        keys = sorted(server.state)
        while keep_going(server, cfg):
            server.round += 1
            round_ = server.round
            strategy = LegacyFedAvg(
                fraction_fit=1.0, min_fit_clients=n_clients, min_available_clients=n_clients, fraction_evaluate=0.0,
                min_evaluate_clients=0, initial_parameters=ndarrays_to_parameters([server.state[k] for k in keys]),
                on_fit_config_fn=lambda _, r=round_: {"round": r, "keys": ",".join(keys)},
            )
            legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=1), strategy=strategy)
            workflow = SecAggPlusWorkflow(
                num_shares=cfg.secagg_num_shares, reconstruction_threshold=cfg.secagg_threshold, max_weight=max_weight,
                clipping_range=cfg.secagg_clipping_range, quantization_range=cfg.secagg_quantization_range,
            )
            DefaultWorkflow(fit_workflow=workflow)(grid, legacy)
            mean = context.state.array_records["parameters"].to_numpy_ndarrays()
            update = {k: m.astype(server.state[k].dtype) for k, m in zip(keys, mean, strict=True)}
            server.state = add(server.state, update)
            on_round(server, {"round": round_, "asked": n_clients, "received": n_clients, "accepted": n_clients, "rejected": [],
                              "applied": True, "secure_aggregation": "SecAgg+", "failed": [], "missing": 0})

    return app
