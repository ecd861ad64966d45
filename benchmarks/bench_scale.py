"""Cross-device scale: round time and peak memory of one federated round against the clients sampled per round.

Synthetic population: 10,000 clients, each one user with a random short history (3..12 items) over
a 1,000-item catalogue with random 384-dim text vectors; a 32-dim tower (2 blocks, windows of 20) so that
10,000 replies of one round fit in memory at once (about 230 KB each).
Each measurement is one process (so its peak RSS is its own) that builds the population, then runs
rounds through the real path: the Flower strategy (FedAvg) configures the round on the seeded
sample, every sampled client trains `federation.local_steps` steps in its ClientApp, replies cross
Flower's protobuf wire format, the server validates each delta and aggregates. The first round
is a warm-up; the table reports the median of the next `--rounds`.

Usage: python benchmarks/bench_scale.py [--clients 10 100 610 10000] [--rounds 1] [--threads 2] [--report]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
from common import REPO, markdown_table, update_results

POPULATION = 10_000
ITEMS = 1_000
OUT = REPO / "runs" / "bench-scale"


def measure(sampled: int, rounds: int, threads: int) -> dict:
    """One process: `rounds` + 1 rounds of `sampled` clients out of the synthetic population."""
    import torch

    torch.set_num_threads(threads)
    from federation.core import Payload
    from federation.flower_apps import make_client_app, make_server_app
    from federation.inprocess import run_inprocess
    from federation.task import ClientData, Recipe, new_server
    from pipeline.config import load_config

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(ITEMS, 384)).astype(np.float32)
    histories = [rng.choice(ITEMS, size=int(rng.integers(3, 13)), replace=False).astype(np.int64) for _ in range(POPULATION)]
    cfg = load_config(None, [f"federation.rounds={rounds + 1}", f"federation.clients_per_round={sampled}", "federation.local_steps=1",
                             "federation.patience=null", "tower.batch_size=16", "tower.dim=32", "tower.max_len=20"])
    recipe = Recipe.of(cfg)
    server = new_server(vectors, recipe, POPULATION)
    seconds, up = [], []
    started = [time.perf_counter()]

    def on_round(state, report: dict) -> None:  # noqa: ANN001
        seconds.append(time.perf_counter() - started[0])
        up.append(report.get("accepted", 0))
        started[0] = time.perf_counter()

    payload = Payload()
    server_app = make_server_app(server, recipe, POPULATION, on_round=on_round, payload=payload)
    client_app = make_client_app(lambda partition: ClientData(vectors, [histories[partition]]))
    run_inprocess(server_app, client_app, POPULATION)
    timed = seconds[1:]
    per_round_up = sum(r["bytes"] for r in payload.rows if r["direction"] == "up") / max(len(seconds), 1)
    return {
        "sampled": sampled, "population": POPULATION, "round_s": statistics.median(timed), "rounds_s": timed,
        "client_updates_per_s": sampled / statistics.median(timed), "accepted": up,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "bytes_up_per_round": int(per_round_up),
    }


def report() -> None:
    runs = sorted((json.loads(p.read_text()) for p in OUT.glob("clients-*.json")), key=lambda r: r["sampled"])
    if not runs:
        sys.exit(f"nothing measured yet in {OUT}")
    base = runs[0]
    per_client = [r["round_s"] / r["sampled"] * 1000 for r in runs]
    extra = [(r["peak_rss_gib"] - base["peak_rss_gib"]) / (r["sampled"] - base["sampled"]) * 1024**2 for r in runs[1:]] or [0.0]
    rows = [[f"{r['sampled']:,}", f"{r['round_s']:.2f}", f"{r['round_s'] / r['sampled'] * 1000:.1f}",
             f"{r['client_updates_per_s']:.1f}", f"{r['peak_rss_gib']:.2f}",
             f"{(r['peak_rss_gib'] - base['peak_rss_gib']) / max(r['sampled'] - base['sampled'], 1) * 1024**2:.0f}" if r is not base else "—",
             f"{r['bytes_up_per_round'] / 1e6:,.1f}"] for r in runs]
    table = markdown_table(["clients sampled per round", "round s (median)", "ms per client", "client updates/s",
                            "peak RSS GiB", "extra KiB per extra client", "MB up per round"], rows)
    print(table)
    body = (f"Synthetic population of {POPULATION:,} one-user clients (histories of 3..12 items over {ITEMS:,} items, random "
            "384-dim text vectors), a 32-dim 2-block tower (max_len 20), FedAvg, one local step per client, the in-process Flower grid "
            "(protobuf wire format, no Ray). One process per row; round time is the median over the rounds after a warm-up "
            f"round ({len(runs[0]['rounds_s'])} here).\n\n{table}\n\n"
            f"Per client, a round costs {min(per_client):.1f}–{max(per_client):.1f} ms from {runs[0]['sampled']:,} to "
            f"{runs[-1]['sampled']:,} clients sampled, so round time grows linearly; peak memory grows by "
            f"{min(extra):.0f}–{max(extra):.0f} KiB per extra client, also linearly, because the server holds every reply of "
            "a round (and its decoded arrays) until it aggregates.")
    command = (f"python benchmarks/bench_scale.py --clients {' '.join(str(r['sampled']) for r in runs)} "
               f"--rounds {len(runs[0]['rounds_s'])}")
    update_results("bench:scale", "Cross-device scale (synthetic, 10,000 clients)", command, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 610, 10_000])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report", action="store_true", help="only rebuild the table from saved measurements")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.one, args.rounds, args.threads)))
        return
    if not args.report:
        OUT.mkdir(parents=True, exist_ok=True)
        for sampled in args.clients:
            done = subprocess.run([sys.executable, __file__, "--one", str(sampled), "--rounds", str(args.rounds),
                                   "--threads", str(args.threads)], capture_output=True, text=True, check=False)
            if done.returncode != 0:
                sys.exit(f"{sampled} clients failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            (OUT / f"clients-{sampled:05d}.json").write_text(json.dumps(result, indent=2))
            print(f"{sampled:,} clients: {result['round_s']:.2f} s per round, peak {result['peak_rss_gib']:.2f} GiB", flush=True)
    report()


if __name__ == "__main__":
    main()
