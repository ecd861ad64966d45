"""Grounded explanations: the facts behind each pick first, then one sentence that states them.

For every recommended pick the facts are the history items nearest to it in the retrieval space
(the trained tower's item embeddings, or the text item vectors when no run is served), the genres
the pick really shares with each of them (from the catalogue), and how the reranker moved it.
`render_template` states the facts in one deterministic sentence; `phrase` asks the LLM to say
them in its own words (`explain.v2`) and keeps its sentence only when it names the pick and one of
the given history titles, falling back to the template (and saying so) otherwise.

`audit` checks any explanation text against the catalogue and the user's history alone, by plain
string matching, so the benchmark can score generated and templated explanations the same way.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

import prompts

if TYPE_CHECKING:
    from pipeline.config import RerankConfig
    from pipeline.data import Catalog
    from pipeline.llm.base import LLMBackend
    from pipeline.rerank import RankedItem

Space = Literal["tower", "text"]
NEIGHBOURS = 2
"""History items quoted per pick."""
PHRASE_TEMPLATE = "explain.v2"
"""The prompt that turns one pick's facts into a sentence."""
SPACE_WORDS = {"tower": "the trained tower's item space", "text": "the text-embedding space"}


@dataclass(frozen=True)
class Pick:
    """A recommended item and where it stood before reranking."""

    item: int
    rank: int
    """1-based final position."""
    retrieval_rank: int | None = None
    """1-based position in the retrieved list (None when not known)."""
    reranked: bool | None = True
    """False: the list is the retrieval order; None: the caller does not know."""

    @classmethod
    def from_ranked(cls, ranked: Sequence[RankedItem]) -> list[Pick]:
        """Picks of a reranked list, best first (`RankedItem.retrieval_rank` is 0-based)."""
        return [cls(x.item, r + 1, x.retrieval_rank + 1) for r, x in enumerate(ranked)]


@dataclass(frozen=True)
class Neighbour:
    """A history item close to a pick."""

    item: int
    title: str
    similarity: float
    """Cosine similarity to the pick in the explanation's space."""
    shared_genres: tuple[str, ...]
    """Genres both the pick and this item have, in the pick's order."""


@dataclass(frozen=True)
class PickFacts:
    """What the system knows about one pick, before any sentence is written."""

    item: int
    title: str
    genres: tuple[str, ...]
    rank: int
    retrieval_rank: int | None
    reranked: bool | None
    space: Space
    neighbours: tuple[Neighbour, ...]
    """Nearest history items first."""

    @property
    def moved(self) -> int | None:
        """Places gained (+) or lost (-) by reranking; None when not reranked or not known."""
        return self.retrieval_rank - self.rank if self.reranked and self.retrieval_rank is not None else None

    @property
    def movement(self) -> str:
        """How reranking moved the pick, in words ("" when not known)."""
        if self.reranked is False:
            return "not reranked"
        if self.moved is None:
            return ""
        if self.moved > 0:
            return f"moved up {_places(self.moved)} by the reranker (#{self.retrieval_rank} in retrieval, now #{self.rank})"
        if self.moved < 0:
            return f"moved down {_places(-self.moved)} by the reranker (#{self.retrieval_rank} in retrieval, now #{self.rank})"
        return f"kept its retrieval place #{self.rank} after reranking"


@dataclass(frozen=True)
class Explanation:
    """One pick's facts and the sentence shown for them."""

    facts: PickFacts
    sentence: str
    source: Literal["template", "llm"]
    fallback: str | None = None
    """Why the LLM's sentence was replaced by the template (None when it was not)."""
    generated: str | None = None
    """The LLM's own sentence, kept or not (None when no LLM was asked)."""


def _places(n: int) -> str:
    return f"{n} place" if n == 1 else f"{n} places"


def nearest_history(vectors: np.ndarray, history: Sequence[int], item: int, k: int = NEIGHBOURS) -> list[tuple[int, float]]:
    """The `k` history items most cosine-similar to `item`, most similar first (ties: the more recent first).

    Args:
        vectors: `(n_items, dim)` item vectors.
        history: item indices, oldest first; repeats and `item` itself are skipped.
        item: the pick.

    Returns:
        `(history item, cosine)` pairs; fewer than `k` when the history is shorter.
    """
    seen = list(dict.fromkeys(int(h) for h in history if int(h) != int(item)))
    if not seen or k < 1:
        return []
    hist = np.asarray(vectors[seen], dtype=np.float64)
    pick = np.asarray(vectors[int(item)], dtype=np.float64)
    norms = np.linalg.norm(hist, axis=1) * np.linalg.norm(pick)
    cosine = np.divide(hist @ pick, norms, out=np.zeros(len(seen)), where=norms > 0)
    order = np.lexsort((-np.arange(len(seen)), -cosine))[:k]
    return [(seen[i], float(cosine[i])) for i in order]


def shared_genres(catalog: Catalog, pick: int, item: int) -> tuple[str, ...]:
    """Genres both `pick` and `item` have in the catalogue, in `pick`'s order."""
    theirs = set(catalog.genres[item])
    return tuple(g for g in catalog.genres[pick] if g in theirs)


def pick_facts(catalog: Catalog, vectors: np.ndarray, space: Space, history: Sequence[int], picks: Sequence[Pick],
               *, k: int = NEIGHBOURS) -> list[PickFacts]:
    """The facts for each pick: nearest history items in `space`, the genres shared with each, and the rank movement.

    Args:
        catalog: titles and genres.
        vectors: `(n_items, dim)` item vectors of `space`.
        space: which vectors these are (`tower` or `text`), reported with the facts.
        history: the user's item indices, oldest first.
        picks: the recommended items, best first.
        k: history items per pick.

    Raises:
        ValueError: `vectors` has a row count other than the catalogue's.
    """
    if vectors.ndim != 2 or len(vectors) != len(catalog):
        raise ValueError(f"vectors must be (n_items={len(catalog)}, dim), got {vectors.shape}; pass the item vectors of this catalogue")
    out = []
    for pick in picks:
        near = tuple(Neighbour(h, catalog.label(h), sim, shared_genres(catalog, pick.item, h))
                     for h, sim in nearest_history(vectors, history, pick.item, k))
        out.append(PickFacts(pick.item, catalog.label(pick.item), tuple(catalog.genres[pick.item]), pick.rank,
                             pick.retrieval_rank, pick.reranked, space, near))
    return out


def _join(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def render_template(facts: PickFacts) -> str:
    """One deterministic sentence stating `facts`."""
    if facts.neighbours:
        near = [f"{n.title}, which shares {_join(n.shared_genres)}" if n.shared_genres else f"{n.title}, which shares no genre with it"
                for n in facts.neighbours]
        text = f"{facts.title} is closest in {SPACE_WORDS[facts.space]} to " + ", and to ".join(near) + ", from your history"
    else:
        text = f"{facts.title} has no other item in your history to compare it with"
    return f"{text}; {facts.movement}." if facts.movement else f"{text}."


def template_explanations(facts: Sequence[PickFacts]) -> list[Explanation]:
    """The template sentence for each pick."""
    return [Explanation(f, render_template(f), "template") for f in facts]


def title_forms(catalog: Catalog, item: int) -> tuple[str, ...]:
    """How a text may name `item`: its title, with and without the year, and the main title before an alternative one in brackets."""
    title = catalog.titles[item]
    main = title.split(" (", 1)[0].strip()
    return tuple(dict.fromkeys(t for t in (catalog.label(item), title, main) if t))


def named_items(text: str, catalog: Catalog, items: Sequence[int]) -> tuple[set[int], str]:
    """Which of `items` the text names, and the text with those titles cut out.

    Longer titles are matched (and cut) first, so a title inside a longer one, "Alien" in "Alien 3", is not counted.
    """
    forms = sorted({(form, int(i)) for i in items for form in title_forms(catalog, int(i))}, key=lambda f: (-len(f[0]), f))
    found = set()
    for form, item in forms:
        text, hits = re.subn(rf"(?<!\w){re.escape(form)}(?!\w)", " ", text)
        if hits:
            found.add(item)
    return found, text


def first_line(text: str) -> str:
    """The first non-empty line of generated text, stripped."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def check_sentence(sentence: str, facts: PickFacts, catalog: Catalog) -> str | None:
    """Why an LLM sentence cannot stand for `facts` (None when it can): it must name the pick and at least one given history title."""
    named, _ = named_items(sentence, catalog, [facts.item, *(n.item for n in facts.neighbours)])
    if not any(n.item in named for n in facts.neighbours):
        return "the LLM's sentence named none of the given history titles"
    if facts.item not in named:
        return "the LLM's sentence did not name the recommended item"
    return None


def phrase(backend: LLMBackend, facts: Sequence[PickFacts], cfg: RerankConfig, catalog: Catalog) -> list[Explanation]:
    """One LLM sentence per pick from its facts (`explain.v2`); the template replaces any sentence that fails `check_sentence`,
    and `fallback` says why."""
    control = backend.control_tokens()
    todo = [i for i, f in enumerate(facts) if f.neighbours]
    messages = [prompts.render_chat(
        PHRASE_TEMPLATE, control_tokens=control, pick=facts[i].title, movement=facts[i].movement or "not known",
        space=SPACE_WORDS[facts[i].space], neighbours=[{"title": n.title, "genres": ", ".join(n.shared_genres)} for n in facts[i].neighbours],
    ) for i in todo]
    generated = dict(zip(todo, backend.generate(messages, max_tokens=cfg.explain_max_tokens), strict=True)) if todo else {}
    out = []
    for i, f in enumerate(facts):
        if i not in generated:
            out.append(Explanation(f, render_template(f), "template", "no history item to name; showing the template"))
            continue
        sentence = first_line(generated[i])
        problem = check_sentence(sentence, f, catalog)
        if problem is None:
            out.append(Explanation(f, sentence, "llm", generated=sentence))
        else:
            out.append(Explanation(f, render_template(f), "template", f"{problem}; showing the template", generated=sentence))
    return out


def explain_picks(facts: Sequence[PickFacts], mode: Literal["template", "llm"], *, backend: LLMBackend | None = None,
                  cfg: RerankConfig | None = None, catalog: Catalog | None = None) -> list[Explanation]:
    """Sentences for `facts`: from the template, or phrased by the LLM (which needs `backend`, `cfg` and `catalog`)."""
    if mode == "template":
        return template_explanations(facts)
    if backend is None or cfg is None or catalog is None:
        raise ValueError("explain mode 'llm' needs the backend, the rerank config and the catalogue; pass them or use mode 'template'")
    return phrase(backend, facts, cfg, catalog)


@dataclass(frozen=True)
class Grounding:
    """What an explanation text says that the catalogue can confirm."""

    history_named: tuple[int, ...]
    """History items whose title the text names."""
    shared_named: tuple[str, ...]
    """Genres the text names that a named history item really shares with a pick."""

    @property
    def grounded(self) -> bool:
        """It names a history item and a genre that item really shares with a pick."""
        return bool(self.shared_named)


def audit(text: str, catalog: Catalog, history: Sequence[int], picks: Sequence[int]) -> Grounding:
    """Check `text` by string matching only: which of the user's history titles it names, and which genres it names that a
    named history item shares with one of `picks` (`named_items` matches the titles; genres are matched case-insensitively in
    what is left, so a title such as "Crime Story" does not count as naming Crime).

    Args:
        text: any explanation.
        catalog: titles and genres.
        history: the user's item indices.
        picks: the item indices the text explains.
    """
    history = list(dict.fromkeys(int(h) for h in history))
    found, rest = named_items(text, catalog, [*history, *(int(p) for p in picks)])
    named = tuple(h for h in history if h in found)
    shared = {g for h in named for p in picks for g in shared_genres(catalog, int(p), h)}
    said = tuple(sorted(g for g in shared if re.search(rf"(?<!\w){re.escape(g)}(?!\w)", rest, flags=re.IGNORECASE)))
    return Grounding(named, said)
