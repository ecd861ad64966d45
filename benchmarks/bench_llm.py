"""LLM reranking speed: verbalizer (one forward pass) vs listwise generation, in-process and served.

Same users, same candidates and the same prompt data for both methods, measured side by side in
one run on ml-latest-small test users with SmolLM2-135M-Instruct. In-process latency (median,
p95) and peak memory are measured per dtype in a fresh child process. The served rows start the
vLLM CPU server from .venv-vllm (skipped with a note when it is absent).

Usage: python benchmarks/bench_llm.py [--users 24] [--listwise-users 6] [--no-served]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import REPO, data_dir, markdown_table, update_results, vllm_server


def _requests(n: int, cache: str):
    from pipeline.config import load_config
    from pipeline.recommender import Recommender

    cfg = load_config(REPO / "configs" / "ml-latest-small.yaml", [f"cache_dir={cache}"])
    rec = Recommender.from_config(cfg, run=None)  # zero-shot text retrieval, as this section reports
    return rec, rec.rerank_requests(np.arange(n), "test")


def _time_methods(rec, backend, requests, listwise_users: int) -> dict:
    from pipeline.rerank import ListwiseReranker, PromptBuilder, VerbalizerReranker

    builder = PromptBuilder(backend, rec.dataset.catalog, rec.cfg.rerank)
    verbalizer = VerbalizerReranker(backend, builder, fusion_weight=1.0)
    letters = ListwiseReranker(backend, builder)
    titles_cfg = rec.cfg.rerank.model_copy(update={"listwise_template": "listwise.v2"})
    titles = ListwiseReranker(backend, PromptBuilder(backend, rec.dataset.catalog, titles_cfg))
    verbalizer.rerank_batch(requests[:2])  # warm-up
    latencies = []
    for request in requests:
        start = time.perf_counter()
        verbalizer.rerank(request)
        latencies.append(time.perf_counter() - start)
    start = time.perf_counter()
    verbalizer.rerank_batch(requests)
    batched = len(requests) / (time.perf_counter() - start)
    generated = {}
    for name, reranker in (("letters", letters), ("titles", titles)):
        start = time.perf_counter()
        reranker.rerank_batch(requests[:listwise_users])
        generated[name] = listwise_users / (time.perf_counter() - start)
    tokens = [backend.prompt_tokens(builder.build(r, rec.cfg.rerank.template)) for r in requests]
    return {
        "verbalizer_users_per_s": batched, "listwise_users_per_s": generated["letters"],
        "listwise_titles_users_per_s": generated["titles"],
        "latency_median_s": float(np.median(latencies)), "latency_p95_s": float(np.percentile(latencies, 95)),
        "prompt_tokens_median": float(np.median(tokens)),
    }


def child(dtype: str, users: int, listwise_users: int, cache: str) -> None:
    """Runs in a fresh process so peak RSS belongs to this dtype alone."""
    from pipeline.llm.transformers_backend import TransformersBackend

    rec, requests = _requests(users, cache)
    backend = TransformersBackend(dtype=dtype, cache_dir=cache, batch_size=rec.cfg.llm.batch_size)
    result = _time_methods(rec, backend, requests, listwise_users)
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024
    print("RESULT " + json.dumps(result))


def _served(users: int, listwise_users: int, cache: str) -> dict | None:
    from pipeline.llm.openai_backend import OpenAIBackend
    from pipeline.llm.transformers_backend import resolve_model

    model = resolve_model("SmolLM2-135M-Instruct", Path(cache))
    # Timing runs send the same prompts twice; a prefix cache would answer the second pass from memory.
    with vllm_server(model, 8731, "--no-enable-prefix-caching") as url:
        if url is None:
            return None
        rec, requests = _requests(users, cache)
        backend = OpenAIBackend(url, tokenizer=model, concurrency=4, timeout_s=300)
        return _time_methods(rec, backend, requests, listwise_users)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=24)
    parser.add_argument("--listwise-users", type=int, default=6)
    parser.add_argument("--no-served", action="store_true")
    parser.add_argument("--child", choices=["float32", "bfloat16"], help=argparse.SUPPRESS)
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "fedrec"))
    args = parser.parse_args()
    os.environ["FEDREC_DATA_DIR"] = str(data_dir())
    if args.child:
        child(args.child, args.users, args.listwise_users, args.cache)
        return
    results = {}
    for dtype in ("float32", "bfloat16"):
        done = subprocess.run([sys.executable, __file__, "--child", dtype, "--users", str(args.users), "--listwise-users",
                               str(args.listwise_users), "--cache", args.cache], capture_output=True, text=True, check=True)
        results[f"in-process {dtype}"] = json.loads(done.stdout.split("RESULT ", 1)[1])
        print(dtype, results[f"in-process {dtype}"], flush=True)
    served = None if args.no_served else _served(args.users, args.listwise_users, args.cache)
    if served:
        results["vLLM CPU server float32"] = served
        print("served", served)
    rows = [
        [name, f"{r['verbalizer_users_per_s']:.2f}", f"{r['listwise_users_per_s']:.3f}",
         f"{r['verbalizer_users_per_s'] / r['listwise_users_per_s']:.1f}×", f"{r['listwise_titles_users_per_s']:.3f}",
         f"{r['verbalizer_users_per_s'] / r['listwise_titles_users_per_s']:.1f}×", f"{r['latency_median_s']:.2f}",
         f"{r['latency_p95_s']:.2f}", f"{r['peak_rss_gib']:.2f}" if "peak_rss_gib" in r else "—", f"{r['prompt_tokens_median']:.0f}"]
        for name, r in results.items()
    ]
    table = markdown_table(["backend", "verbalizer users/s", "listwise letters users/s", "verbalizer / letters",
                            "listwise titles users/s", "verbalizer / titles", "latency median s",
                            "latency p95 s", "peak RSS GiB", "prompt tokens"], rows)
    print(table)
    note = "" if served else "\n\nThe served rows were skipped: `.venv-vllm` was absent (`make vllm-venv`)."
    update_results(
        "bench:llm", "LLM reranking speed (SmolLM2-135M-Instruct, 20 candidates)",
        f"python benchmarks/bench_llm.py --users {args.users} --listwise-users {args.listwise_users}",
        f"{args.users} ml-latest-small test users, 20 retrieved candidates each, prompt `rerank.v1` / `listwise.v1`. "
        f"Verbalizer users/s is the throughput of `rerank_batch` (in-process: `llm.batch_size`, default 1, which is fastest on "
        f"this CPU; served: 4 requests in flight, prefix caching off); latency is one "
        f"user at a time; listwise generation is timed on the first {args.listwise_users} users with greedy decoding, "
        f"once asking for letters only (`listwise.v1`, up to 64 new tokens) and once for LLMRank's output, one "
        f"\"(X) title\" line per candidate (`listwise.v2`, up to the length of those lines). Peak RSS is the whole in-process run (embedder, index and LLM).{note}\n\n{table}",
    )


if __name__ == "__main__":
    main()
