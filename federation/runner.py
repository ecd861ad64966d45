"""`fedrec train`: federated training of the retrieval tower on a Flower engine, checkpointed every round."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from federation import checkpoint
from federation.core import Payload, State
from federation.task import ClientData, LLMTask, PrivateStore, ServerState, new_server, tower_config
from pipeline.config import FederationConfig
from pipeline.data import partition_users
from pipeline.errors import FedrecError
from pipeline.evaluate import FunctionScorer, evaluate_scorer
from pipeline.io import write_json
from retrieval.tower import RetrievalTower

if TYPE_CHECKING:
    from pipeline.recommender import Recommender
    from pipeline.rerank import VerbalizerReranker

log = logging.getLogger(__name__)


def run_dir(rec: Recommender) -> Path:
    """Where a configuration's checkpoints and results live: one folder per configuration, ignoring the
    number of rounds and the engine, so `--resume` with more rounds (or on another engine) continues it."""
    cfg = rec.cfg
    federation = cfg.federation.model_dump_json(exclude={"rounds", "engine"})
    key = hashlib.sha256(json.dumps([cfg.data.model_dump_json(), cfg.partition.model_dump_json(), federation,
                                     rec.index_key()]).encode()).hexdigest()[:12]
    return cfg.output_dir / f"train-{rec.dataset.name}-{key}"


def tower_scores(rec: Recommender, state: State, split: str) -> FunctionScorer:
    """A scorer for the evaluator: tower queries against tower item embeddings."""
    import torch

    tower = RetrievalTower(rec.item_vectors, tower_config(rec.cfg.federation))
    tower.load_arrays(state)
    tower.eval()
    with torch.no_grad():
        items = tower.item_embeddings()

    def score(users: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            return (tower.query(histories) @ items.T).numpy()

    return FunctionScorer("tower", score)


def evaluate_state(rec: Recommender, state: State, split: str, users: np.ndarray | None = None) -> dict[str, float]:
    """Full-ranking metrics of the tower on `split`."""
    result = evaluate_scorer(tower_scores(rec, state, split), rec.split, split, rec.dataset.n_items, ks=rec.cfg.eval.ks, users=users)
    return result.metrics


def _llm(rec: Recommender):  # noqa: ANN202 - TransformersBackend
    from pipeline.llm.transformers_backend import TransformersBackend

    if not isinstance(rec.backend, TransformersBackend):
        raise FedrecError("federation.soft_prompt trains through the LLM in-process; set llm.backend=transformers")
    return rec.backend


def client_loader(rec: Recommender, clients: list[np.ndarray]) -> Callable[[int], ClientData]:
    """partition id → that client's data; each client builds its users' profiles and its LLM task itself."""
    train_histories = rec.split.train()
    cfg = rec.cfg

    def load(partition: int) -> ClientData:
        users = clients[partition]
        histories = [train_histories[u] for u in users]
        llm = None
        if cfg.federation.soft_prompt:
            from pipeline.rerank import PromptBuilder

            backend = _llm(rec)
            builder = PromptBuilder(backend, rec.dataset.catalog, cfg.rerank.model_copy(update={"template": "rerank.v2"}), item_tokens=True)
            profiles = [rec.text_profile(h[:-1], rec.dataset.ratings[u][: len(h) - 1]) for u, h in zip(users, histories, strict=True)]
            llm = LLMTask(backend, builder, profiles, cfg.retrieval.num_candidates)
        private = private_store(rec, partition) if cfg.federation.personal_tokens else None
        return ClientData(rec.item_vectors, histories, llm, private)

    return load


def private_store(rec: Recommender, partition: int) -> PrivateStore:
    """Client `partition`'s folder for arrays that never leave it (on its own machine in a deployment)."""
    return PrivateStore(run_dir(rec) / "clients" / f"{partition:05d}")


def trained_reranker(rec: Recommender, state: State, fed: FederationConfig, *, fusion_weight: float = 1.0,
                     personal: State | None = None) -> VerbalizerReranker:
    """A verbalizer reranker with a run's trained soft prompt and item tokens (`rerank.v2` prompts; the
    projector reads the run's tower item embeddings), for any candidates. `personal`: a client's personal tokens."""
    import torch

    from federation.softprompt import SoftPrompt
    from pipeline.rerank import PromptBuilder, VerbalizerReranker

    backend = _llm(rec)
    tower = RetrievalTower(rec.item_vectors, tower_config(fed))
    tower.load_arrays(state)
    tower.eval()
    module = SoftPrompt(fed.soft_prompt_tokens, backend.hidden_size, fed.tower_dim, personal=fed.personal_tokens if personal else 0)
    module.load_arrays(state)
    if personal:
        module.load_personal(personal)
    with torch.no_grad():
        prompt, tokens = module.full_prompt(), module.item_tokens(tower.item_embeddings())
    builder = PromptBuilder(backend, rec.dataset.catalog, rec.cfg.rerank.model_copy(update={"template": "rerank.v2"}), item_tokens=True)
    return VerbalizerReranker(backend, builder, fusion_weight=fusion_weight, soft_prompt=prompt, item_tokens=lambda ids: tokens[list(ids)])


def evaluate_rerank_state(rec: Recommender, state: State, split: str, users: np.ndarray,
                          clients: list[np.ndarray] | None = None) -> dict[str, Any]:
    """Tower top-N candidates reranked with the trained soft prompt and item tokens (misses count as 0).

    With `federation.personal_tokens`, each client's users are reranked with that client's personal
    tokens (read from its private folder: per-client evaluation runs where the client's data is).
    With `clients`, the result also has `by_client`: each client's mean metrics over its users.
    """
    from pipeline.evaluate import list_counts, metrics_from_counts
    from pipeline.rerank import RerankRequest

    cfg = rec.cfg
    tower = RetrievalTower(rec.item_vectors, tower_config(cfg.federation))
    tower.load_arrays(state)
    histories = rec.split.histories(split)
    _, candidates = tower.top_candidates([histories[u] for u in users], cfg.retrieval.num_candidates)
    found = dict(zip(users.tolist(), candidates, strict=True))
    wanted = set(users.tolist())
    groups = [(i, np.array([u for u in c if u in wanted], dtype=np.int64)) for i, c in enumerate(clients or [users])]
    groups = [(i, g) for i, g in groups if len(g)]
    ranked: dict[int, list[int]] = {}
    for partition, members in groups:
        personal = private_store(rec, partition).latest() if clients and cfg.federation.personal_tokens else None
        reranker = trained_reranker(rec, state, cfg.federation, personal=personal)
        requests = [RerankRequest(rec.profile(int(u), split), tuple(histories[u].tolist()), tuple(found[int(u)])) for u in members]
        for u, result in zip(members.tolist(), reranker.rerank_batch(requests), strict=True):
            ranked[u] = [x.item for x in result]
    order = np.array(sorted(ranked), dtype=np.int64)
    greater, ties = list_counts([ranked[u] for u in order.tolist()], rec.split.targets(split)[order])
    per_user = metrics_from_counts(greater, ties, cfg.eval.ks, max_rank=rec.dataset.n_items)
    out: dict[str, Any] = {k: float(v.mean()) for k, v in per_user.items()}
    if clients:
        position = {u: i for i, u in enumerate(order.tolist())}
        out["by_client"] = [{"client": p, "users": len(g), **{k: float(v[[position[u] for u in g.tolist()]].mean()) for k, v in per_user.items()}}
                            for p, g in groups]
    return out


def train(rec: Recommender, *, resume: bool = False, progress: bool = False, grid: Any = None) -> dict[str, Any]:
    """Run federated rounds; after each, evaluate on validation and checkpoint atomically.

    With `resume`, continue from the last checkpoint of the same configuration; the result is
    identical to an uninterrupted run. With `grid` (inside a deployed ServerApp), rounds run on
    that grid instead of starting an engine.
    """
    cfg = rec.cfg.federation
    clients = partition_users(rec.dataset, rec.split.train(), rec.cfg.partition)
    train_histories = rec.split.train()
    text_vectors = rec.item_vectors
    folder = run_dir(rec)
    ckpt = folder / "checkpoint.npz"
    if resume and ckpt.is_file():
        server = checkpoint.load(ckpt)
        log.warning("resuming %s from round %d", folder, server.round)
    elif resume:
        raise FedrecError(f"--resume: no checkpoint at {ckpt}; run without --resume to start")
    else:
        server = new_server(text_vectors, cfg, len(clients), llm_hidden=_llm(rec).hidden_size if cfg.soft_prompt else None)
    payload = Payload()

    load = client_loader(rec, clients)

    from pipeline.ui import rate_progress

    eval_users = np.arange(rec.dataset.n_users if rec.cfg.eval.max_users is None else min(rec.cfg.eval.max_users, rec.dataset.n_users))
    with rate_progress("rounds", enabled=progress) as bar:
        task = bar.add_task("federated rounds", total=cfg.rounds, completed=server.round)

        def on_round(state: ServerState, report: dict[str, Any]) -> None:
            report["valid"] = evaluate_state(rec, state.state, "valid", eval_users)
            up = sum(r["bytes"] for r in payload.rows if r["round"] == state.round and r["direction"] == "up")
            down = sum(r["bytes"] for r in payload.rows if r["round"] == state.round and r["direction"] == "down")
            report["bytes_up"], report["bytes_down"] = up, down
            state.history.append(report)
            checkpoint.save(state, ckpt)
            bar.advance(task, 1)

        if cfg.secagg:
            from federation.secagg import make_secagg_client_app, make_secagg_server_app
            from retrieval.tower import sliding_windows

            most = max(len(sliding_windows([train_histories[u] for u in c], cfg.tower_max_len, rec.dataset.n_items)[0]) for c in clients)
            server_app = make_secagg_server_app(server, cfg, len(clients), max_weight=float(max(most, 1)), on_round=on_round)
            client_app = make_secagg_client_app(load, cfg)
        else:
            from federation.flower_apps import make_client_app, make_server_app

            server_app = make_server_app(server, cfg, len(clients), on_round=on_round, payload=payload)
            client_app = make_client_app(load)
        if server.round < cfg.rounds and grid is not None:
            from flwr.app import Context, RecordDict

            server_app(grid, Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}))
        elif server.round < cfg.rounds:
            _run_engine(cfg.engine, server_app, client_app, len(clients))
    results = {
        "dataset": rec.dataset.name, "clients": len(clients), "rounds": server.round, "engine": cfg.engine,
        "federation": cfg.model_dump(), "partition": rec.cfg.partition.model_dump(), "history": server.history,
        "test": evaluate_state(rec, server.state, "test", eval_users),
        "state_bytes": int(sum(v.nbytes for v in server.state.values())),
    }
    if cfg.soft_prompt:
        results["test_rerank"] = evaluate_rerank_state(rec, server.state, "test", eval_users, clients)
    if server.accountant is not None:
        results["epsilon"] = server.accountant.epsilon(cfg.dp_delta)
    write_json(folder / "results.json", results)
    return results


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
