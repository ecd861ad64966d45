"""`fedrec data prepare`: the preprocessed dataset, split and partitions as plain files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.config import FedrecConfig
from pipeline.data import Dataset, partition_users
from pipeline.io import atomic_dir


def write_prepared(dataset: Dataset, cfg: FedrecConfig, target: Path) -> dict:
    """Write `sequences.npz`, `items.jsonl`, `clients.json` and `meta.json` into `target`, atomically.

    `sequences.npz` holds `items`/`ratings` concatenated over users with `offsets` (n_users + 1),
    so user u's chronological history is `items[offsets[u]:offsets[u+1]]`; its last item is the
    test target and the one before it the validation target.
    """
    split = dataset.split()
    clients = partition_users(dataset, split.train(), cfg.partition)
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in dataset.sequences])])
    summary = {**dataset.stats(), "clients": len(clients), "partition": cfg.partition.model_dump(), "source": dataset.source}
    with atomic_dir(target) as tmp:
        np.savez_compressed(
            tmp / "sequences.npz",
            items=np.concatenate(dataset.sequences), ratings=np.concatenate(dataset.ratings),
            offsets=offsets, user_ids=dataset.user_ids.astype(str), item_ids=dataset.catalog.item_ids.astype(str),
        )
        cat = dataset.catalog
        with (tmp / "items.jsonl").open("w", encoding="utf-8") as out:
            for i in range(len(cat)):
                row = {"index": i, "item_id": cat.item_id(i),
                       "title": cat.titles[i], "year": cat.years[i], "genres": list(cat.genres[i]), "tags": list(cat.tags[i])}
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
        (tmp / "clients.json").write_text(json.dumps([c.tolist() for c in clients]), encoding="utf-8")
        (tmp / "meta.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    return summary
