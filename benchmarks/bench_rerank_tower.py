"""The LLM reranker over a trained tower's candidates: does it lift the tower? (ml-latest-small, all users)

Each `--run` is a `fedrec train` folder (bench_tower's federated runs, one per seed): it supplies the
tower, its query vectors and each client's FAISS index, so every row reranks the same served top-20.
Rows (`--variants`):

- `tower`: the tower's order;
- `zero-shot`: the compact text prompt (`rerank.v4` without embedding slots), no training;
- `text`: a trained soft prompt, text only;
- `items`: + one projected tower item vector per candidate;
- `user`: + one projected tower query vector for the user (the product's default).

The trained rows train the soft prompt and projectors centrally through the frozen SmolLM2-135M on
`--train-users` users, `--positions` examples each (the history before each of its last training
items → the tower's top 20 for it → that item, inserted at a random slot when missed). The
validation split of examples is the valid target of `--valid-users` other users; the epoch with the
lowest validation loss is kept. Every user's validation and test candidates are then reranked; the
fusion weight with the tower score is chosen on validation from a grid that includes 0 (the tower
order), so a fused row is never below the tower on validation. Slices: users with ≤ 20 training
items, and test targets among the 20% least-seen training items.

Results go to runs/bench-rerank-tower/<variant>-seed<k>.json (several processes may run side by
side, one thread each); `--report` rebuilds the table and the RESULTS.md section from them.

Usage: python benchmarks/bench_rerank_tower.py --seeds 0 1 2 --variants tower user [--runs <run folder per seed>]
       [--train-users 120] [--positions 2] [--epochs 2] [--valid-users 50] [--valid-eval-users 200] [--threads 1] [--report]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from common import REPO, data_dir, log_command, logged_commands, markdown_table, mean_sd, update_results

OUT = REPO / "runs" / "bench-rerank-tower"
VARIANTS = {"tower": "tower order (FAISS top-20)", "zero-shot": "zero-shot text prompt", "text": "trained text soft prompt",
            "items": "+ item tokens", "user": "+ user token",
            "full-items": "the previous prompt (rerank.v2: profile, whole titles) + item tokens"}
KEYS = ("R@10", "N@10", "MRR")


def tower_run(seed: int, parser: argparse.ArgumentParser) -> Path:
    """bench_tower's federated 10-IID-group run of `seed` (an argparse error when it has not been made)."""
    from bench_tower import _rec

    from pipeline.trained import run_dir

    run = run_dir(_rec("iid", seed, REPO / ".cache"))
    if not (run / "run.json").is_file():
        parser.error(f"no finished tower run at {run}: run `python benchmarks/bench_tower.py --experiments iid --seeds {seed}` first, "
                     "or pass the run folder")
    return run


def recommender(run: Path, *extra: str):
    """The ml-latest-small recommender serving `run` (its tower shape and partition), bf16 LLM, prompt `rerank.v4` (the
    prompt this table was measured with; bench_prompt_budget compares others); `extra` overrides win."""
    from pipeline.config import load_config
    from pipeline.recommender import Recommender

    sections = json.loads((run / "run.json").read_text())["fingerprint"]["sections"]
    overrides = [f"cache_dir={REPO / '.cache'}", "llm.dtype=bfloat16", "eval.splits=[valid,test]", "soft_prompt.template=rerank.v4",
                 *(f"tower.{k}={v}" for k, v in sections["tower"].items()),
                 *(f"partition.{k}={v}" for k, v in sections["partition"].items()), *extra]
    return Recommender.from_config(load_config(REPO / "configs" / "ml-latest-small.yaml", overrides), run=run)


def _train(rec, variant: str, args, seed: int):
    """The trained module, its prompt builder and the training record."""
    import torch

    from pipeline.llm.softprompt import SoftPrompt, position_examples, train_soft_prompt
    from pipeline.rerank import trained_prompt_builder

    run, backend, n = rec.trained, rec.backend, rec.cfg.retrieval.num_candidates
    soft = builder_soft(rec) if variant == "full-items" else rec.cfg.soft_prompt  # full-items: the prompt before the compact one
    builder = trained_prompt_builder(backend, rec.dataset.catalog, rec.cfg.rerank, soft, user_token=variant == "user")
    if variant == "text":
        builder.item_tokens = False
    rng = np.random.default_rng(seed)
    order = rng.permutation(rec.dataset.n_users)
    train_users, valid_users = order[: args.train_users], order[args.train_users : args.train_users + args.valid_users]
    train = rec.split.train()

    def profile_of(users):
        return lambda i, p: rec.text_profile(train[users[i]][:p], rec.dataset.ratings[users[i]][:p])

    examples = position_examples(builder, run.tower, [train[u] for u in train_users], profile_of(train_users),
                                 positions=args.positions, n=n, seed=seed)
    # Validation examples: the whole training history → the validation item, for users not trained on.
    valid_histories = [np.append(train[u], rec.split.targets("valid")[u]) for u in valid_users]
    valid = position_examples(builder, run.tower, valid_histories, profile_of(valid_users), positions=1, n=n, seed=seed)
    module = SoftPrompt(rec.cfg.soft_prompt.tokens, backend.hidden_size, run.item_embeddings.shape[1], seed=seed, user_token=variant == "user")
    start, last = time.perf_counter(), [0.0]

    def progress(step: int, steps: int) -> None:
        if time.perf_counter() - last[0] > 60 or step == steps:
            last[0] = time.perf_counter()
            print(f"  {variant} seed {seed}: step {step}/{steps} ({(last[0] - start) / 60:.1f} min)", flush=True)

    stats = train_soft_prompt(module, backend, examples, torch.as_tensor(run.item_embeddings), builder.labels(n), epochs=args.epochs,
                              batch_size=rec.cfg.soft_prompt.batch_size, lr=rec.cfg.soft_prompt.lr, seed=seed, valid=valid,
                              progress=progress)
    stats.update(minutes=(time.perf_counter() - start) / 60, valid_examples=len(valid), train_users=len(train_users))
    return module, builder, stats


def _reranker(rec, variant: str, args, seed: int):
    from pipeline.rerank import VerbalizerReranker, trained_prompt_builder
    from pipeline.trained import trained_reranker

    if variant == "zero-shot":
        builder = trained_prompt_builder(rec.backend, rec.dataset.catalog, rec.cfg.rerank, rec.cfg.soft_prompt, user_token=False)
        builder.item_tokens = False  # the same compact prompt, text only
        return VerbalizerReranker(rec.backend, builder, fusion_weight=1.0), {}
    module, builder, stats = _train(rec, variant, args, seed)
    if variant == "text":
        return VerbalizerReranker(rec.backend, builder, fusion_weight=1.0, soft_prompt=module.full_prompt().detach()), stats
    if variant == "full-items":
        rec = rec.with_cfg(rec.cfg.model_copy(update={"soft_prompt": builder_soft(rec)}))
    return trained_reranker(rec, module.state_arrays(), rec.trained.item_embeddings, rec.trained.tower), stats


def builder_soft(rec):
    return rec.cfg.soft_prompt.model_copy(update={"template": "rerank.v2", "max_title_tokens": None,
                                                  "max_history_titles": rec.cfg.rerank.max_history_titles, "user_token": False})


def _masks(rec) -> dict[str, np.ndarray]:
    train = rec.split.train()
    counts = np.bincount(np.concatenate(train), minlength=rec.dataset.n_items)
    rare = counts <= np.quantile(counts, 0.2)
    return {"all": np.ones(rec.dataset.n_users, bool), "short": np.array([len(h) <= 20 for h in train]), "rare": rare[rec.split.targets("test")]}


def run_variant(run: Path, variant: str, seed: int, args, overrides: Sequence[str] = ()) -> dict:
    """One row's result: `variant` trained (seed `seed`) over `run`'s candidates and scored; `overrides` are config overrides
    (e.g. another `soft_prompt.template`)."""
    rec = recommender(run, *overrides)
    users = np.arange(rec.dataset.n_users if args.eval_users is None else args.eval_users)
    chosen = {"valid": users[: args.valid_eval_users], "test": users}
    requests = {split: rec.rerank_requests(chosen[split], split) for split in ("valid", "test")}
    out: dict = {"run": run.name, "variant": variant, "seed": seed, "users": len(users)}
    if variant == "tower":
        return {**out, **scored_rows(rec, chosen, requests, None)}
    reranker, stats = _reranker(rec, variant, args, seed)
    out["training"] = stats
    return {**out, **scored_rows(rec, chosen, requests, lambda _, reqs: reranker.llm_scores(reqs), label=f"{variant} seed {seed}")}


def scored_rows(rec, chosen: dict[str, np.ndarray], requests: dict[str, list], llm_scores, *, label: str = "") -> dict:
    """Metrics of the LLM order (`llm_scores(split, requests) → one score array per request`) and of its fusion with the tower
    score at the weight chosen on validation, for all users and the slices; the tower order when `llm_scores` is None."""
    from pipeline.evaluate import list_metrics
    from pipeline.rerank import choose_fusion_weight, fuse, order_by

    out: dict = {}
    if llm_scores is None:
        llm = {split: [np.zeros(len(r.candidates)) for r in reqs] for split, reqs in requests.items()}
        weights = {"": 0.0}
    else:
        llm, seconds = {}, {}
        for split, reqs in requests.items():
            start = time.perf_counter()
            llm[split] = llm_scores(split, reqs)
            seconds[split] = time.perf_counter() - start
            print(f"  {label}: {split} reranked, {len(reqs) / seconds[split]:.2f} users/s", flush=True)
        out["users_per_s"] = len(requests["test"]) / seconds["test"]
        weight, table = choose_fusion_weight(requests["valid"], llm["valid"], rec.split.targets("valid")[chosen["valid"]], rec.cfg.rerank.fusion_grid)
        out["fusion_table"] = table
        weights = {"": 1.0, "fusion": weight}
    masks = {k: m[chosen["test"]] for k, m in _masks(rec).items()}
    out["rows"] = {}
    for name, w in weights.items():
        for split, reqs in requests.items():
            targets = rec.split.targets(split)[chosen[split]]
            ranked = [[r.candidates[j].item for j in order_by(fuse(np.array([c.score for c in r.candidates]), s, w))]
                      for r, s in zip(reqs, llm[split], strict=True)]
            for part, mask in masks.items() if split == "test" else {"all": np.ones(len(chosen["valid"]), bool)}.items():
                picked = np.flatnonzero(mask)
                m = list_metrics([ranked[i] for i in picked], targets[picked], [10, 20], rec.dataset.n_items)
                out["rows"][f"{name or 'llm'}/{split}/{part}"] = {"users": len(picked), **{k: float(m[k]) for k in KEYS}}
        if name == "fusion":
            out["fusion_weight"] = w
    return out


def summary_cells(runs: list[dict], key: str, base: Sequence[float | None]) -> list[object]:
    """A table row's cells for the `key` order (`llm` or `fusion`) of `runs` (one result per seed): seeds, valid N@10 and the
    test KEYS (mean ± sd), the test N@10 paired with `base` (one N@10 per run, None = none; the mean of the ratios) and
    the fusion weights."""
    def values(row: str, k: str) -> list[float]:
        return [r["rows"][row][k] for r in runs]

    ratios = [r["rows"][f"{key}/test/all"]["N@10"] / b for r, b in zip(runs, base, strict=True) if b]
    return [len(runs), mean_sd(values(f"{key}/valid/all", "N@10")), *(mean_sd(values(f"{key}/test/all", k)) for k in KEYS),
            f"{np.mean(ratios):.3f}×" if ratios else "—", ", ".join(f"{r['fusion_weight']:g}" for r in runs) if key == "fusion" else "—"]


def slice_rows(label: str, runs: list[dict], key: str) -> list[list[object]]:
    """The slice table's rows (short histories, rare targets) for the `key` order of `runs`."""
    return [[label, part, runs[0]["rows"][f"{key}/test/{part}"]["users"],
             *(mean_sd([r["rows"][f"{key}/test/{part}"][k] for r in runs]) for k in ("R@10", "N@10"))] for part in ("short", "rare")]


def report() -> None:
    saved: dict[str, list[dict]] = {}
    for path in sorted(OUT.glob("*-seed*.json")):
        result = json.loads(path.read_text())
        if result.get("eval_users_limited"):
            continue
        saved.setdefault(result["variant"], []).append(result)
    if not saved:
        print("no saved results under", OUT)
        return
    tower = {r["seed"]: r["rows"]["llm/test/all"]["N@10"] for r in saved.get("tower", [])}
    rows, slices_, curves = [], [], []
    for variant in VARIANTS:
        runs = sorted(saved.get(variant, []), key=lambda r: r["seed"])
        if not runs:
            continue
        labels = [("llm", VARIANTS[variant])] if variant == "tower" else [("llm", VARIANTS[variant]), ("fusion", VARIANTS[variant] + " + fusion")]
        for key, name in labels:
            rows.append([name, *summary_cells(runs, key, [tower.get(r["seed"]) for r in runs]),
                         f"{np.median([r['users_per_s'] for r in runs]):.2f}" if "users_per_s" in runs[0] else "—"])
            slices_ += slice_rows(name, runs, key)
        for r in runs:
            if r.get("training"):
                t = r["training"]
                curve = "; ".join(f"{p['train_loss']:.3f} / {p['valid_loss']:.3f}" for p in t["curve"])
                curves.append([VARIANTS[variant], r["seed"], t["examples"], t["valid_examples"], f"{t['loss_first']:.3f}", curve,
                               t["best_epoch"], f"{t['minutes']:.1f}"])
    lifts = [(row[0], row[6]) for row in rows if row[0] in (VARIANTS["user"], VARIANTS["items"])]
    header = ["ranking", "seeds", "valid N@10", *(f"test {k}" for k in KEYS), "test N@10 / tower (paired)", "fusion w (per seed)", "users/s"]
    table = markdown_table(header, rows)
    slices = markdown_table(["ranking", "slice", "users", "test R@10", "test N@10"], slices_)
    losses = markdown_table(["ranking", "seed", "train examples", "valid examples", "first batch loss", "per epoch: train / valid loss",
                             "kept epoch", "train min"], curves)
    print(table, slices, losses, sep="\n\n")
    example = next(iter(saved.values()))[0]
    body = (
        "ml-latest-small, all 610 users, the served top-20 of bench_tower's federated tower (10 IID groups; one run per seed, "
        "its client FAISS indices) reranked by SmolLM2-135M-Instruct in-process (bf16 weights, fp32 label logits), prompt "
        "`rerank.v4`. A target the tower missed counts as a miss, so R@20 of every row is the tower's. Trained rows: soft prompt "
        f"({20} tokens) and projectors trained centrally, Adam, examples from several positions of each training user's history, "
        "the epoch with the lowest validation loss kept; chance loss is ln 20 = 3.00. Mean ± sd over seeds (each seed: its own "
        f"tower run, training users and init); users/s is the test reranking throughput (median over seeds). Test: all "
        f"{example['users']} users; validation (the fusion weight and the valid column): the first {example['rows']['llm/valid/all']['users']} "
        "users. The budget is in the commands (users × positions, epochs; batch 8, Adam lr 1e-2): the largest tried here, "
        "one torch thread per run with two runs side by side, so users/s here are not speeds (bench_speed measures those)."
        + "".join(f" {name}: {ratio} the tower's test N@10 at weight 1." for name, ratio in lifts) + "\n\n" + table + "\n\nSlices (short = ≤ 20 training items; rare = test target among the 20% least-seen "
        "training items):\n\n" + slices + "\n\nTraining (loss of the target's label among 20):\n\n" + losses
    )
    update_results("bench:rerank-tower", "LLM reranker over the trained tower's candidates (ml-latest-small)", logged_commands(OUT), body)


def add_budget_arguments(parser: argparse.ArgumentParser, *, train_users: int, valid_users: int, threads: int) -> None:
    """The options `run_variant` reads (training budget, evaluated users, threads) and `--report`."""
    parser.add_argument("--train-users", type=int, default=train_users)
    parser.add_argument("--valid-users", type=int, default=valid_users)
    parser.add_argument("--positions", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--valid-eval-users", type=int, default=200, help="validation users reranked to choose the fusion weight")
    parser.add_argument("--eval-users", type=int, default=None, help="evaluate only the first N users (a smoke run; not reported)")
    parser.add_argument("--threads", type=int, default=threads)
    parser.add_argument("--report", action="store_true", help="only rebuild the tables and RESULTS.md from saved results")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, nargs="+",
                        help="fedrec train run folders, one per seed (in --seeds order); default: bench_tower's 10-IID-group run of each seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    add_budget_arguments(parser, train_users=300, valid_users=100, threads=2)
    args = parser.parse_args()
    os.environ.setdefault("FEDREC_DATA_DIR", str(data_dir()))
    if not args.report:
        import torch

        torch.set_num_threads(args.threads)
        if not args.runs:
            args.runs = [tower_run(seed, parser) for seed in args.seeds]
        if len(args.runs) != len(args.seeds):
            parser.error("give one --runs folder per --seeds value")
        if args.eval_users is None:
            log_command(OUT, "bench_rerank_tower.py", [a if not Path(a).is_absolute() else str(Path(a).relative_to(REPO)) for a in sys.argv[1:]])
        for run, seed in zip(args.runs, args.seeds, strict=True):
            for variant in args.variants:
                result = run_variant(run, variant, seed, args)
                result["eval_users_limited"] = args.eval_users is not None
                OUT.mkdir(parents=True, exist_ok=True)
                name = f"{variant}-seed{seed}" + ("-smoke" if args.eval_users is not None else "")
                (OUT / f"{name}.json").write_text(json.dumps(result, indent=2))
                print(variant, seed, json.dumps({k: v for k, v in result["rows"].items() if k.endswith("test/all")}), flush=True)
    report()


if __name__ == "__main__":
    main()
