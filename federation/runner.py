"""`fedrec train`: federated training of the retrieval tower on a Flower engine, checkpointed every round.

Rounds stop when validation R@10 has not improved for `federation.patience` rounds; the best round's
state is what the run folder keeps (`pipeline.trained`), with the tower's item embeddings, every
client's local FAISS index, results.json and a model card. Test metrics go through exactly the
FAISS path that `fedrec evaluate --run`, `recommend` and `serve` use.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from federation import checkpoint
from federation.core import Payload, State
from federation.task import ClientData, LLMTask, PrivateStore, Recipe, ServerState, kept_round, new_server
from pipeline.data import partition_users
from pipeline.errors import FedrecError
from pipeline.evaluate import evaluate_rerank_served, evaluate_served, evaluate_state
from pipeline.trained import export_run, finish_run, run_dir, write_state
from retrieval.tower import sliding_windows

if TYPE_CHECKING:
    from pipeline.recommender import Recommender

log = logging.getLogger(__name__)

# Cross-silo runs write every client's index at the end; cross-device clients build theirs on first use.
MAX_EXPORTED_INDICES = 100


def _llm(rec: Recommender):  # noqa: ANN202 - TransformersBackend
    from pipeline.llm.transformers_backend import TransformersBackend

    if not isinstance(rec.backend, TransformersBackend):
        raise FedrecError("soft_prompt.enabled trains through the LLM in-process; set llm.backend=transformers")
    return rec.backend


def client_loader(rec: Recommender, clients: list[np.ndarray]) -> Callable[[int], ClientData]:
    """partition id → that client's data; each client builds its users' profiles and its LLM task itself."""
    train_histories = rec.split.train()
    cfg = rec.cfg

    def load(partition: int) -> ClientData:
        users = clients[partition]
        histories = [train_histories[u] for u in users]
        llm = None
        if cfg.soft_prompt.enabled:
            from pipeline.rerank import trained_prompt_builder

            backend = _llm(rec)
            builder = trained_prompt_builder(backend, rec.dataset.catalog, cfg.rerank, cfg.soft_prompt)

            def profile(i: int, p: int, users: np.ndarray = users) -> str:
                return rec.text_profile(histories[i][:p], rec.dataset.ratings[users[i]][:p])

            llm = LLMTask(backend, builder, profile, cfg.retrieval.num_candidates)
        private = private_store(rec, partition) if cfg.soft_prompt.personal_tokens else None
        fed = cfg.federation
        feedback = private_store(rec, partition, "feedback") if fed.compresses_uploads and fed.error_feedback else None
        return ClientData(rec.item_vectors, histories, llm, private, feedback)

    return load


def personal_tokens(rec: Recommender, round_: int) -> Callable[[int], State] | None:
    """partition → that client's personal tokens as they were after `round_` (the kept round), when the run has them."""
    if not rec.cfg.soft_prompt.personal_tokens:
        return None
    return lambda partition: private_store(rec, partition).load_before(round_ + 1)


def private_store(rec: Recommender, partition: int, stem: str = "personal") -> PrivateStore:
    """Client `partition`'s folder for arrays that never leave it (on its own machine in a deployment)."""
    return PrivateStore(run_dir(rec) / "clients" / f"{partition:05d}", stem, keep_all=stem == "personal")


def train(rec: Recommender, *, resume: bool = False, progress: bool = False, grid: Any = None) -> dict[str, Any]:
    """Run federated rounds until `federation.rounds` or early stopping; after each, evaluate on validation,
    keep the best state and checkpoint atomically. Then write the run folder (see `pipeline.trained`).

    With `resume`, continue from the last checkpoint of the same configuration; the result is
    identical to an uninterrupted run. With `grid` (inside a deployed ServerApp), rounds run on
    that grid instead of starting an engine.
    """
    recipe = Recipe.of(rec.cfg)
    cfg = recipe.federation
    clients = partition_users(rec.dataset, rec.split.train(), rec.cfg.partition)
    folder = run_dir(rec)
    ckpt = folder / "checkpoint.npz"
    fresh = new_server(rec.item_vectors, recipe, len(clients), llm_hidden=_llm(rec).hidden_size if rec.cfg.soft_prompt.enabled else None)
    if resume and ckpt.is_file():
        server = checkpoint.load(ckpt, expected=fresh.state)
        wanted, found = fresh.accountant, server.accountant
        if (wanted is None) != (found is None) or (wanted and (wanted.noise_multiplier, wanted.sample_rate) != (found.noise_multiplier, found.sample_rate)):
            raise FedrecError(f"checkpoint {ckpt} holds privacy accounting {found} but this config needs {wanted}: "
                              "ε could not be reported truthfully; run with --restart to start over")
        log.warning("resuming %s from round %d", folder, server.round)
    elif resume:
        raise FedrecError(f"--resume: no checkpoint at {ckpt}; run without --resume to start")
    else:
        (folder / "run.json").unlink(missing_ok=True)  # a fresh start is not complete until it finishes
        shutil.rmtree(folder / "clients", ignore_errors=True)  # client-side arrays of an earlier attempt must not leak in
        server = fresh
    payload = Payload()
    load = client_loader(rec, clients)

    from pipeline.ui import rate_progress

    eval_users = np.arange(rec.dataset.n_users if rec.cfg.eval.max_users is None else min(rec.cfg.eval.max_users, rec.dataset.n_users))
    started = time.perf_counter()
    round_started = [time.perf_counter()]
    with rate_progress("rounds", enabled=progress) as bar:
        task = bar.add_task("federated rounds", total=cfg.rounds, completed=server.round)

        def on_round(state: ServerState, report: dict[str, Any]) -> None:
            report["valid"] = evaluate_state(rec, state.state, "valid", eval_users)
            rows = [r for r in payload.rows if r["round"] == state.round]
            report["bytes_up"] = sum(r["bytes"] for r in rows if r["direction"] == "up")
            report["bytes_down"] = sum(r["bytes"] for r in rows if r["direction"] == "down")
            report["seconds"] = time.perf_counter() - round_started[0]
            state.history.append(report)
            if kept_round(state.history, cfg) == state.round:
                write_state(folder, state.state, state.round)
            checkpoint.save(state, ckpt)
            bar.update(task, completed=state.round, description=f"round {state.round}: valid R@10 {report['valid']['R@10']:.4f}")
            round_started[0] = time.perf_counter()

        if rec.cfg.federation.secagg:
            from federation.secagg import make_secagg_client_app, make_secagg_server_app

            train_histories = rec.split.train()
            most = max(len(sliding_windows([train_histories[u] for u in c], rec.cfg.tower.max_len, rec.dataset.n_items)[0]) for c in clients)
            server_app = make_secagg_server_app(server, recipe, len(clients), max_weight=float(max(most, 1)), on_round=on_round)
            client_app = make_secagg_client_app(load, recipe)
        else:
            from federation.flower_apps import make_client_app, make_server_app

            server_app = make_server_app(server, recipe, len(clients), on_round=on_round, payload=payload)
            from federation.strategies import client_mods

            client_app = make_client_app(load, client_mods(rec.cfg.federation))
        if server.round < cfg.rounds and grid is not None:
            from flwr.app import Context, RecordDict

            server_app(grid, Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}))
        elif server.round < cfg.rounds:
            _run_engine(cfg.engine, server_app, client_app, len(clients))
    if server.history and not any(h.get("accepted") for h in server.history):
        raise FedrecError(f"no client update was accepted in {len(server.history)} round(s), so nothing was learned: "
                          f"{_first_failure(server.history)}; fix the cause and rerun with --restart")
    best = kept_round(server.history, cfg)
    if not (folder / "best.npz").is_file():
        raise FedrecError(f"no round reported a validation metric, so {folder} holds no best state; rerun `fedrec train`")
    run = export_run(rec, folder, clients=len(clients), index_clients=len(clients) <= MAX_EXPORTED_INDICES)
    served = rec.with_run(run)
    per_round = [h for h in server.history if h.get("bytes_up")]
    asked = [max(int(h.get("received", 1)), 1) for h in per_round]
    results = {
        "dataset": rec.dataset.name, "users": rec.dataset.n_users, "items": rec.dataset.n_items, "clients": len(clients),
        "rounds": server.round, "best_round": best, "engine": cfg.engine, "seconds": float(sum(h.get("seconds", 0.0) for h in server.history)),
        "seconds_to_best": float(sum(h.get("seconds", 0.0) for h in server.history if h["round"] <= best)),
        "federation": cfg.model_dump(mode="json"), "tower": rec.cfg.tower.model_dump(mode="json"),
        "soft_prompt": rec.cfg.soft_prompt.model_dump(mode="json"), "partition": rec.cfg.partition.model_dump(mode="json"),
        "history": server.history, "eval_users": int(len(eval_users)),
        "valid": next(h["valid"] for h in server.history if h["round"] == best),
        "test": evaluate_served(served, "test", eval_users),
        "state_bytes": int(sum(v.nbytes for v in server.state.values())),
        "bytes_up_per_client_round": int(np.mean([h["bytes_up"] / a for h, a in zip(per_round, asked, strict=True)])) if per_round else 0,
        "bytes_down_per_client_round": int(np.mean([h["bytes_down"] / a for h, a in zip(per_round, asked, strict=True)])) if per_round else 0,
        "wall_seconds": time.perf_counter() - started,
    }
    rerank_users = eval_users[: rec.cfg.eval.rerank_max_users]
    if rec.cfg.soft_prompt.enabled and len(rerank_users):
        results["test_rerank"] = evaluate_rerank_served(served, "test", rerank_users, clients, personal=personal_tokens(rec, best))
    if server.accountant is not None:
        results.update(server.accountant.report(cfg.dp_delta))
    finish_run(rec, run, results)
    return results


def _first_failure(history: list[dict[str, Any]]) -> str:
    for h in history:
        for problem in h.get("rejected", []) + h.get("failed", []):
            return f"round {h['round']}: {problem.get('reason')}"
    return "no client answered"


def _run_engine(engine: str, server_app: Any, client_app: Any, n_clients: int) -> None:
    if engine == "inprocess":
        from federation.inprocess import run_inprocess

        run_inprocess(server_app, client_app, n_clients)
        return
    if engine == "simulation":
        try:
            from flwr.simulation import run_simulation
        except ImportError:
            raise ImportError("federation.engine=simulation needs Flower's simulation extra: pip install 'flwr[simulation]==1.42.0'") from None
        run_simulation(
            server_app=server_app, client_app=client_app, num_supernodes=n_clients,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                            "init_args": {"num_cpus": 2, "num_gpus": 0, "object_store_memory": 200 * 1024**2}},
        )
        return
    raise FedrecError(
        "federation.engine=deployment runs through Flower's SuperLink and SuperNodes: start them, then "
        "`flwr run federation/deploy <connection>` (README: 'Deployment Engine')"
    )
