"""Does a leaner prompt cost the trained reranker accuracy? Each prompt against `rerank.v4`, the former default, on the same users (ml-latest-small).

For each seed, bench_rerank_tower's `user` row (soft prompt + item tokens + user token, trained centrally over a tower
run's served top-20) is trained and scored once per prompt (`--prompts`), with everything else the same: the tower run,
the training and validation users, their examples, the training budget and the initialisation. Prompts:

- `v4`: `rerank.v4` at the product's budget (genres, 10 history titles, 10-token titles): the former default prompt, the baseline of the pairing;
- `v4-lean`: `rerank.v4` with no history titles and 4-token candidate titles;
- `v5`: `rerank.v5`, the user token and one item token per candidate, no titles;
- `v6`: `rerank.v6`, `rerank.v5` with each candidate's bare letter (4 positions per candidate instead of 6);
- `tower`: the tower's own order, no LLM (the same for every seed).

Each prompt's test N@10 (all users) is divided by `v4`'s of the same seed (paired), for the LLM order and for its
validation-tuned fusion with the tower, and by the tower order's. Speeds are bench_speed's (all prompts side by side in one run); this script runs one
torch thread per process, so several seeds or prompts can run side by side. Results go to
benchmarks/records/prompt-budget/<prompt>-seed<k>.json (committed); `--report` rebuilds the table and the RESULTS.md section
from them.

Usage: python benchmarks/bench_prompt_budget.py --seeds 0 1 2 --prompts tower v4 v5 [--run <fedrec train run folder>]
       [--train-users 120] [--valid-users 50] [--positions 2] [--epochs 2] [--valid-eval-users 200] [--threads 1] [--report]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from bench_rerank_tower import add_budget_arguments, run_variant, summary_cells
from common import RECORDS, REPO, data_dir, log_command, logged_commands, machine, markdown_table, record_machines, update_results

OUT = RECORDS / "prompt-budget"
SMOKE = REPO / "runs" / "bench-prompt-budget"  # smoke results are not records
BUDGETS = {"v4": {"template": "rerank.v4"}, "v4-lean": {"template": "rerank.v4", "max_history_titles": 0, "max_title_tokens": 4},
           "v5": {"template": "rerank.v5"}, "v6": {"template": "rerank.v6"}}
"""Each prompt's `soft_prompt` settings over the product's defaults (bench_speed times the same ones)."""
PROMPTS = {
    "tower": "the tower's order (FAISS top-20, no LLM)",
    "v4": "rerank.v4: genres, 10 history titles, 10-token titles (former default)",
    "v4-lean": "rerank.v4: no history titles, 4-token titles",
    "v5": "rerank.v5: user and item tokens, no titles",
    "v6": "rerank.v6: rerank.v5 with bare letters",
}


def default_run() -> Path:
    """bench_rerank_federated's 10-IID-group tower of seed 0, 25 rounds, without the soft prompt (its seed-0 reranker runs
    train the same tower); trained here when it is not there yet (a few minutes)."""
    from bench_rerank_federated import trained

    return trained("tower", 0, argparse.Namespace(smoke=False, rounds=25))[1]


def report() -> None:
    saved: dict[str, dict[int, dict]] = {}
    for path in sorted(OUT.glob("*-seed*.json")):
        result = json.loads(path.read_text())
        if not result.get("eval_users_limited"):
            saved.setdefault(result["prompt"], {})[result["seed"]] = result
    if not saved:
        print("no saved results under", OUT)
        return
    setups = {(r["run"], r.get("dtype", "bfloat16")) for by_seed in saved.values() for r in by_seed.values()}
    if len(setups) > 1:
        raise SystemExit(f"the results under {OUT} come from several (tower run, dtype) setups {sorted(setups)}; "
                         "pairing needs one: move the others away")
    base = {seed: r["rows"] for seed, r in saved.get("v4", {}).items()}
    tower = next(iter(saved.get("tower", {}).values()), None)
    tower_n10 = tower["rows"]["llm/test/all"]["N@10"] if tower else None
    rows, curves = [], []
    for prompt, name in PROMPTS.items():
        runs = [saved[prompt][s] for s in sorted(saved.get(prompt, {}))]
        for key, label in (("llm", name), ("fusion", name + " + fusion")) if prompt != "tower" else (("llm", name),):
            if not runs:
                continue
            paired = [None if prompt == "tower" else base.get(r["seed"], {}).get(f"{key}/test/all", {}).get("N@10") for r in runs]
            cells = summary_cells(runs, key, paired)
            to_tower = summary_cells(runs, key, [tower_n10] * len(runs))[5]
            rows.append([label, *cells[:5], to_tower, *cells[5:]])
        for r in runs:
            if prompt == "tower":
                continue
            t = r["training"]
            curves.append([name, r["seed"], t["examples"], f"{t['loss_first']:.3f}",
                           "; ".join(f"{p['train_loss']:.3f} / {p['valid_loss']:.3f}" for p in t["curve"]), t["best_epoch"], f"{t['minutes']:.1f}"])
    header = ["prompt", "seeds", "valid N@10", "test R@10", "test N@10", "test MRR", "test N@10 / tower order",
              "test N@10 / rerank.v4 (paired)", "fusion w (per seed)"]
    table = markdown_table(header, rows)
    losses = markdown_table(["prompt", "seed", "train examples", "first batch loss", "per epoch: train / valid loss", "kept epoch",
                             "train min"], curves)
    print(table, losses, sep="\n\n")
    example = next(iter(next(iter(saved.values())).values()))
    body = (
        f"ml-latest-small, all {example['users']} test users, the served top-20 of one federated tower run (`{example['run']}`, "
        "by default bench_rerank_federated's 10-IID-group recipe at seed 0 with the soft prompt off) reranked by "
        f"SmolLM2-135M-Instruct in-process ({example.get('dtype', 'bfloat16')} weights, fp32 label logits). "
        "Every prompt trains bench_rerank_tower's `user` row (20-token soft prompt, item and user projectors, trained centrally; "
        "Adam lr 1e-2, batch 8, the epoch with the lowest validation loss kept) with the same users, examples and init for a "
        "seed; seeds vary the training users and the init over the same tower. The ratio column divides each seed's test "
        "N@10 by `rerank.v4`'s for the same seed and row (LLM order or fusion), then averages over seeds. Validation (the "
        f"fusion weight and the valid column): the first {example['rows']['llm/valid/all']['users']} users. Speeds of these "
        "prompts are in `bench:speed`."
        + ("" if base else " `rerank.v4` (`v4`) has no saved result yet, so the paired column is empty.")
        + "\n\n" + table + "\n\nTraining (loss of the target's label among 20; chance ln 20 = 3.00):\n\n" + losses
    )
    update_results("bench:prompt-budget", "Prompt budget against accuracy: the trained reranker, paired with the former default prompt (ml-latest-small)",
                   logged_commands(OUT), body, record_machines([r for runs in saved.values() for r in runs.values()]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="a fedrec train run folder on ml-latest-small (its tower and client indices); "
                        "default: bench_rerank_federated's recipe, seed 0, with the soft prompt off (trained here if absent)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="LLM weights (float32: the unrounded model; which dtype is faster depends on the CPU, see bench:speed)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--prompts", nargs="+", choices=list(PROMPTS), default=list(PROMPTS))
    add_budget_arguments(parser, train_users=120, valid_users=50, threads=1)
    args = parser.parse_args()
    os.environ.setdefault("FEDREC_DATA_DIR", str(data_dir()))
    if not args.report:
        import torch

        if args.run is None:
            args.run = default_run()
        if not (args.run / "run.json").is_file():
            parser.error("--run must be a finished `fedrec train` folder on ml-latest-small (e.g. one of bench_rerank_federated's runs)")
        torch.set_num_threads(args.threads)
        if args.eval_users is None:
            log_command(OUT, "bench_prompt_budget.py", [a if not Path(a).is_absolute() else str(Path(a).relative_to(REPO)) for a in sys.argv[1:]])
        for seed in args.seeds:
            for prompt in args.prompts:
                overrides = [f"llm.dtype={args.dtype}", *(f"soft_prompt.{k}={v}" for k, v in BUDGETS.get(prompt, {}).items())]
                result = run_variant(args.run, "tower" if prompt == "tower" else "user", seed, args, overrides=overrides)
                result.update(prompt=prompt, dtype=args.dtype, eval_users_limited=args.eval_users is not None, machine=machine())
                folder = OUT if args.eval_users is None else SMOKE
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{prompt}-seed{seed}.json").write_text(json.dumps(result, indent=2))
                print(prompt, seed, json.dumps({k: v for k, v in result["rows"].items() if k.endswith("test/all")}), flush=True)
    report()


if __name__ == "__main__":
    main()
