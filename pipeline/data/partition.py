"""Client partitions: which users' histories live on which client."""

from __future__ import annotations

from collections import Counter

import numpy as np

from pipeline.config import PartitionConfig
from pipeline.data.dataset import Dataset
from pipeline.errors import ConfigError


def dominant_genre(dataset: Dataset, history: np.ndarray) -> str:
    """Most frequent genre in a history (ties alphabetical; `none` when no genres)."""
    counts = Counter(g for item in history.tolist() for g in dataset.catalog.genres[item])
    if not counts:
        return "none"
    return min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0]


def partition_users(dataset: Dataset, histories: list[np.ndarray], cfg: PartitionConfig) -> list[np.ndarray]:
    """Assign users to clients.

    Args:
        dataset: the preprocessed dataset (for item genres).
        histories: per user, the items the partitioner may look at (training items only).
        cfg: the partition scheme.

    Returns:
        Per client, the sorted user indices it holds; every user is on exactly one client.
    """
    n_users = dataset.n_users
    if cfg.scheme == "user":
        return [np.array([u]) for u in range(n_users)]
    if cfg.num_clients > n_users:
        raise ConfigError(
            f"partition.num_clients={cfg.num_clients} exceeds the {n_users} users; "
            f"lower partition.num_clients to at most {n_users}"
        )
    rng = np.random.default_rng(cfg.seed)
    if cfg.split == "random":
        order = rng.permutation(n_users)
        return [np.sort(part) for part in np.array_split(order, cfg.num_clients)]
    return _dirichlet(dataset, histories, cfg, rng)


def _dirichlet(dataset: Dataset, histories: list[np.ndarray], cfg: PartitionConfig, rng: np.random.Generator) -> list[np.ndarray]:
    """Label-skew split: users grouped by dominant genre, each genre spread by Dir(alpha) weights."""
    labels = np.array([dominant_genre(dataset, h) for h in histories])
    clients: list[list[int]] = [[] for _ in range(cfg.num_clients)]
    for genre in sorted(set(labels.tolist())):
        users = rng.permutation(np.flatnonzero(labels == genre))
        weights = rng.dirichlet(np.full(cfg.num_clients, cfg.alpha))
        cuts = (np.cumsum(weights)[:-1] * len(users)).astype(int)
        for client, part in enumerate(np.split(users, cuts)):
            clients[client].extend(part.tolist())
    # Every client must hold someone: move a user from the largest client to each empty one.
    for client in range(cfg.num_clients):
        if not clients[client]:
            donor = max(range(cfg.num_clients), key=lambda c: len(clients[c]))
            clients[client].append(clients[donor].pop())
    return [np.sort(np.array(c, dtype=np.int64)) for c in clients]
