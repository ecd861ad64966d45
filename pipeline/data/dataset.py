"""Preprocessing to the benchmark protocol: k-core, chronological order, leave-one-out.

Protocol (docs/DESIGN.md): every rating is an interaction; users and items are filtered to the
k-core, repeated until nothing changes; each history is ordered by (timestamp, item id);
the last item is the test target and the second-to-last the validation target.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from pipeline.config import DataConfig
from pipeline.data.readers import (
    RawData,
    read_interactions,
    read_ml100k,
    read_movielens_csv,
    read_movielens_dat,
    read_recbole,
)
from pipeline.data.sources import DataSource, resolve_source
from pipeline.errors import DataError

log = logging.getLogger(__name__)
SplitName = Literal["valid", "test"]


def _find(lookup: dict, raw_id: object) -> int | None:
    """Look a raw id up as given, then as an integer or a string (CLI input arrives as text).

    Ids are opaque: any length, int or str; a bool, a list or a 5,000-digit number is simply not found.
    """
    if isinstance(raw_id, bool) or not isinstance(raw_id, (int, str, np.integer, np.str_)):
        return None
    if raw_id in lookup:
        return lookup[raw_id]
    text = str(raw_id).strip()
    if len(text) <= 20 and text.isascii() and text.lstrip("-").isdigit() and int(text) in lookup:
        return lookup[int(text)]
    return lookup.get(text)


@dataclass
class Catalog:
    """Items after filtering; position in each list is the item index used everywhere else."""

    item_ids: np.ndarray
    """(n_items,) raw ids, ascending."""
    titles: list[str]
    years: list[int | None]
    genres: list[tuple[str, ...]]
    tags: list[tuple[str, ...]]
    _lookup: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._lookup = {raw: i for i, raw in enumerate(self.item_ids.tolist())}

    def __len__(self) -> int:
        return len(self.item_ids)

    def label(self, item: int) -> str:
        """`Title (Year)` for display."""
        year = self.years[item]
        return f"{self.titles[item]} ({year})" if year else self.titles[item]

    def text(self, item: int, *, max_tags: int = 5) -> str:
        """The item text that gets embedded: cleaned title, year, genres and top tags."""
        parts = [self.label(item)]
        if self.genres[item]:
            parts.append("Genres: " + ", ".join(self.genres[item]))
        if max_tags and self.tags[item]:
            parts.append("Tags: " + ", ".join(self.tags[item][:max_tags]))
        return ". ".join(parts)

    def texts(self, *, max_tags: int = 5) -> list[str]:
        """`text` for every item, in index order."""
        return [self.text(i, max_tags=max_tags) for i in range(len(self))]

    def item_id(self, item: int) -> int | str:
        """The raw id of item index `item` as a plain Python int or str (for JSON and messages)."""
        return plain_scalar(self.item_ids[item])  # type: ignore[return-value]

    def index_of(self, raw_id: object) -> int | None:
        """Item index of a raw id (accepts the id as a string too), or None if unknown."""
        return _find(self._lookup, raw_id)


@dataclass
class Dataset:
    """A preprocessed dataset: chronological item sequences per user."""

    name: str
    catalog: Catalog
    user_ids: np.ndarray
    """(n_users,) raw ids, ascending; position is the user index."""
    sequences: list[np.ndarray]
    """Per user, item indices ordered by (timestamp, item id)."""
    ratings: list[np.ndarray]
    """Per user, the ratings aligned with `sequences` (NaN where the dataset has none)."""
    source: dict[str, str] = field(default_factory=dict)
    _user_lookup: dict = field(default_factory=dict, repr=False)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.catalog)

    @property
    def n_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    def user_id(self, user: int) -> int | str:
        """The raw id of user index `user` as a plain Python int or str."""
        return plain_scalar(self.user_ids[user])  # type: ignore[return-value]

    def user_index(self, raw_id: object) -> int:
        """User index of a raw id; raises a DataError naming the id and a valid range."""
        if not self._user_lookup:
            self._user_lookup = {raw: i for i, raw in enumerate(self.user_ids.tolist())}
        found = _find(self._user_lookup, raw_id)
        if found is not None:
            return found
        sample = ", ".join(str(u) for u in self.user_ids[:5].tolist())
        raise DataError(
            f"user {raw_id!r} is not in {self.name} after preprocessing ({self.n_users} users, e.g. {sample}); "
            "pick an existing user id (`fedrec data info` lists the range)"
        )

    def split(self) -> Split:
        """The leave-one-out split."""
        return leave_one_out(self.sequences)

    def stats(self) -> dict[str, float | int | str]:
        """Counts for `fedrec data info` and the benchmarks."""
        lengths = np.array([len(s) for s in self.sequences])
        return {
            "dataset": self.name,
            "users": self.n_users,
            "items": self.n_items,
            "interactions": self.n_interactions,
            "density": round(self.n_interactions / max(1, self.n_users * self.n_items), 5),
            "history_median": float(np.median(lengths)) if len(lengths) else 0.0,
            "history_min": int(lengths.min()) if len(lengths) else 0,
            "history_max": int(lengths.max()) if len(lengths) else 0,
        }


@dataclass
class Split:
    """Leave-one-out targets and the histories that precede them."""

    sequences: list[np.ndarray]

    def targets(self, split: SplitName) -> np.ndarray:
        """(n_users,) held-out item per user."""
        offset = 2 if split == "valid" else 1
        return np.array([s[-offset] for s in self.sequences], dtype=np.int64)

    def histories(self, split: SplitName) -> list[np.ndarray]:
        """What a model may see before the target: train items for validation, train + validation for test."""
        cut = -2 if split == "valid" else -1
        return [s[:cut] for s in self.sequences]

    def train(self) -> list[np.ndarray]:
        """Training items only (all but the last two)."""
        return self.histories("valid")


def leave_one_out(sequences: list[np.ndarray]) -> Split:
    """Build the split; every user needs at least 3 interactions."""
    for user, seq in enumerate(sequences):
        if len(seq) < 3:
            raise DataError(
                f"user index {user} has {len(seq)} interactions; leave-one-out needs at least 3 "
                "(train, validation, test); raise data.min_user_interactions to 3 or more"
            )
    return Split(sequences)


def k_core(inter: pd.DataFrame, min_user: int, min_item: int) -> pd.DataFrame:
    """Drop users and items below their thresholds, repeated until nothing changes."""
    while True:
        user_counts = inter["user_id"].map(inter["user_id"].value_counts())
        item_counts = inter["item_id"].map(inter["item_id"].value_counts())
        keep = (user_counts >= min_user) & (item_counts >= min_item)
        if keep.all():
            return inter
        inter = inter[keep]


def _resolve_duplicates(inter: pd.DataFrame, policy: str, path: str) -> pd.DataFrame:
    if policy == "keep_all":
        return inter
    dup = inter.duplicated(["user_id", "item_id"], keep="first")
    if not dup.any():
        return inter
    if policy == "keep_first":
        log.warning("dropped %d repeated (user, item) rows from %s", int(dup.sum()), path)
        return inter[~dup]
    at = int(np.argmax(dup.to_numpy()))
    user, item, line = (inter[c].iloc[at] for c in ("user_id", "item_id", "line"))
    first = int(inter.loc[(inter["user_id"] == user) & (inter["item_id"] == item), "line"].iloc[0])
    raise DataError(
        f"{path} line {line}: user {plain_scalar(user)!r} and item {plain_scalar(item)!r} repeat line {first} "
        f"({int(dup.sum())} repeated rows in all); remove them or set data.duplicates=keep_first "
        "(or keep_all for repeat consumption)"
    )


def plain_scalar(value: object) -> object:
    """numpy scalar → Python scalar, so messages read `1`, not `np.int64(1)`."""
    return value.item() if hasattr(value, "item") else value


def _attach_catalog(inter: pd.DataFrame, items: pd.DataFrame, policy: str, files: dict[str, str]) -> pd.DataFrame:
    known = inter["item_id"].isin(items["item_id"])
    if known.all():
        return inter
    missing = inter.loc[~known, "item_id"].unique()
    if policy == "drop":
        log.warning("dropped interactions with %d items missing from %s", len(missing), files.get("items"))
        return inter[known]
    sample = ", ".join(repr(plain_scalar(m)) for m in missing[:5])
    raise DataError(
        f"{len(missing)} item ids in {files.get('interactions')} are missing from the catalogue "
        f"{files.get('items')} (e.g. {sample}); add them to the catalogue or set data.missing_items=drop"
    )


def preprocess(raw: RawData, cfg: DataConfig, name: str) -> Dataset:
    """Apply the benchmark protocol to raw frames."""
    inter = raw.interactions
    if inter.empty:
        raise DataError(f"{raw.files.get('interactions')} holds no interactions")
    inter = _resolve_duplicates(inter, cfg.duplicates, raw.files.get("interactions", "?"))
    inter = _attach_catalog(inter, raw.items, cfg.missing_items, raw.files)
    inter = k_core(inter, cfg.min_user_interactions, cfg.min_item_interactions)
    if inter.empty:
        raise DataError(
            f"no interactions survive the {cfg.min_user_interactions}/{cfg.min_item_interactions}-core filter "
            f"on {raw.files.get('interactions')}; lower data.min_user_interactions / data.min_item_interactions"
        )
    item_ids = np.sort(inter["item_id"].unique())
    user_ids = np.sort(inter["user_id"].unique())
    item_index = pd.Series(np.arange(len(item_ids)), index=item_ids)
    user_index = pd.Series(np.arange(len(user_ids)), index=user_ids)
    frame = pd.DataFrame({
        "u": user_index.loc[inter["user_id"]].to_numpy(),
        "i": item_index.loc[inter["item_id"]].to_numpy(),
        "t": inter["timestamp"].to_numpy(),
        "r": inter["rating"].to_numpy(),
    }).sort_values(["u", "t", "i"], kind="stable")
    bounds = np.searchsorted(frame["u"].to_numpy(), np.arange(len(user_ids) + 1))
    items_arr, ratings_arr = frame["i"].to_numpy(), frame["r"].to_numpy(dtype=float)
    sequences = [items_arr[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    ratings = [ratings_arr[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    cat = raw.items.set_index("item_id").loc[item_ids]
    catalog = Catalog(
        item_ids=item_ids,
        titles=cat["title"].tolist(),
        years=[None if pd.isna(y) else int(y) for y in cat["year"]],
        genres=list(cat["genres"]),
        tags=list(cat["tags"]),
    )
    return Dataset(name, catalog, user_ids, sequences, ratings, dict(raw.files))


def read_raw(source: DataSource, cfg: DataConfig) -> RawData:
    """Dispatch to the reader for the source's format."""
    path = source.path
    if source.format == "ml-100k":
        return read_ml100k(path)
    if source.format == "movielens-csv":
        return read_movielens_csv(path, use_tags=cfg.use_tags)
    if source.format == "movielens-dat":
        return read_movielens_dat(path, use_tags=cfg.use_tags)
    if source.format == "recbole":
        return read_recbole(path)
    if source.format == "interactions":
        return read_interactions(path, Path(cfg.items_path))  # type: ignore[arg-type]
    raise DataError(f"data.format {source.format!r} is not supported")


def load_dataset(cfg: DataConfig, cache_dir: Path) -> Dataset:
    """Resolve, read and preprocess the configured dataset."""
    source = resolve_source(cfg, cache_dir)
    raw = read_raw(source, cfg)
    dataset = preprocess(raw, cfg, cfg.name if cfg.name != "custom" else Path(source.path).name)
    dataset.source.update({"origin": source.origin, "format": source.format, "path": str(source.path)})
    return dataset
