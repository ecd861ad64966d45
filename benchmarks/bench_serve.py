"""Demo server latency and throughput: one recommendation (retrieve + rerank 20 + grounded explanations) over HTTP.

Starts `fedrec serve` (SmolLM2-135M-Instruct) once with the in-process backend and once against the
vLLM CPU server, sends sequential requests for latency, then bursts of simultaneous requests for
requests/second (all must succeed: the server queues them and runs the model work safely).

Usage: python benchmarks/bench_serve.py [--requests 12] [--burst 20] [--repeats 3] [--config configs/ml-100k.yaml]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
from common import REPO, data_dir, markdown_table, update_results, vllm_server, wait_http


def _measure(url: str, users: list[int], requests: int, burst: int, repeats: int) -> dict[str, float]:
    """Every request asks for another user: a repeated prompt would be answered from vLLM's prefix cache."""
    import httpx

    def body(i: int) -> dict:
        return {"user_id": users[i], "k": 10, "explain": True}

    with httpx.Client(timeout=600) as client:
        for i in range(2):  # warm-up: model loads, first-call allocations
            client.post(f"{url}/api/recommend", json=body(i)).raise_for_status()
        latencies = []
        for i in range(2, 2 + requests):
            start = time.perf_counter()
            client.post(f"{url}/api/recommend", json=body(i)).raise_for_status()
            latencies.append(time.perf_counter() - start)

    async def one_burst(first: int) -> tuple[float, int]:
        async with httpx.AsyncClient(timeout=600) as client:
            start = time.perf_counter()
            replies = await asyncio.gather(*(client.post(f"{url}/api/recommend", json=body(first + i)) for i in range(burst)))
            return time.perf_counter() - start, sum(r.status_code == 200 for r in replies)

    bursts = [asyncio.run(one_burst(2 + requests + k * burst)) for k in range(repeats)]
    return {
        "latency_median_s": float(np.median(latencies)), "latency_p95_s": float(np.percentile(latencies, 95)),
        "burst_rps": float(np.median([burst / wall for wall, _ in bursts])), "burst_wall_s": float(np.median([w for w, _ in bursts])),
        "ok": int(min(ok for _, ok in bursts)),
    }


def _serve(config: str, port: int, overrides: list[str], cache: str, run: Path | None) -> subprocess.Popen:
    command = [sys.executable, "-m", "pipeline.cli", "serve", "--config", config, "--port", str(port), *(["--run", str(run)] if run else [])]
    # Without --run, an empty output_dir: no trained run is found, and the zero-shot retrieval pipeline is measured.
    for override in [f"cache_dir={cache}", f"output_dir={tempfile.mkdtemp(prefix='fedrec-bench-serve-')}", *overrides]:
        command += ["--set", override]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--burst", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--config", default="configs/ml-100k.yaml")
    parser.add_argument("--no-served", action="store_true")
    parser.add_argument("--run", type=Path, default=None, help="a fedrec train run folder to serve (its tower retrieves)")
    args = parser.parse_args()
    os.environ["FEDREC_DATA_DIR"] = str(data_dir())
    cache = str(Path.home() / ".cache" / "fedrec")

    from pipeline.config import load_config
    from pipeline.llm.transformers_backend import resolve_model
    from pipeline.recommender import Recommender

    cfg = load_config(REPO / args.config, [f"cache_dir={cache}"])
    rec = Recommender.from_config(cfg, run=None)
    needed = 2 + args.requests + args.burst * args.repeats  # distinct users: warm-up, sequential, then each burst
    if needed > rec.dataset.n_users:
        parser.error(f"2 + --requests + --burst × --repeats = {needed} distinct users, but {args.config} has {rec.dataset.n_users}")
    users = [int(u) for u in rec.dataset.user_ids[:: rec.dataset.n_users // needed][:needed]]
    results = {}
    setups = [("in-process (transformers, bf16 weights)", [], None)]
    if not args.no_served:
        setups.append(("vLLM CPU server (fp32)", ["llm.backend=openai"], resolve_model(cfg.llm.model, Path(cache))))
    for name, overrides, served_model in setups:
        with vllm_server(served_model, 8741) if served_model else nullcontext("") as url:
            if url is None:
                print("skipping the served row: .venv-vllm is absent (make vllm-venv)")
                continue
            server = _serve(args.config, 8742, [*overrides, f"llm.base_url={url}"] if url else overrides, cache, args.run)
            try:
                wait_http("http://127.0.0.1:8742/api/status", server, timeout=600)
                results[name] = _measure("http://127.0.0.1:8742", users, args.requests, args.burst, args.repeats)
                print(name, results[name], flush=True)
            finally:
                server.terminate()
                server.wait(timeout=60)
    rows = [[name, f"{r['latency_median_s']:.2f}", f"{r['latency_p95_s']:.2f}", f"{r['burst_rps']:.2f}", f"{r['burst_wall_s']:.1f}",
             f"{r['ok']}/{args.burst}"] for name, r in results.items()]
    table = markdown_table(["backend", "latency median s", "latency p95 s", f"requests/s ({args.burst} at once)",
                            f"wall s for {args.burst}", "succeeded (worst burst)"], rows)
    print(table)
    source = (f"with the tower of run `{args.run.name}` from each user's client FAISS index" if args.run
              else "with zero-shot text retrieval (no run)")
    update_results(
        "bench:serve", "Demo server: one recommendation over HTTP",
        f"python benchmarks/bench_serve.py --requests {args.requests} --burst {args.burst} --repeats {args.repeats} --config {args.config}"
        + (f" --run {args.run}" if args.run else ""),
        f"`fedrec serve --config {args.config}` with SmolLM2-135M-Instruct; one request = profile + retrieval of 20 candidates + "
        f"verbalizer rerank of the 20 + grounded explanations of the top 3 picks (`rerank.explain_mode={cfg.rerank.explain_mode}`), for "
        f"existing users, retrieving {source}. Latency: {args.requests} sequential requests after 2 warm-up ones (median, p95). "
        f"Every request is for another user (a repeated prompt would be answered from vLLM's prefix cache). Throughput: {args.burst} simultaneous requests, median over {args.repeats} bursts; the in-process server runs the model "
        f"work one request at a time behind its queue, the served one keeps up to llm.concurrency={cfg.llm.concurrency} requests in "
        f"flight to vLLM.\n\n{table}",
    )


if __name__ == "__main__":
    main()
