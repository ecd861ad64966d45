"""Zero-shot LLM reranking on ml-latest-small: retrieval top-20 vs the verbalizer, over all users.

The fusion weight is tuned on validation (weight 0 = retrieval order) and applied to test. A
user whose target was not retrieved counts as a miss, so retrieval R@20 is the ceiling.

Usage: python benchmarks/bench_rerank.py [--users N] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import os
import time

from common import REPO, data_dir, markdown_table, update_results

METRICS = ("R@5", "N@5", "R@10", "N@10", "R@20", "N@20", "MRR")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=None, help="first N users (default: all 610)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    args = parser.parse_args()
    os.environ["FEDREC_DATA_DIR"] = str(data_dir())

    from pipeline.config import load_config
    from pipeline.evaluate import evaluate_recommender
    from pipeline.recommender import Recommender

    overrides = ["eval.splits=[valid, test]", f"llm.dtype={args.dtype}"]
    if args.users:
        overrides.append(f"eval.max_users={args.users}")
    cfg = load_config(REPO / "configs" / "ml-latest-small.yaml", overrides)
    rec = Recommender.from_config(cfg, run=None)  # zero-shot text retrieval, as this section reports
    start = time.perf_counter()
    report = evaluate_recommender(rec, stage="rerank", progress=True)
    minutes = (time.perf_counter() - start) / 60
    rows = [[r["split"], r["model"], *(f"{r[m]:.4f}" for m in METRICS), f"{r['ceiling_R@20']:.4f}",
             f"{r['users_per_s']:.2f}" if "users_per_s" in r else "—"] for r in report["rows"]]
    table = markdown_table(["split", "model", *METRICS, "retrieval R@20 (ceiling)", "LLM users/s"], rows)
    fusion = markdown_table(["weight", *map(str, report["fusion_table"])], [["validation N@10", *(f"{v:.4f}" for v in report["fusion_table"].values())]])
    print(table)
    print(fusion)
    update_results(
        "bench:rerank", "Zero-shot LLM reranking on ml-latest-small",
        f"python benchmarks/bench_rerank.py --dtype {args.dtype}" + (f" --users {args.users}" if args.users else ""),
        f"{report['users']} users, {report['backend']}, 20 candidates from zero-shot hybrid text retrieval, prompt `rerank.v1`, "
        f"no training. `verbalizer` ranks by the label log-probs alone; `verbalizer+fusion w` fuses them with the retrieval "
        f"scores at the weight chosen on validation (w={report['fusion_weight']:g}). Deterministic; one run took "
        f"{minutes:.1f} min.\n\n{table}\n\nFusion weight search on validation (NDCG@10 over the same users):\n\n{fusion}",
    )


if __name__ == "__main__":
    main()
