"""Flower's Simulation Engine with one SuperNode per user (610) on ml-latest-small, side by side with the in-process grid.

Both engines run the same `fedrec train` (one user per client, 61 clients sampled per round, 5 local
steps, `--rounds` rounds, FedAvg) in a process of their own; the Simulation Engine starts Ray with
2 CPUs and 610 virtual SuperNodes. Reported: seconds per round (median over rounds, validation
included), peak memory of the whole process tree (sampled every 0.2 s: the driver and every Ray
process), and whether both engines reach the same validation R@10 each round (same seeds).

Usage: python benchmarks/bench_simulation.py [--rounds 3] [--report]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time

from common import REPO, data_dir, markdown_table, update_results

OUT = REPO / "runs" / "bench-simulation"
ENGINES = ("inprocess", "simulation")


def measure(engine: str, rounds: int) -> dict:
    """One engine in this process (called in a child process by `main`)."""
    import os

    import psutil

    os.environ.setdefault("FEDREC_DATA_DIR", str(data_dir()))
    from federation.runner import train
    from pipeline.config import load_config
    from pipeline.recommender import Recommender

    me, peak = psutil.Process(), [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            peak[0] = max(peak[0], total)
            time.sleep(0.2)

    threading.Thread(target=sample, daemon=True).start()
    overrides = [f"cache_dir={REPO / '.cache'}", f"output_dir={OUT / engine}", "eval.splits=[valid]", "partition.scheme=user",
                 "federation.clients_per_round=61", "federation.local_steps=5", f"federation.rounds={rounds}", "federation.patience=null",
                 "tower.batch_size=16", "tower.lr=0.002", f"federation.engine={engine}"]
    rec = Recommender.from_config(load_config(REPO / "configs" / "ml-latest-small.yaml", overrides), run=None)
    started = time.perf_counter()
    results = train(rec, resume=False)
    wall = time.perf_counter() - started
    stop.set()
    return {"engine": engine, "load_average": os.getloadavg()[0], "clients": results["clients"], "rounds": results["rounds"], "wall_s": wall,
            "round_s": statistics.median(h["seconds"] for h in results["history"]), "peak_gib": peak[0] / 1024**3,
            "valid": [h["valid"]["R@10"] for h in results["history"]], "accepted": [h["accepted"] for h in results["history"]]}


def report() -> None:
    runs = {e: json.loads((OUT / f"{e}.json").read_text()) for e in ENGINES if (OUT / f"{e}.json").is_file()}
    if len(runs) < len(ENGINES):
        raise SystemExit(f"missing engines under {OUT}; run without --report")
    base = runs["inprocess"]
    rows = [[e, r["clients"], r["rounds"], f"{r['round_s']:.1f}", f"{r['round_s'] / base['round_s']:.2f}×", f"{r['wall_s']:.0f}",
             f"{r['peak_gib']:.2f}", "yes" if r["valid"] == base["valid"] else f"no ({r['valid']} vs {base['valid']})",
             ", ".join(map(str, r["accepted"]))] for e, r in runs.items()]
    table = markdown_table(["engine", "SuperNodes (clients)", "rounds", "s per round (median)", "vs in-process", "wall s (startup included)",
                            "peak GiB (process tree)", "same validation R@10 every round", "updates accepted per round"], rows)
    body = ("ml-latest-small, one user per client, 61 of 610 clients per round (seeded), 5 local steps each, FedAvg, the full tower "
            "(dim 64, 2 blocks); each engine in its own process, run one after the other in one invocation. The Simulation Engine "
            "runs Ray with 2 CPUs (one ClientApp per CPU at a time). Both engines ran with the same other load on the machine "
            "(1-minute load average at the end: " + ", ".join(f"{e} {r['load_average']:.1f}" if "load_average" in r else f"{e} not recorded"
                                                               for e, r in runs.items()) + "), so the ratio is the comparable figure.\n\n" + table)
    print(table)
    update_results("bench:simulation", "Simulation Engine with 610 SuperNodes (ml-latest-small)",
                   f"python benchmarks/bench_simulation.py --rounds {base['rounds']}", body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.engine:
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / f"{args.engine}.json").write_text(json.dumps(measure(args.engine, args.rounds), indent=2))
        return
    if not args.report:
        for engine in ENGINES:
            subprocess.run([sys.executable, __file__, "--engine", engine, "--rounds", str(args.rounds)], check=True)
    report()


if __name__ == "__main__":
    main()
