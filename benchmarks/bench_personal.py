"""Federated retrieval + rerank on ml-latest-small, and personalization: per-client NDCG@10 with and without personal tokens.

Ten clients (random user groups) train the retrieval tower, the shared soft prompt and the item-token
projector with FedAvg (`soft_prompt.enabled=true`, SmolLM2-135M-Instruct frozen, bf16 weights,
fp32 label logits). The second run adds personal tokens that each client trains and keeps to
itself (`soft_prompt.personal_tokens`); everything else, seeds included, is the same. The test
users are reranked with their own client's personal tokens, and each client's mean NDCG@10 is
compared between the two runs.

Usage: python benchmarks/bench_personal.py [--rounds 2] [--users-per-round 24] [--eval-users 300] [--personal 4]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from common import REPO, data_dir, markdown_table, update_results

KEYS = ("R@5", "N@5", "R@10", "N@10", "R@20", "N@20", "MRR")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-epochs", type=int, default=4, help="tower epochs per round")
    parser.add_argument("--users-per-round", type=int, default=24, help="users per client training the soft prompt each round")
    parser.add_argument("--eval-users", type=int, default=300)
    parser.add_argument("--personal", type=int, default=4, help="personal tokens per client")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "plots"))
    args = parser.parse_args()
    os.environ["FEDREC_DATA_DIR"] = str(data_dir())

    from federation.checkpoint import load
    from federation.runner import run_dir, train
    from pipeline.config import load_config
    from pipeline.recommender import Recommender

    cache, runs = str(Path.home() / ".cache" / "fedrec"), tempfile.mkdtemp(prefix="fedrec-bench-")
    common = [f"cache_dir={cache}", f"output_dir={runs}", "partition.scheme=group", "partition.num_clients=10", "partition.split=random",
              "tower.lr=0.003", f"federation.rounds={args.rounds}", f"federation.local_epochs={args.local_epochs}",
              "soft_prompt.enabled=true", f"soft_prompt.users={args.users_per_round}", f"eval.max_users={args.eval_users}",
              "llm.dtype=bfloat16"]
    results, minutes = {}, {}
    for personal in (0, args.personal):
        rec = Recommender.from_config(load_config(REPO / "configs" / "ml-latest-small.yaml", [*common, f"soft_prompt.personal_tokens={personal}"]))
        start = time.perf_counter()
        results[personal] = train(rec, progress=True)
        minutes[personal] = (time.perf_counter() - start) / 60
        print(personal, {k: round(results[personal]["test_rerank"][k], 4) for k in KEYS}, f"{minutes[personal]:.1f} min", flush=True)

    plain, personal = results[0], results[args.personal]

    def row(name: str, metrics: dict[str, float], extra: str = "") -> list[str]:
        return [name, *(f"{metrics[k]:.4f}" for k in KEYS), extra]

    table = markdown_table(["model (federated, 10 IID groups)", *KEYS, "wall time (both stages)"], [
        row("retrieval only: federated tower", plain["test"]),
        row("retrieval + rerank: shared soft prompt + item tokens", plain["test_rerank"], f"{minutes[0]:.0f} min"),
        row(f"retrieval + rerank: + {args.personal} personal tokens per client", personal["test_rerank"], f"{minutes[args.personal]:.0f} min"),
    ])
    before = {c["client"]: c for c in plain["test_rerank"]["by_client"]}
    after = {c["client"]: c for c in personal["test_rerank"]["by_client"]}
    clients = sorted(before)
    diffs = np.array([after[c]["N@10"] - before[c]["N@10"] for c in clients])
    per_client = markdown_table(["client", "test users", "N@10 shared prompt", "N@10 + personal tokens", "difference"],
                                [[c, before[c]["users"], f"{before[c]['N@10']:.4f}", f"{after[c]['N@10']:.4f}", f"{after[c]['N@10'] - before[c]['N@10']:+.4f}"]
                                 for c in clients])
    summary = (f"Per-client NDCG@10: median {np.median([before[c]['N@10'] for c in clients]):.4f} → "
               f"{np.median([after[c]['N@10'] for c in clients]):.4f}; {int((diffs > 0).sum())} clients up, {int((diffs < 0).sum())} down, "
               f"{int((diffs == 0).sum())} unchanged; mean difference {diffs.mean():+.4f}.")
    upload = plain["history"][0]["bytes_up"] / plain["history"][0]["accepted"]
    state = load(run_dir(rec) / "checkpoint.npz").state  # the last run's; its shared arrays have the same shapes
    soft = {k: v.nbytes for k, v in state.items() if k.startswith("soft/")}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.boxplot([[before[c]["N@10"] for c in clients], [after[c]["N@10"] for c in clients]], showmeans=True)
    ax.set_xticks([1, 2], ["shared soft prompt", f"+ {args.personal} personal tokens"])
    for c in clients:
        ax.plot([1, 2], [before[c]["N@10"], after[c]["N@10"]], color="grey", alpha=0.4, marker=".")
    ax.set_ylabel("client's mean test NDCG@10")
    ax.set_title("per-client NDCG@10 (10 clients)")
    fig.tight_layout()
    fig.savefig(out / "personalization.png", dpi=120)

    print(table, per_client, summary, sep="\n\n")
    update_results(
        "bench:personal", "Federated retrieval + rerank and personal tokens",
        f"python benchmarks/bench_personal.py --rounds {args.rounds} --users-per-round {args.users_per_round} "
        f"--eval-users {args.eval_users} --personal {args.personal}",
        f"ml-latest-small, 10 clients (random user groups), FedAvg, {args.rounds} rounds. Each round a client trains the tower "
        f"for {args.local_epochs} local epochs (Adam, lr 3e-3) on all its users, then the soft prompt (20 tokens) and item-token "
        f"projector for one epoch over {args.users_per_round} of its users (Adam lr 1e-2, batch 8; candidates from its local "
        f"tower, positive inserted when missed). SmolLM2-135M-Instruct frozen, bf16 weights, fp32 label logits. Test: the first "
        f"{args.eval_users} users, full ranking, 20 tower candidates reranked (a tower miss counts as 0). Seeded; one run each. "
        f"One client uploads {upload:,.0f} bytes per round (tower delta + soft prompt + projector, fp32, uncompressed; the "
        f"soft prompt is {soft['soft/prompt']:,} bytes, the projector {soft['soft/projector.weight'] + soft['soft/projector.bias']:,}); personal tokens are never uploaded.\n\n{table}\n\n{per_client}\n\n"
        f"{summary}\n\n![per-client NDCG@10](plots/personalization.png)",
    )


if __name__ == "__main__":
    main()
