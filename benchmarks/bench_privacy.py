"""User-level DP on ml-latest-small: the privacy–utility curve of cross-device federated training.

Each user is a client (610). Every round samples each client independently (Poisson, rate
`--cohort / 610`), each sampled client takes `--steps` local steps, the server clips adaptively
(Flower's `DifferentialPrivacyServerSideAdaptiveClipping`, target quantile 0.5) and adds Gaussian
noise; the noised sum is divided by the expected cohort. For each target ε at δ = 1e-5 the noise
multiplier is the smallest that dp-accounting (the tighter of RDP and PLD, Poisson-subsampled
Gaussian composed over `--rounds`) puts at or below ε. The run keeps its last round
(`federation.select=last`), so no model selection touches validation data outside ε; test R@10 is
over all 610 test users through the run's client FAISS indices. ε = ∞ is the same run without DP.

Item sides: `text` (text projection + per-item residual, the full tower) and `projection` (the
FM angle: only the shared projection of the frozen text embeddings, nothing per item).

Usage: python benchmarks/bench_privacy.py [--epsilons 1 2 4 8 16 inf] [--items text projection] [--seeds 0]
       [--rounds 30] [--cohort 122] [--steps 5] [--threads 1] [--report]

Each finished point is saved under runs/bench-privacy/; `--report` rebuilds the table, the plot
(benchmarks/privacy_utility.png) and the RESULTS.md section from what is saved.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys

from common import REPO, data_dir, log_command, logged_commands, markdown_table, mean_sd, update_results

OUT = REPO / "runs" / "bench-privacy"
PLOT = REPO / "benchmarks" / "privacy_utility.png"
DELTA = 1e-5
USERS = 610


def noise_for(epsilon: float, rate: float, rounds: int, delta: float = DELTA) -> float:
    """The smallest noise multiplier (to 0.1%) whose reported ε after `rounds` is at most `epsilon`."""
    from federation.core import PrivacyAccountant

    lo, hi = 0.05, 200.0
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        if PrivacyAccountant(mid, rate, rounds).epsilon(delta) > epsilon:
            lo = mid
        else:
            hi = mid
    return hi


def _name(epsilon: float, items: str, seed: int) -> str:
    return f"{items}-eps{'inf' if math.isinf(epsilon) else f'{epsilon:g}'}-seed{seed}"


def run(epsilon: float, items: str, seed: int, args: argparse.Namespace) -> dict:
    from federation.runner import train
    from pipeline.config import load_config
    from pipeline.recommender import Recommender

    rate = args.cohort / USERS
    overrides = [f"cache_dir={REPO / '.cache'}", f"output_dir={OUT / 'runs'}", f"federation.seed={seed}", f"partition.seed={seed}",
                 "eval.splits=[test]", "partition.scheme=user", "federation.sampling=poisson", f"federation.clients_per_round={args.cohort}",
                 f"federation.local_steps={args.steps}", f"federation.rounds={args.rounds}", "federation.patience=null",
                 "federation.select=last", "tower.batch_size=16", "tower.lr=0.002", f"tower.item_init={items}"]
    noise = None
    if not math.isinf(epsilon):
        noise = noise_for(epsilon, rate, args.rounds)
        overrides += ["federation.dp_clip=1.0", "federation.dp_adaptive=true", "federation.dp_target_quantile=0.5",
                      f"federation.dp_noise_multiplier={noise}", f"federation.dp_delta={DELTA}"]
    rec = Recommender.from_config(load_config(REPO / "configs" / "ml-latest-small.yaml", overrides), run=None)
    results = train(rec, progress=True)
    return {"target_epsilon": epsilon, "items": items, "seed": seed, "noise_multiplier": noise, "rate": rate, "rounds": results["rounds"],
            "epsilon": results.get("epsilon", math.inf), "epsilon_rdp": results.get("epsilon_rdp", math.inf),
            "epsilon_pld": results.get("epsilon_pld", math.inf), "test": results["test"], "seconds": results["seconds"],
            "bytes_up": results["bytes_up_per_client_round"], "clients_per_round": statistics.mean(h["asked"] for h in results["history"]),
            "final_clip": results["history"][-1].get("dp_clipping_norm"), "start": {"cohort": args.cohort, "steps": args.steps}}


def untrained(items: str) -> float:
    """Test R@10 of the untrained tower (round 0: the text projection alone), the floor a private run must beat; cached."""
    path = OUT / f"untrained-{items}.json"
    if not path.is_file():
        import numpy as np

        from federation.task import Recipe, initial_state
        from pipeline.config import load_config
        from pipeline.evaluate import evaluate_state
        from pipeline.recommender import Recommender

        cfg = load_config(REPO / "configs" / "ml-latest-small.yaml", [f"cache_dir={REPO / '.cache'}", "partition.scheme=user",
                                                                      f"tower.item_init={items}", "federation.seed=0"])
        rec = Recommender.from_config(cfg, run=None)
        state = initial_state(rec.item_vectors, Recipe.of(rec.cfg))
        path.write_text(json.dumps({"R@10": evaluate_state(rec, state, "test", np.arange(rec.dataset.n_users))["R@10"]}))
    return float(json.loads(path.read_text())["R@10"])



def report() -> None:
    saved: dict[tuple[str, float], list[dict]] = {}
    for path in sorted(OUT.glob("*-eps*-seed*.json")):
        point = json.loads(path.read_text())
        saved.setdefault((point["items"], float(point["target_epsilon"])), []).append(point)
    if not saved:
        raise SystemExit(f"nothing saved under {OUT}; run some points first")
    rows, curves = [], {}
    full = [p["test"]["R@10"] for p in saved.get(("text", math.inf), [])]
    reference = statistics.mean(full) if full else None  # the non-private full tower: what "non-private" means in the target
    labels = {"text": "full tower (text projection + per-item residual)", "projection": "FM: shared text projection only"}
    for items in ("text", "projection"):
        private = {eps: pts for (it, eps), pts in saved.items() if it == items}
        if not private:
            continue
        base = statistics.mean(p["test"]["R@10"] for p in private.get(math.inf, [])) if math.inf in private else None
        for eps in sorted(private):
            points = private[eps]
            r10 = [p["test"]["R@10"] for p in points]
            share = f"{statistics.mean(r10) / base:.0%}" if base else "—"
            noise = points[0]["noise_multiplier"]
            rows.append([labels[items], "∞" if math.isinf(eps) else f"{eps:g}",
                         "—" if noise is None else f"{noise:.3f}",
                         "—" if math.isinf(points[0]["epsilon"]) else f"{statistics.median(p['epsilon'] for p in points):.3f}",
                         len(points), mean_sd(r10), mean_sd([p["test"]["N@10"] for p in points]), share,
                         f"{statistics.mean(r10) / reference:.0%}" if reference else "—",
                         f"{statistics.median(p['clients_per_round'] for p in points):.1f}",
                         f"{statistics.median(p['bytes_up'] for p in points) / 1024:,.0f}", f"{statistics.median(p['seconds'] for p in points):.0f}"])
            curves.setdefault(items, []).append((eps, statistics.mean(r10), statistics.stdev(r10) if len(r10) > 1 else 0.0))
    table = markdown_table(["item side", "target ε", "noise multiplier", "reported ε (PLD/RDP, tighter)", "seeds", "test R@10", "test N@10",
                            "R@10 vs its non-private run", "R@10 vs non-private full tower", "clients per round (mean)", "KiB up per client", "s total"], rows)
    smallest = []
    for items, curve in curves.items():
        keep = [e for e, m, _ in curve if not math.isinf(e) and reference and m >= 0.5 * reference]
        smallest.append(f"{labels[items]}: " + (f"ε = {min(keep):g}" if keep else "none of the ε measured"))
    _plot(curves, labels)
    any_point = next(iter(saved.values()))[0]
    body = (
        f"Protocol: ml-latest-small, one user per client (610 clients), Poisson sampling at rate {any_point['rate']:.3f} "
        f"(expected {any_point['start']['cohort']} clients per round), {any_point['start']['steps']} local steps per client, "
        f"{any_point['rounds']} rounds, the last round kept; Flower's server-side adaptive clipping (initial norm 1.0, target "
        "quantile 0.5) and Gaussian noise, the noised sum divided by the expected cohort; ε at δ = 1e-5 from dp-accounting "
        "(Poisson-subsampled Gaussian, the tighter of RDP and PLD). Test R@10 over all 610 users through the run's client FAISS indices.\n\n"
        + table + "\n\nUntrained tower (round 0, seed 0), the floor a private run has to beat: test R@10 "
        + ", ".join(f"{labels[items]} {untrained(items):.4f}" for items in curves) + " (popularity: see the evaluation section).\n\nSmallest ε measured at which R@10 stays ≥ 50% of the non-private full tower's: " + "; ".join(smallest) + ".\n\n"
        f"![privacy–utility curve]({PLOT.name})"
    )
    print(table)
    print("; ".join(smallest))
    commands = logged_commands(OUT)
    update_results("bench:privacy", "User-level DP: privacy–utility (ml-latest-small, cross-device)", commands, body)


def _plot(curves: dict[str, list[tuple[float, float, float]]], labels: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    finite = [e for curve in curves.values() for e, _, _ in curve if not math.isinf(e)] or [1.0]
    inf_x = max(finite) * 2.5
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for items, curve in curves.items():
        xs = [inf_x if math.isinf(e) else e for e, _, _ in curve]
        ax.errorbar(xs, [m for _, m, _ in curve], yerr=[s for _, _, s in curve], marker="o", capsize=3, label=labels[items])
    ax.set_xscale("log")
    ticks = sorted({*finite, inf_x})
    ax.set_xticks(ticks, [("∞" if t == inf_x else f"{t:g}") for t in ticks])
    ax.set_xlabel("ε (δ = 1e-5)")
    ax.set_ylabel("test R@10")
    ax.set_title("User-level DP, ml-latest-small, one user per client")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)


def main() -> None:
    import os

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilons", nargs="+", type=float, default=[1, 2, 4, 8, 16, math.inf])
    parser.add_argument("--items", nargs="+", choices=["text", "projection"], default=["text", "projection"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--cohort", type=int, default=122, help="expected clients per round")
    parser.add_argument("--steps", type=int, default=5, help="local steps per client per round")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 when running points side by side)")
    parser.add_argument("--report", action="store_true", help="only rebuild the table, plot and RESULTS.md from saved points")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("FEDREC_DATA_DIR", str(data_dir()))
    if not args.report:
        log_command(OUT, "bench_privacy.py", sys.argv[1:])
        for items in args.items:
            for epsilon in args.epsilons:
                for seed in args.seeds:
                    point = run(epsilon, items, seed, args)
                    (OUT / f"{_name(epsilon, items, seed)}.json").write_text(json.dumps(point, indent=2))
                    print(_name(epsilon, items, seed), json.dumps(point["test"]), point["epsilon"], flush=True)
    report()


if __name__ == "__main__":
    main()
