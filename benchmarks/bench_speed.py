"""Reranking speed of the prompts, in-process and on the vLLM CPU server, measured side by side in one run.

The same ml-latest-small test users and the same served top-20 (a trained tower run's client FAISS
indices) go through each prompt:

- `rerank.v1`, zero-shot (the prompt of the earlier speed table: profile, 10 whole history titles);
- `rerank.v2` + a soft prompt and item tokens (the trained reranker's prompt before this one);
- `rerank.v4` + a soft prompt, a user token and item tokens (the compact prompt: 10-token titles,
  the dominant genres instead of the profile), without and with the in-process prefix KV cache;
- `rerank.v4` at a lean budget: no history titles (the user token stands for the history) and
  4-token candidate titles;
- `rerank.v5`, the lean prompt: the user token and one item token per candidate, no titles at all;
- `rerank.v6`: `rerank.v5` with each candidate's bare letter ("B", not "(B)"), 4 positions per candidate instead of 6.

In-process rows run at `llm.batch_size` 1 and 4 (a batch shares one prefix KV cache and is
right-padded after it).

Speed does not depend on the trained values, so the soft prompt and projectors are freshly
initialised (seed 0). The served rows start the vLLM CPU server from .venv-vllm once per dtype
(prefix caching on, 4 requests in flight, the compact prompt over chat prompt_embeds parts) and
warm up on other users, so the timed prompts are not already cached. Each row is the median of `--repeats` passes, each over its own `--users / --repeats` users.

Usage: python benchmarks/bench_speed.py [--run <fedrec train run folder>] [--users 40] [--repeats 3] [--no-served]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
from bench_prompt_budget import BUDGETS, default_run
from bench_rerank_tower import builder_soft, recommender
from common import REPO, data_dir, markdown_table, update_results, vllm_server

PROMPTS = {"v1": "rerank.v1 zero-shot", "v2": "rerank.v2 + soft prompt + item tokens", "v4": "rerank.v4 + soft prompt + user + item tokens",
           "v4-lean": "rerank.v4, no history titles, 4-token titles", "v5": "rerank.v5 (user + item tokens, no titles)",
           "v6": "rerank.v6 (rerank.v5, bare letters)"}
# In-process rows: (prompt, batch size, prefix cache). v1 has no soft prompt to cache; v2 as it ran before.
IN_PROCESS = [("v1", 1, False), ("v2", 1, False), ("v4", 1, False), ("v4", 1, True), ("v4", 4, True), ("v4-lean", 1, True), ("v4-lean", 4, True),
              ("v5", 1, True), ("v5", 4, True), ("v5", 8, True), ("v6", 1, True), ("v6", 4, True), ("v6", 8, True)]


def _rerankers(rec, prompt: str):
    """The reranker for `prompt` over `rec.backend`, and its prompt builder."""
    from pipeline.llm.softprompt import SoftPrompt
    from pipeline.rerank import PromptBuilder, VerbalizerReranker
    from pipeline.trained import trained_reranker

    if prompt == "v1":
        builder = PromptBuilder(rec.backend, rec.dataset.catalog, rec.cfg.rerank.model_copy(update={"template": "rerank.v1"}))
        return VerbalizerReranker(rec.backend, builder, fusion_weight=1.0)
    if prompt == "v2":
        rec = rec.with_cfg(rec.cfg.model_copy(update={"soft_prompt": builder_soft(rec)}))
    if prompt in BUDGETS:  # the budgets bench_prompt_budget measures for accuracy
        rec = rec.with_cfg(rec.cfg.model_copy(update={"soft_prompt": rec.cfg.soft_prompt.model_copy(update=BUDGETS[prompt])}))
    module = SoftPrompt(rec.cfg.soft_prompt.tokens, rec.backend.hidden_size, rec.trained.item_embeddings.shape[1], seed=0,
                        user_token=prompt not in ("v1", "v2"))
    return trained_reranker(rec, module.state_arrays(), rec.trained.item_embeddings, rec.trained.tower)


def _time(reranker, requests, warmup, repeats: int) -> tuple[float, list[float]]:
    """Median users/s over `repeats` passes, each over its own slice of `requests` (a repeated prompt would be answered
    from vLLM's prefix cache, which measured 0.44 users/s on a first pass and 5.0 on a repeat)."""
    reranker.llm_scores(warmup)
    passes, size = [], len(requests) // repeats
    for k in range(repeats):
        chunk = requests[k * size : (k + 1) * size]
        start = time.perf_counter()
        reranker.llm_scores(chunk)
        passes.append(len(chunk) / (time.perf_counter() - start))
    return statistics.median(passes), passes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=None, help="a fedrec train run folder on ml-latest-small (default: the tower bench_prompt_budget measures accuracy over)")
    parser.add_argument("--users", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-served", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("FEDREC_DATA_DIR", str(data_dir()))
    if args.run is None:
        args.run = default_run()
    rows, results = [], {}
    for dtype in ("bfloat16", "float32"):
        rec = recommender(args.run, f"llm.dtype={dtype}")
        requests = rec.rerank_requests(np.arange(args.users), "test")
        warmup = rec.rerank_requests(np.arange(args.users, args.users + 4), "test")
        for prompt, batch, cache in IN_PROCESS:
            reranker = _rerankers(rec, prompt)
            reranker.backend.prefix_cache, reranker.backend.batch_size = cache, batch
            speed, passes = _time(reranker, requests, warmup, args.repeats)
            name = f"in-process {dtype}"
            results[(name, prompt, batch, cache)] = speed
            rows.append([name, PROMPTS[prompt], batch, "on" if cache else "off", f"{_slots_and_tokens(reranker, requests)}",
                         f"{speed:.2f}", ", ".join(f"{p:.2f}" for p in passes)])
            print(rows[-1], flush=True)
    if not args.no_served:
        from pipeline.llm.transformers_backend import resolve_model

        model = resolve_model("SmolLM2-135M-Instruct", REPO / ".cache")
        for dtype in ("float32", "bfloat16"):
            with vllm_server(model, 8733, "--enable-prefix-caching", dtype=dtype) as url:
                if url is None:
                    rows.append([f"vLLM CPU server {dtype}", "—", "—", "—", "—", "skipped: .venv-vllm absent (`make vllm-venv`)", "—"])
                    break
                # llm.model stays the run's (a run with a soft prompt is served only to its own LLM); the server names it by path
                rec = recommender(args.run, "llm.backend=openai", f"llm.base_url={url}", f"llm.served_model={model}", "llm.concurrency=4",
                                   "llm.timeout_s=300")
                requests = rec.rerank_requests(np.arange(args.users), "test")
                warmup = rec.rerank_requests(np.arange(args.users, args.users + 4), "test")
                for prompt in ("v1", "v4", "v4-lean", "v5", "v6"):
                    reranker = _rerankers(rec, prompt)
                    speed, passes = _time(reranker, requests, warmup, args.repeats)
                    name = f"vLLM CPU server {dtype}"
                    results[(name, prompt, 4, True)] = speed
                    rows.append([name, PROMPTS[prompt], "4 in flight", "vLLM prefix caching", f"{_slots_and_tokens(reranker, requests)}",
                                 f"{speed:.2f}", ", ".join(f"{p:.2f}" for p in passes)])
                    print(rows[-1], flush=True)
    table = markdown_table(["backend", "prompt", "batch", "prefix cache", "prompt tokens (median)", "users/s (median)", "passes users/s"], rows)
    base = results.get(("in-process bfloat16", "v1", 1, False))
    ratio = "".join(f" {what}: {results[key] / base:.1f}× the users/s of the zero-shot `rerank.v1` prompt in-process (bf16, batch 1)."
                    for what, key in (("`rerank.v4`, batch 1", ("in-process bfloat16", "v4", 1, True)),
                                      ("`rerank.v4`, batch 4", ("in-process bfloat16", "v4", 4, True)),
                                      ("The lean budget, batch 4", ("in-process bfloat16", "v4-lean", 4, True)),
                                      ("`rerank.v5`, batch 4", ("in-process bfloat16", "v5", 4, True)),
                                      ("`rerank.v5`, batch 8", ("in-process bfloat16", "v5", 8, True)),
                                      ("`rerank.v6`, batch 4", ("in-process bfloat16", "v6", 4, True))) if base and key in results)
    fastest = max((k for k in results if k[0].startswith("in-process")), key=results.get, default=None)
    if fastest:
        ratio += (f" Fastest in-process row: {PROMPTS[fastest[1]]}, {fastest[0].split()[-1]}, batch {fastest[2]}, "
                  f"{results[fastest]:.2f} users/s.")
    print(table)
    update_results(
        "bench:speed", "Reranking speed by prompt and backend (SmolLM2-135M-Instruct, 20 candidates)",
        f"python benchmarks/bench_speed.py --run {args.run.relative_to(REPO) if args.run.is_absolute() else args.run} --users {args.users} "
        f"--repeats {args.repeats}" + (" --no-served" if args.no_served else ""),
        f"{args.users} ml-latest-small test users, the served top-20 of a trained tower run (`{args.run.name}`), one process, one "
        f"prompt after another. Users/s is the throughput of `VerbalizerReranker.llm_scores` over all of them (in-process: the batch column; "
        f"served: 4 requests in flight), the median of {args.repeats} passes over disjoint users after a warm-up on 4 other users. Prompt tokens count the "
        f"text tokens plus the embedding slots (soft prompt, user and item tokens). Soft prompt and projectors are freshly initialised "
        f"(speed does not depend on their values); accuracy is in the reranker table.{ratio}\n\n{table}",
    )


def _slots_and_tokens(reranker, requests) -> int:
    """Median sequence length the LLM reads: text tokens plus soft-prompt and embedding-slot positions."""
    builder, lengths = reranker.builder, []
    for r in requests:
        encoded = reranker.backend.encode(builder.build(r, builder.cfg.template), with_slot=reranker.soft_prompt is not None)
        soft = reranker.soft_prompt.shape[0] if reranker.soft_prompt is not None else 0
        lengths.append(len(encoded.ids) + soft + encoded.n_items)
    return int(np.median(lengths))


if __name__ == "__main__":
    main()
