"""The retrieval tower on ml-latest-small (test split, full ranking over all items, history excluded).

Experiments (each a seed list; mean ± sd over seeds):
- `central`: one model on all training histories, AdamW, validation R@10 after every epoch, best
  epoch kept, early stop with patience;
- `iid`, `noniid`: `fedrec train` with 10 user groups (random, or Dirichlet α=0.3 over the dominant
  genre), one local epoch per round, best round kept; test metrics through the run's client FAISS indices;
- `device`: one user per client, 61 of the 610 clients sampled per round (cross-device), 5 local steps each, at most 150 rounds;
- `iid-id`: `iid` with ID-only item embeddings (random init) instead of the text-initialised ones: the
  FM-vs-ID ablation, also on users with ≤ 20 training items and on the 20% least-seen target items.

Usage: python benchmarks/bench_tower.py [--experiments central iid noniid device iid-id] [--seeds 0 1 2]
       [--threads 2] [--report]

Every finished (experiment, seed) is saved under runs/bench-tower/; `--report` rebuilds the tables and the
RESULTS.md section from what is saved, so experiments can run as separate processes side by side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from common import REPO, data_dir, log_command, logged_commands, markdown_table, mean_sd, update_results

OUT = REPO / "runs" / "bench-tower"
# Small local batches and a higher client lr: a client of 61 users holds ~90 windows of 200, so batch 64 gives it
# only 2 optimiser steps per round; batch 16 gives 6 at a quarter of the cost each.
FED = ["partition.scheme=group", "partition.num_clients=10", "federation.rounds=200", "federation.patience=15",
       "tower.batch_size=16", "tower.lr=0.002"]
EXPERIMENTS = {
    "central": [],
    "iid": [*FED, "partition.split=random"],
    "noniid": [*FED, "partition.split=dirichlet", "partition.alpha=0.3"],
    "iid-id": [*FED, "partition.split=random", "tower.item_init=id"],
    # Cross-device: each client holds one user (one or two windows), so local work is sized in steps.
    "device": ["partition.scheme=user", "federation.clients_per_round=61", "federation.local_steps=5", "federation.rounds=150",
               "federation.patience=20", "tower.batch_size=16", "tower.lr=0.002"],
}
LABELS = {
    "central": "centralized (one model, best epoch)",
    "iid": "federated, 10 IID groups",
    "noniid": "federated, 10 non-IID groups (Dirichlet 0.3)",
    "iid-id": "federated, 10 IID groups, ID-only items",
    "device": "federated, one user per client (61 of 610 per round, 5 local steps)",
}
KEYS = ["R@10", "N@10", "R@20", "MRR"]


def _rec(experiment: str, seed: int, cache: Path):
    from pipeline.config import load_config
    from pipeline.recommender import Recommender

    overrides = [f"cache_dir={cache}", f"output_dir={OUT / 'runs'}", f"federation.seed={seed}", f"partition.seed={seed}",
                 "eval.splits=[test]", *EXPERIMENTS[experiment]]
    return Recommender.from_config(load_config(REPO / "configs" / "ml-latest-small.yaml", overrides), run=None)


def per_user(rec, scores: np.ndarray) -> dict[str, np.ndarray]:
    """Per-user test metrics of `(n_users, n_items)` scores (the evaluator's own functions)."""
    from pipeline.evaluate import metrics_from_counts, rank_counts

    greater, ties = rank_counts(scores, rec.split.targets("test"), rec.split.histories("test"))
    return metrics_from_counts(greater, ties, [10, 20], max_rank=rec.dataset.n_items)


def slices(rec, metrics: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """All users, users with ≤ 20 training items, and users whose test target is among the 20% least-seen items."""
    train = rec.split.train()
    counts = np.bincount(np.concatenate(train), minlength=rec.dataset.n_items)
    rare = counts <= np.quantile(counts, 0.2)
    masks = {"all": np.ones(rec.dataset.n_users, bool), "short": np.array([len(h) <= 20 for h in train]),
             "rare": rare[rec.split.targets("test")]}
    return {name: {"users": int(m.sum()), **{k: float(metrics[k][m].mean()) for k in KEYS}} for name, m in masks.items()}


def run_central(seed: int, cache: Path) -> dict:
    from pipeline.evaluate import FunctionScorer, evaluate_scorer
    from retrieval.tower import RetrievalTower, fit_tower

    rec = _rec("central", seed, cache)
    tower = RetrievalTower.create(rec.item_vectors, rec.cfg.tower, seed=seed)

    def valid(t) -> float:
        items = t.item_matrix()
        scorer = FunctionScorer("tower", lambda u, h: t.encode(h) @ items.T)
        return evaluate_scorer(scorer, rec.split, "valid", rec.dataset.n_items, ks=[10]).metrics["R@10"]

    start = time.perf_counter()
    fit = fit_tower(tower, rec.split.train(), valid, max_epochs=200, patience=15, seed=seed,
                    on_epoch=lambda e, row: print(f"central seed {seed} epoch {e}: loss {row['loss']:.3f} valid R@10 {row['valid']:.4f}", flush=True))
    seconds = time.perf_counter() - start
    per_epoch = seconds / fit["epochs"]
    scores = tower.encode(rec.split.histories("test")) @ tower.item_matrix().T
    return {"slices": slices(rec, per_user(rec, scores)), "best": fit["best_epoch"], "steps": fit["epochs"],
            "seconds_to_best": per_epoch * fit["best_epoch"], "seconds": seconds, "valid": fit["best_valid"]}


def run_federated(experiment: str, seed: int, cache: Path) -> dict:
    from federation.runner import train
    from pipeline.trained import load_trained, run_dir

    rec = _rec(experiment, seed, cache)
    results = train(rec, progress=True)
    served = rec.with_run(load_trained(run_dir(rec), rec))
    metrics = per_user(served, served.score_users(np.arange(rec.dataset.n_users), "test"))
    out = {"slices": slices(rec, metrics), "best": results["best_round"], "steps": results["rounds"],
           "seconds_to_best": results["seconds_to_best"], "seconds": results["seconds"], "valid": results["valid"]["R@10"],
           "run_test": results["test"], "bytes_up": results["bytes_up_per_client_round"]}
    clients = sum(h["received"] for h in results["history"])
    out["client_updates_per_s"] = clients / max(results["seconds"], 1e-9)
    return out



def report() -> None:
    saved: dict[str, list[dict]] = {}
    for path in sorted(OUT.glob("*-seed*.json")):
        experiment = path.name.rsplit("-seed", 1)[0]
        saved.setdefault(experiment, []).append(json.loads(path.read_text()))
    if not saved:
        raise SystemExit(f"nothing saved under {OUT}; run some experiments first")
    central = statistics.mean(r["slices"]["all"]["R@10"] for r in saved.get("central", [])) if "central" in saved else None
    rows = []
    for name in EXPERIMENTS:
        if name not in saved:
            continue
        runs = saved[name]
        r10 = [r["slices"]["all"]["R@10"] for r in runs]
        ratio = f"{statistics.mean(r10) / central:.0%}" if central and name != "central" else "—"
        unit = "epoch" if name == "central" else "round"
        rows.append([LABELS[name], len(runs), *(mean_sd([r["slices"]["all"][k] for r in runs]) for k in KEYS), ratio,
                     f"{statistics.median(r['best'] for r in runs):.0f} ({unit})", f"{statistics.median(r['seconds_to_best'] for r in runs):.0f}",
                     f"{statistics.median(r['seconds'] for r in runs):.0f}",
                     f"{statistics.median(r['client_updates_per_s'] for r in runs):.1f}" if "client_updates_per_s" in runs[0] else "—"])
    main = markdown_table(["tower", "seeds", *[f"test {k}" for k in KEYS], "R@10 vs central", "best", "s to best", "s total",
                           "client updates/s"], rows)
    slice_rows = []
    for name in ("iid", "iid-id", "central"):
        for part in ("all", "short", "rare"):
            if name in saved:
                runs = saved[name]
                slice_rows.append([LABELS[name], part, runs[0]["slices"][part]["users"], *(mean_sd([r["slices"][part][k] for r in runs]) for k in ("R@10", "N@10"))])
    body = (
        "Protocol: ml-latest-small, 5-core, leave-one-out by (timestamp, item id), full ranking over all 3,650 items with the "
        "user's history excluded, all 610 test users; mean ± sd over seeds (each seed changes the init, the client split and "
        "the shuffling). Tower: 2 causal self-attention blocks, dim 64, max_len 200, inputs × √d, dropout 0.2, AdamW lr 1e-3 "
        "wd 0.01, batch 64 centrally (federated: batch 16, client lr 2e-3, one local epoch per round), full-softmax cross-entropy. Model selection on validation R@10 (patience 15 epochs centrally, 10 "
        "rounds federated). Federated test metrics go through the run's client FAISS indices (the path `fedrec evaluate --run` "
        "and `recommend` use). Anchors: independent full-CE SASRec on this machine 0.1164 ± 0.0016 / 0.0659; popularity 0.0443 / 0.0211.\n\n"
        + main + "\n\nFM-initialised (text + residual) vs ID-only item embeddings, by slice (short = ≤ 20 training items; rare = test "
        "target among the 20% least-seen items in training):\n\n"
        + markdown_table(["tower", "slice", "users", "R@10", "N@10"], slice_rows)
    )
    print(main)
    print(markdown_table(["tower", "slice", "users", "R@10", "N@10"], slice_rows))
    commands = logged_commands(OUT)
    update_results("bench:tower", "Retrieval tower: centralized and federated (ml-latest-small)", commands, body)


def main() -> None:
    import os
    import sys

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", nargs="+", choices=list(EXPERIMENTS), default=list(EXPERIMENTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 when running experiments side by side)")
    parser.add_argument("--report", action="store_true", help="only rebuild the tables and RESULTS.md from saved results")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("FEDREC_DATA_DIR", str(data_dir()))
    if not args.report:
        log_command(OUT, "bench_tower.py", sys.argv[1:])
        cache = REPO / ".cache"
        for experiment in args.experiments:
            for seed in args.seeds:
                result = run_central(seed, cache) if experiment == "central" else run_federated(experiment, seed, cache)
                OUT.mkdir(parents=True, exist_ok=True)
                (OUT / f"{experiment}-seed{seed}.json").write_text(json.dumps(result, indent=2))
                print(experiment, seed, json.dumps(result["slices"]["all"]), flush=True)
    report()


if __name__ == "__main__":
    main()
