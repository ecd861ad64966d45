"""Item embedding and FAISS index speed on ml-latest-small (3,650 items).

Measures: embedding the item texts cold (model load + encode, empty cache) and cached; index
build time; queries per second for Flat, HNSW32 and IVF vs numpy brute force on the same
vectors, measured side by side; recall@10 of the approximate indices against Flat.

Usage: python benchmarks/bench_retrieval.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from common import data_dir, markdown_table, median_time, update_results

# (factory, nprobe): IVF probed at two depths to show the recall/speed trade.
FACTORIES = (("Flat", 1), ("HNSW32", 1), ("IVF64,Flat", 8), ("IVF64,Flat", 32), ("IVF64,PQ32x4", 32))
K = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from pipeline.config import DataConfig
    from pipeline.data import load_dataset
    from retrieval import ItemIndex, TextEmbedder, brute_force

    dataset = load_dataset(DataConfig(name="ml-latest-small", path=data_dir() / "ml-latest-small"), Path("."))
    texts = dataset.catalog.texts()

    def cold() -> np.ndarray:
        with tempfile.TemporaryDirectory() as tmp:
            return TextEmbedder(cache_dir=tmp).encode(texts)

    cold_s, _ = median_time(cold, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        embedder = TextEmbedder(cache_dir=tmp)
        vectors = embedder.encode(texts)
        cached_s, _ = median_time(lambda: TextEmbedder(cache_dir=tmp).encode(texts), args.repeats)
    print(f"embed {len(texts)} items: cold {cold_s:.2f} s, cached {cached_s:.3f} s")

    # Queries: each user's recency-pooled history, as the zero-shot retriever builds them.
    histories = dataset.split().histories("test")
    queries = np.stack([vectors[h[-50:]].mean(axis=0) for h in histories]).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    _, exact = brute_force(vectors, queries, K)

    rows = []
    numpy_s, _ = median_time(lambda: brute_force(vectors, queries, K), args.repeats)
    rows.append(["numpy brute force", "—", "—", f"{len(queries) / numpy_s:,.0f}", "1.00×", "1.000"])
    for factory, nprobe in FACTORIES:
        build_s, _ = median_time(lambda f=factory, p=nprobe: ItemIndex.build(vectors, f, nprobe=p, ef_search=64), args.repeats)
        index = ItemIndex.build(vectors, factory, nprobe=nprobe, ef_search=64)
        search_s, _ = median_time(lambda i=index: i.index.search(queries, K), args.repeats * 3)
        _, ids = index.index.search(queries, K)
        recall = np.mean([len(set(a) & set(e)) / K for a, e in zip(ids.tolist(), exact.tolist(), strict=True)])
        rows.append([factory, nprobe if "IVF" in factory else "—", f"{build_s * 1000:.1f}", f"{len(queries) / search_s:,.0f}", f"{numpy_s / search_s:.2f}×", f"{recall:.3f}"])
        print(rows[-1])
    table = markdown_table(["method", "nprobe", "build ms", "queries/s", "speed vs numpy", f"recall@{K} vs exact"], rows)
    embed_table = markdown_table(
        ["item texts", "cold (load + encode) s", "cached s", "cold / cached"],
        [[f"{len(texts):,}", f"{cold_s:.2f}", f"{cached_s:.3f}", f"{cold_s / cached_s:,.0f}×"]],
    )
    print(embed_table)
    print(table)
    update_results(
        "bench:retrieval", "Item embedding and FAISS retrieval (ml-latest-small)",
        f"python benchmarks/bench_retrieval.py --repeats {args.repeats}",
        f"all-MiniLM-L6-v2 (packaged), 384 dims, batch 64, medians of {args.repeats} runs.\n\n{embed_table}\n\n"
        f"{len(queries)} queries (pooled test histories), k={K}, batch search, medians of {args.repeats * 3} runs; "
        f"HNSW efSearch=64. Speed is the ratio to numpy measured in the same run.\n\n{table}",
    )


if __name__ == "__main__":
    main()
