"""ServerApp and ClientApp for Flower's Deployment Engine (SuperLink + one SuperNode per client site).

Both read the run config: `config` (a fedrec YAML path) and `overrides` (`key=value` pairs
separated by `;`). Each SuperNode's `node_config` carries its `partition-id`, and the ClientApp
loads only that partition's histories.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from federation.flower_apps import make_client_app, partition_reply


@lru_cache(maxsize=4)
def _recommender(config: str, overrides: str):  # noqa: ANN202 - pipeline.recommender.Recommender
    from pipeline.config import load_config
    from pipeline.recommender import Recommender

    cfg = load_config(config or None, [o.strip() for o in overrides.split(";") if o.strip()])
    return Recommender.from_config(cfg)


def _run_settings(run_config: dict[str, Any]) -> tuple[str, str]:
    return str(run_config.get("config", "")), str(run_config.get("overrides", ""))


def make_deployment_server_app() -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from federation.runner import train

        rec = _recommender(*_run_settings(context.run_config))
        train(rec, grid=grid, resume=bool(context.run_config.get("resume", False)))

    return app


def make_deployment_client_app() -> ClientApp:
    app = ClientApp()
    inner: dict[tuple[str, str], ClientApp] = {}

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        from pipeline.data import partition_users

        settings = _run_settings(context.run_config)
        if settings not in inner:
            from federation.runner import client_loader
            from federation.strategies import client_mods

            rec = _recommender(*settings)
            inner[settings] = make_client_app(client_loader(rec, partition_users(rec.dataset, rec.split.train(), rec.cfg.partition)),
                                              client_mods(rec.cfg.federation))
        return inner[settings](msg, context)

    app.query()(partition_reply)
    return app
