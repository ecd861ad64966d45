"""Federated retrieval-tower experiments on ml-latest-small (DESIGN.md protocol, test split).

Claim 1 (personalisation through federation): zero-shot vs local-only vs federated vs
centralized, IID vs non-IID groups, one user per client vs user groups. Claim 2 (communication):
bytes per client per round against sending the full LLM or the full retrieval stack. Claim 3
(privacy vs utility): ε against Recall@10 for several noise levels. Also metric-vs-round curves.

Usage: python benchmarks/bench_federation.py [--rounds 10] [--out benchmarks/plots] [--quick]

`--quick` (3 rounds, fewer privacy points) checks the whole experiment in a few minutes and only
prints its tables; RESULTS.md holds the full run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from common import REPO, data_dir, markdown_table, update_results


def _parameters(folder: str | Path) -> int:
    """Parameter count of a model folder, read from its safetensors headers."""
    from safetensors import safe_open

    total = 0
    for file in Path(folder).glob("*.safetensors"):
        with safe_open(str(file), framework="np") as handle:
            for key in handle.keys():
                total += int(np.prod(handle.get_slice(key).get_shape()))
    return total


def _rec(cache: str, out: str, *overrides: str):
    from pipeline.config import load_config
    from pipeline.recommender import Recommender

    cfg = load_config(REPO / "configs" / "ml-latest-small.yaml", [f"cache_dir={cache}", f"output_dir={out}", "tower.lr=0.003", *overrides])
    return Recommender.from_config(cfg)


def _local_only(rec) -> dict[str, float]:
    """Each client trains alone (no aggregation) for the same number of epochs; its users are scored by its own tower."""
    import torch

    from federation.task import initial_state, tower_config
    from pipeline.data import partition_users
    from pipeline.evaluate import metrics_from_counts, rank_counts
    from retrieval.tower import RetrievalTower, train_tower

    cfg = rec.cfg.federation
    clients = partition_users(rec.dataset, rec.split.train(), rec.cfg.partition)
    start = initial_state(rec.item_vectors, cfg)
    greater, ties = np.zeros(rec.dataset.n_users), np.zeros(rec.dataset.n_users)
    histories, targets = rec.split.histories("test"), rec.split.targets("test")
    for i, users in enumerate(clients):
        tower = RetrievalTower(rec.item_vectors, tower_config(cfg))
        tower.load_arrays(start)
        train_tower(tower, [rec.split.train()[u] for u in users], epochs=cfg.rounds * cfg.local_epochs, lr=cfg.lr, seed=i)
        with torch.no_grad():
            scores = (tower.query([histories[u] for u in users]) @ tower.item_embeddings().T).numpy()
        g, t = rank_counts(scores, targets[users], [histories[u] for u in users])
        greater[users], ties[users] = g, t
    return {k: float(v.mean()) for k, v in metrics_from_counts(greater, ties, rec.cfg.eval.ks, max_rank=rec.dataset.n_items).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "plots"))
    parser.add_argument("--quick", action="store_true", help="3 rounds, fewer privacy points; print only")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.out = 3, tempfile.mkdtemp(prefix="fedrec-plots-")
    os.environ["FEDREC_DATA_DIR"] = str(data_dir())

    from federation.runner import evaluate_state, train
    from federation.task import initial_state
    from pipeline.evaluate import FunctionScorer, evaluate_scorer
    from pipeline.llm.transformers_backend import resolve_model
    from retrieval.embed import resolve_model_path

    cache, runs = str(Path.home() / ".cache" / "fedrec"), tempfile.mkdtemp(prefix="fedrec-bench-")
    r = f"federation.rounds={args.rounds}"
    groups = ["partition.scheme=group", "partition.num_clients=10"]
    rows, curves, timings = [], {}, {}

    def record(name: str, metrics: dict[str, float], extra: str = "") -> None:
        rows.append([name, *(f"{metrics[k]:.4f}" for k in ("R@5", "N@5", "R@10", "N@10", "R@20", "N@20", "MRR")), extra])
        print(rows[-1], flush=True)

    base = _rec(cache, runs, r, *groups)
    record("zero-shot text retrieval (hybrid)", evaluate_scorer(
        FunctionScorer("text", lambda u, h: base.score_users(u, "test")), base.split, "test", base.dataset.n_items, ks=[5, 10, 20]).metrics)
    record("untrained tower (text projection)", evaluate_state(base, initial_state(base.item_vectors, base.cfg.federation), "test"))
    experiments = [
        ("centralized (1 client, all data)", ["partition.scheme=group", "partition.num_clients=1"]),
        ("federated, 10 IID groups (FedAvg)", [*groups, "partition.split=random"]),
        ("federated, 10 non-IID groups (Dirichlet 0.3)", [*groups, "partition.split=dirichlet", "partition.alpha=0.3"]),
        ("federated, 1 user per client (50 of 610 per round)", ["partition.scheme=user", "federation.clients_per_round=50"]),
    ]
    results = {}
    for name, overrides in experiments:
        start = time.perf_counter()
        result = train(_rec(cache, runs, r, *overrides))
        timings[name] = time.perf_counter() - start
        results[name] = result
        curves[name] = [h["valid"]["N@10"] for h in result["history"]]
        record(name, result["test"], f"{timings[name] / 60:.1f} min")
    start = time.perf_counter()
    record("local-only, 10 IID groups (no aggregation)", _local_only(_rec(cache, runs, r, *groups, "partition.split=random")),
           f"{(time.perf_counter() - start) / 60:.1f} min")
    table = markdown_table(["model", "R@5", "N@5", "R@10", "N@10", "R@20", "N@20", "MRR", "wall time"], rows)

    # Claim 3: privacy vs utility.
    privacy = []
    points = [(0.5, 0.0), (0.5, 1.0)] if args.quick else [(c, 0.0) for c in (0.5, 2.0, 8.0)] + [(c, n) for c in (2.0,) for n in (0.3, 1.0, 3.0)]
    for clip_bound, noise in points:
        overrides = [*groups, "partition.split=random", f"federation.dp_clip={clip_bound}", f"federation.dp_noise_multiplier={noise}"]
        result = train(_rec(cache, runs, r, *overrides))
        eps = result.get("epsilon", float("inf"))
        privacy.append([f"{clip_bound:g}", f"{noise:g}", "∞" if not np.isfinite(eps) else f"{eps:.2f}", f"{result['test']['R@10']:.4f}",
                        f"{result['test']['N@10']:.4f}"])
        if noise > 0 or clip_bound == 2.0:
            curves[f"DP clip {clip_bound:g}, noise {noise:g}"] = [h["valid"]["N@10"] for h in result["history"]]
        print(privacy[-1], flush=True)
    privacy_table = markdown_table(["clip (L2)", "noise multiplier", "ε (δ=1e-5)", "R@10", "N@10"], privacy)

    # Claim 2: communication.
    llm_params = _parameters(resolve_model("SmolLM2-135M-Instruct", Path(cache)))
    minilm_params = _parameters(resolve_model_path("all-MiniLM-L6-v2"))
    fed = results["federated, 10 IID groups (FedAvg)"]
    state_bytes = fed["state_bytes"]
    per_round_up = fed["history"][0]["bytes_up"] / 10
    comm = markdown_table(
        ["what one client sends per round", "bytes", "vs fedrec update"],
        [["fedrec: retrieval-tower delta (measured)", f"{per_round_up:,.0f}", "1×"],
         ["full LLM, SmolLM2-135M fp32", f"{llm_params * 4:,}", f"{llm_params * 4 / per_round_up:,.0f}×"],
         ["full LLM, SmolLM2-135M bf16", f"{llm_params * 2:,}", f"{llm_params * 2 / per_round_up:,.0f}×"],
         ["full retrieval stack: MiniLM encoder + tower, fp32", f"{minilm_params * 4 + state_bytes:,}", f"{(minilm_params * 4 + state_bytes) / per_round_up:,.0f}×"]],
    )
    total_up = sum(h["bytes_up"] for h in fed["history"])

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), curve, marker="o", label=name)
    ax.set_xlabel("round")
    ax.set_ylabel("validation NDCG@10")
    ax.set_title("ml-latest-small: federated retrieval tower")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "federation_rounds.png", dpi=120)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    noisy_clip = float(points[-1][0])
    series = [p for p in privacy if float(p[0]) == noisy_clip]
    eps_values = [float(p[2]) if p[2] != "∞" else np.nan for p in series]
    right = max((x for x in eps_values if np.isfinite(x)), default=1.0) * 1.5
    ax.plot([e if np.isfinite(e) else right for e in eps_values], [float(p[3]) for p in series], marker="o", label=f"clip {noisy_clip:g}")
    ax.set_xscale("log")
    ax.set_xlabel("ε (δ = 1e-5); rightmost point: no noise")
    ax.set_ylabel("test Recall@10")
    ax.set_title("privacy vs utility")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "privacy_utility.png", dpi=120)

    print(table, privacy_table, comm, sep="\n\n")
    if args.quick:
        print(f"\n--quick: plots in {out}; RESULTS.md not updated")
        return
    norm = float(np.median([h["update_norm_median"] for h in fed["history"]]))
    update_results(
        "bench:federation", "Federated retrieval tower on ml-latest-small",
        f"python benchmarks/bench_federation.py --rounds {args.rounds}",
        f"Test split, full ranking over 3,650 items with history excluded. Tower: 64-dim, 2 attention layers, last 50 items; "
        f"{args.rounds} rounds × 1 local epoch (Adam, lr 3e-3); centralized and local-only train for the same number of epochs. "
        f"Seeded; one run each.\n\n{table}\n\nPrivacy vs utility (central DP, 10 IID groups, every client every round; without "
        f"clipping the median client update has L2 norm {norm:.2f}):\n\n"
        f"{privacy_table}\n\nCommunication (10 IID groups): one client uploads {per_round_up:,.0f} bytes per round and downloads the same; "
        f"all clients uploaded {total_up:,} bytes over {args.rounds} rounds.\n\n{comm}\n\n"
        f"![metric vs round](plots/federation_rounds.png)\n![privacy vs utility](plots/privacy_utility.png)",
    )

if __name__ == "__main__":
    main()
