"""Grounded explanations: the facts against numpy and hand checks, the template, the independent checker, the LLM fallback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.config import RerankConfig
from pipeline.data.dataset import Catalog
from pipeline.explain import (
    Pick,
    audit,
    nearest_history,
    phrase,
    pick_facts,
    render_template,
    shared_genres,
    template_explanations,
)
from pipeline.rerank import RankedItem

# index: 0 Heat, 1 Ronin, 2 Toy Story, 3 Crime Story, 4 Big, 5 Casino
TITLES = ["Heat", "Ronin", "Toy Story", "Crime Story", "Big", "Casino"]
GENRES = [("Action", "Crime", "Thriller"), ("Action", "Crime"), ("Animation", "Children's", "Comedy"), ("Crime", "Drama"),
          ("Comedy",), ("Crime", "Drama")]


@pytest.fixture
def catalog() -> Catalog:
    return Catalog(np.arange(10, 70, 10), list(TITLES), [1995, 1998, 1995, 1986, 1988, 1995], list(GENRES), [()] * len(TITLES))


def test_nearest_history_matches_numpy_brute_force() -> None:
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(37, 5)).astype(np.float32)
    history = [3, 11, 3, 29, 5, 36, 17, 0, 22]  # a repeat, and the pick itself below
    pick = 17
    unique = [h for h in dict.fromkeys(history) if h != pick]
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    reference = sorted(((float(unit[h] @ unit[pick]), h) for h in unique), reverse=True)
    for k in (1, 3, len(unique), len(unique) + 4):
        found = nearest_history(vectors, history, pick, k)
        assert [h for h, _ in found] == [h for _, h in reference[:k]]
        np.testing.assert_allclose([s for _, s in found], [s for s, _ in reference[:k]], rtol=1e-6)
    assert nearest_history(vectors, [pick], pick, 3) == []


def test_nearest_history_prefers_the_more_recent_of_tied_items_and_survives_zero_vectors() -> None:
    vectors = np.array([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0], [0.0, 0.0]])
    assert nearest_history(vectors, [1, 2, 3], 0, 3) == [(2, 1.0), (1, 1.0), (3, 0.0)]


def test_shared_genres_by_hand(catalog: Catalog) -> None:
    assert shared_genres(catalog, 0, 1) == ("Action", "Crime")
    assert shared_genres(catalog, 0, 3) == ("Crime",)
    assert shared_genres(catalog, 0, 2) == ()
    assert shared_genres(catalog, 4, 2) == ("Comedy",)


def test_facts_name_the_space_the_neighbours_and_their_shared_genres(catalog: Catalog) -> None:
    vectors = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.7, 0.7], [-1.0, 0.0], [0.5, -0.5]])
    facts = pick_facts(catalog, vectors, "tower", [2, 1, 3, 4], [Pick(0, 1, 4)])[0]
    assert facts.space == "tower" and facts.title == "Heat (1995)" and facts.genres == GENRES[0]
    assert [n.item for n in facts.neighbours] == [1, 3]
    assert [n.shared_genres for n in facts.neighbours] == [("Action", "Crime"), ("Crime",)]
    with pytest.raises(ValueError, match=r"n_items=6"):
        pick_facts(catalog, vectors[:4], "text", [1], [Pick(0, 1)])


def test_rank_movement_from_reranked_items() -> None:
    ranked = [RankedItem(5, "C", 2, 0.1, -1.0, 2.0), RankedItem(7, "A", 0, 0.3, -2.0, 1.0), RankedItem(9, "B", 1, 0.2, -3.0, 0.0)]
    picks = Pick.from_ranked(ranked)
    assert [(p.item, p.rank, p.retrieval_rank) for p in picks] == [(5, 1, 3), (7, 2, 1), (9, 3, 2)]
    catalog = Catalog(np.arange(10), [f"t{i}" for i in range(10)], [None] * 10, [()] * 10, [()] * 10)
    facts = pick_facts(catalog, np.eye(10), "text", [0, 1], [*picks, Pick(3, 2, 2), Pick(4, 1, 1, reranked=False), Pick(6, 1, reranked=None)])
    assert [f.moved for f in facts] == [2, -1, -1, 0, None, None]
    assert facts[0].movement == "moved up 2 places by the reranker (#3 in retrieval, now #1)"
    assert facts[1].movement == "moved down 1 place by the reranker (#1 in retrieval, now #2)"
    assert facts[3].movement == "kept its retrieval place #2 after reranking"
    assert facts[4].movement == "not reranked" and facts[5].movement == ""


def test_template_states_every_fact_and_passes_the_checker(catalog: Catalog) -> None:
    vectors = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.7, 0.7], [-1.0, 0.0], [0.5, -0.5]])
    history = [2, 1, 3]
    facts = pick_facts(catalog, vectors, "tower", history, [Pick(0, 1, 3), Pick(4, 2, reranked=False)])
    heat, big = render_template(facts[0]), render_template(facts[1])
    assert heat == ("Heat (1995) is closest in the trained tower's item space to Ronin (1998), which shares Action and Crime, and to "
                    "Crime Story (1986), which shares Crime, from your history; moved up 2 places by the reranker (#3 in retrieval, now #1).")
    assert "which shares no genre with it" in big and big.endswith("; not reranked.")
    assert audit(heat, catalog, history, [0]).grounded
    alone = pick_facts(catalog, vectors, "text", [0], [Pick(0, 1, reranked=None)])[0]
    assert render_template(alone) == "Heat (1995) has no other item in your history to compare it with."
    assert [e.source for e in template_explanations(facts)] == ["template", "template"]


@pytest.mark.parametrize(("text", "named", "shared"), [
    ("Because you watched Ronin, Heat is another Crime film.", (1,), ("Crime",)),
    ("Like Ronin (1998), Heat (1995) is action with a crime story.", (1,), ("Action", "Crime")),
    ("Heat is a great Action film.", (), ()),  # no history item named
    ("You liked Toy Story, and Heat is pure Action.", (2,), ()),  # Action is not shared with Toy Story
    ("You watched Crime Story, so try Heat.", (3,), ()),  # "Crime" only inside a title
    ("You watched Crime Story, another crime film like Heat.", (3,), ("Crime",)),
    ("A big thriller, like Heat.", (), ()),  # "big" is not the title Big
    ("Ronin fans will like it: Thriller all the way.", (1,), ()),  # Ronin has no Thriller
])
def test_checker_on_hand_written_sentences(catalog: Catalog, text: str, named: tuple, shared: tuple) -> None:
    found = audit(text, catalog, history=[1, 2, 3, 4], picks=[0])
    assert found.history_named == named and found.shared_named == shared
    assert found.grounded == bool(shared)


def test_checker_counts_a_title_inside_a_longer_one_only_once() -> None:
    catalog = Catalog(np.arange(3), ["Alien", "Alien 3", "Die Hard"], [1979, 1992, 1988], [("Sci-Fi", "Horror"), ("Sci-Fi",), ("Action",)],
                      [()] * 3)
    assert audit("Alien 3 is more Sci-Fi.", catalog, history=[0, 2], picks=[1]).history_named == ()
    found = audit("After Alien, Alien 3 is more Sci-Fi.", catalog, history=[0, 2], picks=[1])
    assert found.history_named == (0,) and found.shared_named == ("Sci-Fi",)


class _Scripted:
    """An LLM backend that answers with fixed texts (the positive path of the check)."""

    def __init__(self, answers: list[str]) -> None:
        self.answers, self.prompts = answers, []

    def control_tokens(self) -> tuple[str, ...]:
        return ()

    def generate(self, messages: list, *, max_tokens: int) -> list[str]:
        self.prompts += messages
        return self.answers[: len(messages)]


def test_llm_sentence_is_kept_only_when_it_names_a_given_title_and_the_pick(catalog: Catalog) -> None:
    vectors = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.7, 0.7], [-1.0, 0.0], [0.5, -0.5]])
    facts = pick_facts(catalog, vectors, "tower", [1, 3], [Pick(0, 1, 1), Pick(5, 2, 2), Pick(4, 3, 3)])
    backend = _Scripted(["Heat suits you because you liked Ronin.\nsecond line", "Ronin is great.", "A fine comedy."])
    out = phrase(backend, facts, RerankConfig(), catalog)
    assert [e.source for e in out] == ["llm", "template", "template"]
    assert [n.item for n in facts[1].neighbours] == [1, 3]
    assert out[0].sentence == "Heat suits you because you liked Ronin." and out[0].fallback is None
    assert "did not name the recommended item" in out[1].fallback and out[1].sentence == render_template(facts[1])
    assert "named none of the given history titles" in out[2].fallback and out[2].generated == "A fine comedy."
    prompt = backend.prompts[0][-1]["content"]
    assert "Heat (1995)" in prompt and "Ronin (1998)" in prompt and "Action, Crime" in prompt


def test_tiny_random_llama_falls_back_to_the_template_and_says_so(tiny_llama: Path, catalog: Catalog) -> None:
    from pipeline.llm.transformers_backend import TransformersBackend

    backend = TransformersBackend(str(tiny_llama))
    vectors = np.random.default_rng(0).normal(size=(len(catalog), 4))
    facts = pick_facts(catalog, vectors, "text", [1, 2, 3], [Pick(0, 1, 2), Pick(4, 2, 1)])
    out = phrase(backend, facts, RerankConfig(explain_max_tokens=8), catalog)
    assert [e.source for e in out] == ["template", "template"]
    assert all(e.fallback and "showing the template" in e.fallback and e.generated is not None for e in out)
    assert [e.sentence for e in out] == [render_template(f) for f in facts]
