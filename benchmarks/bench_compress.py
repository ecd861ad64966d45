"""Compressed uploads on ml-latest-small: bytes per client per round against test R@10 at convergence.

Every codec trains the same federated tower as `bench_tower.py iid` (10 IID user groups, one local
epoch per round, best round on validation R@10, patience 15) with the same seeds, so each
compressed run is compared with the uncompressed run of its own seed. Test metrics go through the
run's client FAISS indices over all 610 test users.

Usage: python benchmarks/bench_compress.py [--codecs fp32 int8 rank8-int8 ...] [--seeds 0 1 2] [--threads 1] [--report]

Every finished (codec, seed) is saved under runs/bench-compress/; `--report` rebuilds the table and the
RESULTS.md section from what is saved, so codecs can run as separate processes side by side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from common import REPO, data_dir, log_command, logged_commands, markdown_table, mean_sd, update_results

OUT = REPO / "runs" / "bench-compress"
FED = ["partition.scheme=group", "partition.num_clients=10", "partition.split=random", "federation.rounds=200",
       "federation.patience=15", "tower.batch_size=16", "tower.lr=0.002"]
CODECS = {
    "fp32": [],
    "bf16": ["federation.upload_bits=16"],
    "int8": ["federation.upload_bits=8"],
    "sign": ["federation.upload_bits=1"],
    "touched-int8": ["federation.upload_rows=touched", "federation.upload_bits=8"],
    "touched-sign": ["federation.upload_rows=touched", "federation.upload_bits=1"],
    "rank16-int8": ["federation.upload_rank=16", "federation.upload_bits=8"],
    "rank8-int8": ["federation.upload_rank=8", "federation.upload_bits=8"],
    "rank2-int8": ["federation.upload_rank=2", "federation.upload_bits=8"],
    "rank16-sign": ["federation.upload_rank=16", "federation.upload_bits=1"],
    "rank8-int8-noef": ["federation.upload_rank=8", "federation.upload_bits=8", "federation.error_feedback=false"],
}
LABELS = {
    "fp32": "fp32 (uncompressed)",
    "bf16": "bf16",
    "int8": "int8 + error feedback",
    "sign": "1-bit scaled sign + error feedback",
    "touched-int8": "touched item rows + int8 + error feedback",
    "touched-sign": "touched item rows + 1-bit sign + error feedback",
    "rank16-int8": "rank-16 factors + int8 + error feedback",
    "rank8-int8": "rank-8 factors + int8 + error feedback",
    "rank2-int8": "rank-2 factors + int8 + error feedback",
    "rank16-sign": "rank-16 factors + 1-bit sign + error feedback",
    "rank8-int8-noef": "rank-8 factors + int8, no error feedback",
}
KEYS = ["R@10", "N@10", "R@20", "MRR"]


def run(codec: str, seed: int, cache: Path) -> dict:
    from federation.runner import train
    from pipeline.config import load_config
    from pipeline.recommender import Recommender

    overrides = [f"cache_dir={cache}", f"output_dir={OUT / 'runs'}", f"federation.seed={seed}", f"partition.seed={seed}",
                 "eval.splits=[test]", *FED, *CODECS[codec]]
    rec = Recommender.from_config(load_config(REPO / "configs" / "ml-latest-small.yaml", overrides), run=None)
    results = train(rec, progress=True)
    return {"test": results["test"], "best": results["best_round"], "rounds": results["rounds"], "seconds": results["seconds"],
            "valid": results["valid"]["R@10"], "bytes_up": results["bytes_up_per_client_round"],
            "bytes_down": results["bytes_down_per_client_round"], "state_bytes": results["state_bytes"]}


def soft_prompt_bytes(hidden: int = 576, tokens: int = 20, item_dim: int = 64) -> list[list[str]]:
    """Upload bytes of the soft prompt and item-token projector (SmolLM2-135M width 576, 20 tokens, a 64-dim tower) per
    `soft_prompt_bits`, with the largest round-trip error relative to the largest value of a typical update."""
    import numpy as np

    from federation.compression import decode, encode
    from pipeline.config import FederationConfig
    from pipeline.llm.softprompt import SoftPrompt

    arrays = SoftPrompt(tokens, hidden, item_dim, seed=0).state_arrays()
    rng = np.random.default_rng(0)
    delta = {k: (rng.normal(scale=1e-3, size=v.shape)).astype(np.float32) for k, v in arrays.items()}
    rows = []
    for bits, name in ((32, "fp32"), (16, "bf16"), (8, "int8"), (1, "1-bit sign")):
        sent = encode(delta, FederationConfig(soft_prompt_bits=bits))
        back = decode(sent, delta)
        error = max(float(np.max(np.abs(back[k] - delta[k])) / np.max(np.abs(delta[k]))) for k in delta)
        rows.append([name, f"{sum(v.nbytes for v in sent.values()):,}", f"{error:.2g}"])
    return rows



def report() -> None:
    saved: dict[str, dict[int, dict]] = {}
    for path in sorted(OUT.glob("*-seed*.json")):
        codec, seed = path.stem.rsplit("-seed", 1)
        saved.setdefault(codec, {})[int(seed)] = json.loads(path.read_text())
    if "fp32" not in saved:
        raise SystemExit(f"no fp32 run saved under {OUT}; run --codecs fp32 first (every codec is compared with it)")
    base = saved["fp32"]
    rows = []
    for codec in CODECS:
        if codec not in saved:
            continue
        runs = saved[codec]
        paired = [s for s in runs if s in base]
        change = [runs[s]["test"]["R@10"] / base[s]["test"]["R@10"] - 1 for s in paired]
        rows.append([LABELS[codec], ", ".join(map(str, sorted(runs))), f"{statistics.median(r['bytes_up'] for r in runs.values()) / 1024:,.1f}",
                     f"{statistics.median(base[s]['bytes_up'] / runs[s]['bytes_up'] for s in paired):.1f}×" if paired else "—",
                     f"{statistics.median(r['bytes_down'] for r in runs.values()) / 1024:,.1f}",
                     *(mean_sd([r["test"][k] for r in runs.values()]) for k in KEYS),
                     f"{statistics.mean(change):+.1%}" if codec != "fp32" and change else "—",
                     f"{statistics.median(r['best'] for r in runs.values()):.0f}", f"{statistics.median(r['seconds'] for r in runs.values()):.0f}"])
    table = markdown_table(["upload", "seeds", "KiB up per client per round", "smaller by", "KiB down", *[f"test {k}" for k in KEYS],
                            "R@10 change vs fp32 (same seeds)", "best round", "s total"], rows)
    body = (
        "Protocol: as `bench:tower` \"federated, 10 IID groups\" (ml-latest-small, full ranking over 3,650 items, all 610 test users, "
        "best round on validation R@10, patience 15), the same seeds for every codec; the change is R@10(codec) / R@10(fp32) − 1 "
        "averaged over the seeds both have (negative = a loss). Bytes are the arrays a client sends (the encoded upload) or receives (the global state, "
        "fp32), per client per round, without Flower's message framing. Low-rank factors come from each delta's truncated SVD; int8 "
        "has one fp32 scale per row or column; error feedback keeps what an upload dropped on the client for its next round.\n\n" + table
        + "\n\nSoft prompt and item-token projector (`federation.soft_prompt_bits`; SmolLM2-135M width 576, 20 virtual tokens, "
        "64-dim tower): bytes per upload and the largest round-trip error of a Gaussian update relative to its largest value "
        "(computed by the script; their effect on reranking accuracy was not measured here).\n\n"
        + markdown_table(["soft prompt upload", "bytes", "max relative error"], soft_prompt_bytes())
    )
    print(table)
    commands = logged_commands(OUT)
    update_results("bench:compress", "Compressed uploads (ml-latest-small, 10 IID groups)", commands, body)


def main() -> None:
    import os

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codecs", nargs="+", choices=list(CODECS), default=["fp32", "int8", "sign", "touched-int8", "rank8-int8", "rank2-int8"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 when running codecs side by side)")
    parser.add_argument("--report", action="store_true", help="only rebuild the table and RESULTS.md from saved results")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("FEDREC_DATA_DIR", str(data_dir()))
    if not args.report:
        log_command(OUT, "bench_compress.py", sys.argv[1:])
        for codec in args.codecs:
            for seed in args.seeds:
                result = run(codec, seed, REPO / ".cache")
                (OUT / f"{codec}-seed{seed}.json").write_text(json.dumps(result, indent=2))
                print(codec, seed, json.dumps(result["test"]), result["bytes_up"], flush=True)
    report()


if __name__ == "__main__":
    main()
