"""Data preparation speed: load + 5-core + leave-one-out split (target: under 3 s each).

Usage: python benchmarks/bench_data.py [--repeats 5]
"""

from __future__ import annotations

import argparse

from common import data_dir, markdown_table, median_time, update_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from pipeline.config import DataConfig
    from pipeline.data import load_dataset

    root = data_dir()
    rows = []
    for name in ("ml-latest-small", "ml-100k"):
        cfg = DataConfig(name=name, path=root / name)
        dataset = load_dataset(cfg, root)  # warm the page cache and imports
        median, runs = median_time(lambda cfg=cfg: load_dataset(cfg, root).split(), args.repeats)
        stats = dataset.stats()
        rows.append([name, f"{stats['users']:,}", f"{stats['items']:,}", f"{stats['interactions']:,}",
                     f"{median:.3f}", f"{min(runs):.3f}–{max(runs):.3f}", "yes" if median < 3 else "NO"])
        print(f"{name}: median {median:.3f} s over {args.repeats} runs")
    table = markdown_table(["dataset", "users", "items", "interactions", "median s", "range s", "< 3 s"], rows)
    print(table)
    update_results("bench:data", "Data preparation (load, 5-core, split)", f"python benchmarks/bench_data.py --repeats {args.repeats}",
                   f"Median of {args.repeats} runs, from the GroupLens files.\n\n{table}")


if __name__ == "__main__":
    main()
