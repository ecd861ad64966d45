"""The LLM reranker trained under federation (ml-latest-small, 10 IID groups), next to its own tower.

Each (variant, seed) is one `fedrec train` run (`federation.runner.train`, in-process Flower grid) of bench_tower's
10-IID-group recipe with `soft_prompt.enabled`, for `--rounds` rounds. Every round each client trains the tower as in
bench_tower, then the soft prompt and projectors on `--sp-users` of its users (one position each: the history before a
late training item → the tower's top 20 for it → that item, inserted when missed); Flower averages both. The kept
round is the tower's best validation round; each run is compared with its own tower's order (paired). Variants:

- `user`: soft prompt + item tokens + user token, in the product's default prompt (`soft_prompt.template`);
- `personal`: the same + `--personal` personal tokens per client, trained on the client and never sent; each client's
  users are reranked with their own client's tokens of the kept round.

The run's tower order, the LLM order and its validation-tuned fusion with the tower are scored as in
bench_rerank_tower (validation: the first `--valid-eval-users` users; test: all users; the same slices). Results go to
benchmarks/records/rerank-federated/<variant>-seed<k>.json (committed; the trained runs stay under
runs/bench-rerank-federated/); `--report` rebuilds the table and the RESULTS.md section.

Usage: python benchmarks/bench_rerank_federated.py --seeds 0 --variants user personal [--rounds 25] [--sp-users 1] [--personal 4]
       [--valid-eval-users 200] [--threads 1] [--report]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from bench_rerank_tower import KEYS, scored_rows, slice_rows, summary_cells
from bench_tower import EXPERIMENTS
from common import RECORDS, REPO, data_dir, log_command, logged_commands, machine, markdown_table, record_machines, update_results

OUT = RECORDS / "rerank-federated"
RUNS = REPO / "runs" / "bench-rerank-federated"  # the trained runs, and smoke results (not records)
VARIANTS = {"user": "federated: soft prompt + item tokens + user token", "personal": "federated: + personal tokens"}


def recommender(variant: str, seed: int, args):
    from pipeline.config import load_config
    from pipeline.recommender import Recommender

    soft = ["soft_prompt.enabled=false"] if variant == "tower" else [
        "soft_prompt.enabled=true", f"soft_prompt.users={args.sp_users}", "soft_prompt.positions=1",
        *([f"soft_prompt.personal_tokens={args.personal}"] if variant == "personal" else [])]
    overrides = [f"cache_dir={REPO / '.cache'}", f"output_dir={RUNS / 'runs'}", f"federation.seed={seed}", f"partition.seed={seed}",
                 "eval.splits=[test]", *EXPERIMENTS["iid"], "llm.dtype=bfloat16", *soft,
                 # the benchmark reranks validation and test itself (raw LLM scores for the fusion grid and the slices)
                 "eval.rerank_max_users=0", f"federation.rounds={1 if args.smoke else args.rounds}"]
    return Recommender.from_config(load_config(REPO / "configs" / "ml-latest-small.yaml", overrides), run=None)


def trained(variant: str, seed: int, args):
    """The recommender of (variant, seed) and its run folder, trained here unless it is there (resumed after a crash).
    Variant `tower` is this recipe with the soft prompt off: the same tower as the seed's reranker runs."""
    from federation import runner
    from pipeline.trained import run_dir

    rec = recommender(variant, seed, args)
    folder = run_dir(rec)
    if not (folder / "run.json").is_file():
        runner.train(rec, resume=(folder / "checkpoint.npz").is_file(), progress=True)
    return rec, folder


def run_variant(variant: str, seed: int, args) -> dict:
    from federation import runner
    from pipeline.data.partition import partition_users
    from pipeline.trained import load_trained

    rec, folder = trained(variant, seed, args)
    run = load_trained(folder, rec)
    served = rec.with_run(run)
    users = np.arange(10 if args.smoke else rec.dataset.n_users)
    chosen = {"valid": users[: args.valid_eval_users], "test": users}
    requests = {split: served.rerank_requests(chosen[split], split) for split in ("valid", "test")}
    personal = runner.personal_tokens(rec, run.best_round)
    client_of = np.empty(rec.dataset.n_users, np.int64)
    for p, members in enumerate(partition_users(rec.dataset, rec.split.train(), rec.cfg.partition)):
        client_of[members] = p
    rerankers = {p: run.reranker(served, personal=personal(p) if personal else None) for p in np.unique(client_of).tolist()}

    def llm_scores(split, reqs):
        owners = client_of[chosen[split]]
        scores: list = [None] * len(reqs)
        for p, reranker in rerankers.items():
            idx = np.flatnonzero(owners == p)
            for i, s in zip(idx.tolist(), reranker.llm_scores([reqs[i] for i in idx]), strict=True):
                scores[i] = s
        return scores

    out = {"run": folder.name, "variant": variant, "seed": seed, "users": len(users), "best_round": run.best_round,
           "template": rec.cfg.soft_prompt.template, "machine": machine(), "tower": scored_rows(served, chosen, requests, None)}
    out.update(scored_rows(served, chosen, requests, llm_scores, label=f"{variant} seed {seed}"))
    return out


def _run_summary(run: str) -> dict:
    """What the report reads from a `fedrec train` run (its results.json), kept in the run's record: rounds, seconds,
    personal tokens and the per-round soft-prompt loss."""
    trained = json.loads((RUNS / "runs" / run / "results.json").read_text())
    return {"rounds": trained["rounds"], "seconds": trained["seconds"],
            "soft_prompt": {"personal_tokens": trained["soft_prompt"]["personal_tokens"]},
            "history": [{"soft_prompt_loss": h["soft_prompt_loss"]} for h in trained["history"] if "soft_prompt_loss" in h]}


def report() -> None:
    saved: dict[str, list[dict]] = {}
    for path in sorted(OUT.glob("*-seed?.json")):
        result = json.loads(path.read_text())
        saved.setdefault(result["variant"], []).append(result)
    if not saved:
        print("no saved results under", OUT)
        return
    rows, slices_, runs_rows = [], [], []
    for variant, name in VARIANTS.items():
        runs = sorted(saved.get(variant, []), key=lambda r: r["seed"])
        if not runs:
            continue
        base = [r["tower"]["rows"]["llm/test/all"]["N@10"] for r in runs]
        for key, label, results in (("llm", f"{name}: its tower's order", [r["tower"] for r in runs]), ("llm", name, runs),
                                    ("fusion", name + " + fusion", runs)):
            rows.append([label, *summary_cells(results, key, base)])
            slices_ += slice_rows(label, results, key)
        for r in runs:
            trained = r["trained"]
            losses = [h["soft_prompt_loss"] for h in trained["history"] if "soft_prompt_loss" in h]
            curve = ", ".join(f"{np.mean(losses[i:i + 5]):.2f}" for i in range(0, len(losses), 5))
            runs_rows.append([name, r["seed"], r["run"], r["best_round"], trained["rounds"], curve, f"{trained['seconds'] / 60:.0f}"])
    header = ["ranking", "seeds", "valid N@10", *(f"test {k}" for k in KEYS), "test N@10 / its tower (paired)", "fusion w (per seed)"]
    table, slices = markdown_table(header, rows), markdown_table(["ranking", "slice", "users", "test R@10", "test N@10"], slices_)
    runs_table = markdown_table(["ranking", "seed", "run", "kept round", "rounds", "clients' soft-prompt loss, mean per 5 rounds",
                                 "train min"], runs_rows)
    print(table, slices, runs_table, sep="\n\n")
    records = [r for runs in saved.values() for r in runs]
    example, templates = records[0], ", ".join(dict.fromkeys(f"`{r['template']}`" for r in records))
    body = (
        "ml-latest-small, all 610 users. Each run is `fedrec train` of bench_tower's 10-IID-group tower recipe for "
        f"{example['trained']['rounds']} rounds, with the soft prompt (20 tokens), item and user projectors trained in the same rounds on "
        f"the clients and averaged by Flower (FedAvg); each round every client trains them on {example.get('sp_users', 1)} of "
        "its users (one example each: the history before its last training item → the round's tower top-20 → that item, "
        "inserted when missed; Adam lr 1e-2, fresh each round). `personal`: "
        f"{saved['personal'][0]['trained']['soft_prompt']['personal_tokens'] if 'personal' in saved else 0} personal tokens per client in front of the "
        "shared prompt. The kept round is the tower's best validation round; the "
        "first row of each group is that run's own tower order, and the ratios are paired with it. bench_tower's runs go "
        "up to 200 rounds, so these towers are weaker than `bench:tower`'s. SmolLM2-135M-Instruct in-process, bf16 weights, "
        f"fp32 label logits, prompt {templates}; validation (the fusion weight and the valid column): the first "
        f"{example['rows']['llm/valid/all']['users']} users; chance loss ln 20 = 3.00. Central training is in `bench:rerank-tower` "
        "(`rerank.v4`) and `bench:prompt-budget` (`rerank.v4` against `rerank.v6`). Train min is wall time, two runs side "
        "by side on the 2 cores (one thread each), so it is not a speed.\n\n" + table + "\n\nSlices (short = ≤ 20 training items; rare = test target among the "
        "20% least-seen training items):\n\n" + slices + "\n\nRuns:\n\n" + runs_table
    )
    update_results("bench:rerank-federated", "LLM reranker trained under federation (ml-latest-small, 10 IID groups)",
                   logged_commands(OUT), body, record_machines(records))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=25, help="federated rounds (bench_tower's recipe runs up to 200)")
    parser.add_argument("--sp-users", type=int, default=1, help="users per client per round that train the soft prompt")
    parser.add_argument("--personal", type=int, default=4, help="personal tokens per client (variant `personal`)")
    parser.add_argument("--valid-eval-users", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="1 round, 10 users: checks the script end to end (not reported)")
    parser.add_argument("--report", action="store_true", help="only rebuild the table and RESULTS.md from saved results")
    args = parser.parse_args()
    os.environ.setdefault("FEDREC_DATA_DIR", str(data_dir()))
    if not args.report:
        import torch

        torch.set_num_threads(args.threads)
        if not args.smoke:
            log_command(OUT, "bench_rerank_federated.py", sys.argv[1:])
        for seed in args.seeds:
            for variant in args.variants:
                result = run_variant(variant, seed, args)
                result["sp_users"] = args.sp_users
                result["trained"] = _run_summary(result["run"])
                folder = RUNS if args.smoke else OUT
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{variant}-seed{seed}.json").write_text(json.dumps(result, indent=2))
                print(variant, seed, json.dumps({k: v for k, v in result["rows"].items() if k.endswith("test/all")}), flush=True)
    report()


if __name__ == "__main__":
    main()
