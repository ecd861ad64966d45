"""Text profiles: a deterministic, length-bounded description of a user's history.

The profile is what a client embeds to query its local index and what the reranking prompt
shows the LLM. It is built from structured facts and rendered through a versioned template.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

import prompts
from pipeline.config import ProfileConfig
from pipeline.data import Catalog

TokenCounter = Callable[[str], int]
_TOKEN = re.compile(r"\w+|[^\w\s]", re.UNICODE)
LOVED, DISLIKED = 4.5, 2.0


def approx_tokens(text: str) -> int:
    """Word-and-punctuation count: a tokenizer-free upper bound for WordPiece/BPE on plain words."""
    return len(_TOKEN.findall(text))


def top_genres(catalog: Catalog, items: Sequence[int], n: int) -> list[tuple[str, int]]:
    """The `n` most frequent genres of `items` with their counts, most frequent first (ties alphabetical)."""
    genres = Counter(g for i in items for g in catalog.genres[i])
    return sorted(genres.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


def _facts(
    history: Sequence[int], catalog: Catalog, ratings: Sequence[float] | None, cfg: ProfileConfig, n_recent: int, n_rated: int
) -> dict:
    known = [int(i) for i in history if 0 <= int(i) < len(catalog)]
    unknown = len(history) - len(known)
    top = top_genres(catalog, known, cfg.top_genres)
    recent = [
        {"label": catalog.label(i), "genres": list(catalog.genres[i][:3])}
        for i in reversed(known[-n_recent:])
    ] if n_recent else []
    rating = None
    if ratings is not None:
        pairs = [(int(i), float(r)) for i, r in zip(history, ratings, strict=True) if 0 <= int(i) < len(catalog) and not np.isnan(r)]
        if pairs:
            values = [r for _, r in pairs]
            newest = list(reversed(pairs))
            rating = {
                "mean": f"{np.mean(values):.1f}",
                "scale": 5 if max(values) <= 5 else int(max(values)),
                "loved": [catalog.label(i) for i, r in newest if r >= LOVED][:n_rated],
                "disliked": [catalog.label(i) for i, r in newest if r <= DISLIKED][:n_rated],
            }
    return {
        "n_items": len(known),
        "top_genres": [f"{g} ({n})" for g, n in top],
        "recent": recent,
        "rating": rating,
        "unknown": unknown,
    }


def build_profile(
    history: Sequence[int],
    catalog: Catalog,
    cfg: ProfileConfig | None = None,
    ratings: Sequence[float] | None = None,
    count_tokens: TokenCounter = approx_tokens,
) -> str:
    """Describe a history in at most `cfg.max_tokens` tokens.

    Args:
        history: item indices, oldest first; indices outside the catalogue are counted and skipped.
        catalog: titles and genres.
        cfg: template and bounds.
        ratings: ratings aligned with `history` (NaN or None where unknown).
        count_tokens: the tokenizer's counter the bound refers to.

    Returns:
        The rendered profile. Recent items are dropped first, then rated examples, until it fits.
    """
    cfg = cfg or ProfileConfig()
    if ratings is not None and len(ratings) != len(history):
        raise ValueError(f"ratings must align with history: got {len(ratings)} ratings for {len(history)} items")
    n_recent, n_rated = cfg.max_recent_items, 3
    while True:
        text = prompts.render(cfg.template, **_facts(history, catalog, ratings, cfg, n_recent, n_rated))
        if count_tokens(text) <= cfg.max_tokens:
            return text
        if n_recent > 0:
            n_recent -= 1
        elif n_rated > 0:
            n_rated -= 1
        else:
            return _truncate(text, cfg.max_tokens, count_tokens)


def _truncate(text: str, max_tokens: int, count_tokens: TokenCounter) -> str:
    words = text.split(" ")
    while words and count_tokens(" ".join(words) + " …") > max_tokens:
        words.pop()
    return " ".join(words) + " …"
