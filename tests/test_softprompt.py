"""Soft prompt + collaborative item tokens: slots, gradients, learning a signal only the item tokens carry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import small_config

from pipeline.config import RerankConfig
from pipeline.data import load_dataset
from pipeline.llm.softprompt import SoftPrompt, accuracy, make_examples, train_soft_prompt
from pipeline.llm.transformers_backend import TransformersBackend
from pipeline.rerank import PromptBuilder, RerankRequest, VerbalizerReranker
from retrieval import Candidate


@pytest.fixture(scope="module")
def backend(tiny_llama: Path) -> TransformersBackend:
    return TransformersBackend(str(tiny_llama), dtype="float32", batch_size=8)


@pytest.fixture
def toy(movielens_csv: Path):
    return load_dataset(small_config(movielens_csv).data, movielens_csv.parent / "cache")


def test_item_slots_follow_each_title_and_need_tokens(backend: TransformersBackend, toy) -> None:
    builder = PromptBuilder(backend, toy.catalog, RerankConfig(template="rerank.v2"), item_tokens=True)
    request = RerankRequest("p", (0,), tuple(Candidate(i, 0.0) for i in range(3)))
    messages = builder.build(request, "rerank.v2")
    encoded = backend.encode(messages, with_slot=True)
    assert encoded.slots == ("soft", "item", "item", "item")
    with pytest.raises(ValueError, match=r"3 item-token slots but 0 item tokens"):
        backend.score_labels([messages], list("ABC"), soft_prompt=torch.zeros(2, backend.hidden_size))
    with pytest.raises(ValueError, match=r"lacks an item-token slot per candidate .* use rerank\.v6"):
        PromptBuilder(backend, toy.catalog, RerankConfig(), item_tokens=True).build(request, "rerank.v1")


def test_item_tokens_change_scores_and_reranker_uses_them(backend: TransformersBackend, toy) -> None:
    builder = PromptBuilder(backend, toy.catalog, RerankConfig(template="rerank.v2"), item_tokens=True)
    request = RerankRequest("p", (0,), tuple(Candidate(i, 1.0 - i / 10) for i in range(4)))
    module = SoftPrompt(3, backend.hidden_size, 8)
    vectors = torch.randn(toy.n_items, 8, generator=torch.Generator().manual_seed(0))
    a = VerbalizerReranker(backend, builder, soft_prompt=module.prompt.detach(),
                           item_tokens=lambda reqs: [module.item_tokens(vectors[[c.item for c in r.candidates]]).detach() for r in reqs]
                           ).llm_scores([request])[0]
    b = VerbalizerReranker(backend, builder, soft_prompt=module.prompt.detach(),
                           item_tokens=lambda reqs: [10 * module.item_tokens(vectors[[c.item for c in r.candidates]]).detach() for r in reqs]
                           ).llm_scores([request])[0]
    assert np.abs(a - b).max() > 1e-3


@pytest.mark.slow
def test_soft_prompt_and_projector_learn_a_collaborative_signal(backend: TransformersBackend, toy) -> None:
    """The target is marked only in its item vector; text alone cannot tell. Training must beat chance."""
    rng = np.random.default_rng(0)
    n_cands, n_examples = 4, 24
    vectors = torch.as_tensor(rng.normal(size=(toy.n_items, 8)).astype(np.float32))
    builder = PromptBuilder(backend, toy.catalog, RerankConfig(template="rerank.v2", max_history_titles=0), item_tokens=True)
    labels = builder.labels(n_cands)
    requests, targets = [], []
    for _ in range(n_examples):
        items = rng.permutation(toy.n_items)[:n_cands]
        requests.append(RerankRequest("p", (), tuple(Candidate(int(i), 0.0) for i in items)))
        targets.append(int(items[rng.integers(n_cands)]))
    examples = make_examples(builder, requests, targets)
    marked = vectors.clone()
    # Each example's target gets a strong feature 0 in its own copy of the vectors: the only signal.
    per_example = []
    for e in examples:
        v = marked[list(e.items)].clone()
        v[:, 0] = -3.0
        v[e.target, 0] = 3.0
        per_example.append(v)
    table = torch.cat(per_example)
    offsets = np.cumsum([0] + [len(e.items) for e in examples])
    from dataclasses import replace

    examples = [replace(e, items=tuple(range(offsets[k], offsets[k + 1]))) for k, e in enumerate(examples)]
    module = SoftPrompt(2, backend.hidden_size, 8, seed=0)
    before = accuracy(module, backend, examples, table, labels)
    stats = train_soft_prompt(module, backend, examples, table, labels, epochs=30, batch_size=8, lr=3e-2)
    after = accuracy(module, backend, examples, table, labels)
    assert stats["loss"] < stats["loss_first"]
    assert after >= 0.75 and after > before
    for name, value in module.state_arrays().items():
        assert name.startswith("soft/") and value.dtype == np.float32


def _v4(backend: TransformersBackend, toy, *, user_token: bool = True, **rerank) -> PromptBuilder:
    return PromptBuilder(backend, toy.catalog, RerankConfig(template="rerank.v4", **rerank), item_tokens=True, user_token=user_token)


def test_v4_puts_the_user_token_first_and_each_slot_on_its_own_line(backend: TransformersBackend, toy) -> None:
    request = RerankRequest("p", (0, 1), tuple(Candidate(i, 0.0) for i in range(2, 5)))
    messages = _v4(backend, toy).build(request, "rerank.v4")
    encoded = backend.encode(messages, with_slot=True)
    assert encoded.slots == ("soft", "item", "item", "item", "item")
    from pipeline.llm.base import ITEM_SLOT

    user = messages[-1]["content"]
    assert user.startswith(f"User:\n{ITEM_SLOT}\n") and user.count(f"\n{ITEM_SLOT}\n") == 4
    assert f"Likes {', '.join(_v4(backend, toy).top_genres((0, 1)))}." in user
    without = _v4(backend, toy, user_token=False).build(request, "rerank.v4")
    assert "User:" not in without[-1]["content"] and backend.encode(without, with_slot=True).slots.count("item") == 3
    with pytest.raises(ValueError, match=r"lacks a \{\{ user_slot \}\} and an item-token slot"):
        PromptBuilder(backend, toy.catalog, RerankConfig(template="rerank.v3"), item_tokens=True, user_token=True).build(request, "rerank.v3")


@pytest.mark.parametrize(("template", "letter"), [("rerank.v5", "({})"), ("rerank.v6", "{}")])
def test_lean_prompts_show_each_candidate_by_its_item_token_alone(backend: TransformersBackend, toy, template: str, letter: str) -> None:
    """The lean prompts: no history and no titles, a letter line and a slot line per candidate; text-only they fall back to
    titles. rerank.v6 is rerank.v5 with the bare letter, so it is shorter still."""
    from pipeline.llm.base import ITEM_SLOT

    request = RerankRequest("p", (0, 1), tuple(Candidate(i, 0.0) for i in range(2, 5)))
    lean = PromptBuilder(backend, toy.catalog, RerankConfig(template=template), item_tokens=True, user_token=True)
    messages = lean.build(request, template)
    user = messages[-1]["content"]
    assert backend.encode(messages, with_slot=True).slots == ("soft", "item", "item", "item", "item")
    lines = "".join(f"{letter.format(lab)}\n{ITEM_SLOT}\n" for lab in "ABC")
    assert f"Candidates:\n{lines}Answer with one letter from A to C." in user
    assert not any(toy.catalog.label(i) in user for i in range(5)), "no title, of the history or of a candidate"
    assert backend.prompt_tokens(messages) < backend.prompt_tokens(_v4(backend, toy).build(request, "rerank.v4"))
    if template == "rerank.v6":
        v5 = PromptBuilder(backend, toy.catalog, RerankConfig(template="rerank.v5"), item_tokens=True, user_token=True)
        assert backend.prompt_tokens(messages) == backend.prompt_tokens(v5.build(request, "rerank.v5")) - 2 * 3
    text_only = PromptBuilder(backend, toy.catalog, RerankConfig(template=template)).build(request, template)[-1]["content"]
    assert all(f"({lab}) {toy.catalog.label(i)}\n" in text_only for lab, i in zip("ABC", range(2, 5), strict=True))


def test_titles_are_cut_to_the_token_budget(backend: TransformersBackend, toy) -> None:
    builder = _v4(backend, toy, max_title_tokens=5)
    cut = 0
    for item in range(toy.n_items):
        full, short = toy.catalog.label(item), builder.title(item)
        count = len(backend.tokenizer(short, add_special_tokens=False)["input_ids"])
        if len(backend.tokenizer(full, add_special_tokens=False)["input_ids"]) <= 5:
            assert short == full
            continue
        cut += 1
        assert "(" not in short[-7:] or not short.endswith(")")  # a cut title has no year
        assert full.startswith(short.removesuffix("…").rstrip()) and count <= 5 + 2  # the ellipsis may re-tokenise
    assert cut > 0


def test_prefix_cache_gives_the_scores_of_the_full_forward(tiny_llama: Path, toy) -> None:
    """The shared start (chat header + soft prompt) is computed once; every user's scores must equal a full forward pass."""
    cached = TransformersBackend(str(tiny_llama), dtype="float32", batch_size=3, prefix_cache=True)
    full = TransformersBackend(str(tiny_llama), dtype="float32", batch_size=3, prefix_cache=False)
    rng = np.random.default_rng(1)
    builder = _v4(cached, toy)
    requests = [RerankRequest("p", tuple(rng.permutation(toy.n_items)[:k].tolist()), tuple(Candidate(int(i), 0.0) for i in
                rng.permutation(toy.n_items)[:4])) for k in (0, 1, 3, 5, 2)]
    prompts = [builder.build(r, "rerank.v4") for r in requests]
    soft = torch.randn(3, cached.hidden_size, generator=torch.Generator().manual_seed(0))
    tokens = [torch.randn(5, cached.hidden_size, generator=torch.Generator().manual_seed(k)) for k in range(len(prompts))]
    a = cached.score_labels(prompts, list("ABCD"), soft_prompt=soft, item_tokens=tokens)
    b = full.score_labels(prompts, list("ABCD"), soft_prompt=soft, item_tokens=tokens)
    assert len(cached._prefixes) == 1 and not full._prefixes
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert np.abs(a[0] - a[1]).max() > 1e-4  # different users, different scores
    other = cached.score_labels(prompts[:2], list("ABCD"), soft_prompt=2 * soft, item_tokens=tokens[:2])
    np.testing.assert_allclose(other, full.score_labels(prompts[:2], list("ABCD"), soft_prompt=2 * soft, item_tokens=tokens[:2]), atol=1e-4)
    assert len(cached._prefixes) == 2


@pytest.mark.slow
def test_user_token_alone_carries_a_learnable_signal(backend: TransformersBackend, toy) -> None:
    """The target's position is written only in the user vector (item vectors are all zero, titles carry nothing useful):
    the user projector must learn to pass it to the LLM."""
    rng = np.random.default_rng(0)
    n_cands = 4
    builder = _v4(backend, toy, max_history_titles=0)
    requests, targets, users = [], [], []
    for _ in range(24):
        items = rng.permutation(toy.n_items)[:n_cands]
        requests.append(RerankRequest("p", (), tuple(Candidate(int(i), 0.0) for i in items)))
        slot = int(rng.integers(n_cands))
        targets.append(int(items[slot]))
        users.append(np.eye(8, dtype=np.float32)[slot] * 3)
    examples = make_examples(builder, requests, targets, users=np.stack(users))
    assert all(np.argmax(e.user) == e.target for e in examples)  # no candidate was replaced: the signal is intact
    labels = builder.labels(n_cands)
    zeros = torch.zeros(toy.n_items, 8)
    module = SoftPrompt(2, backend.hidden_size, 8, seed=0, user_token=True)
    before = accuracy(module, backend, examples, zeros, labels)
    stats = train_soft_prompt(module, backend, examples, zeros, labels, epochs=30, batch_size=8, lr=3e-2)
    after = accuracy(module, backend, examples, zeros, labels)
    assert stats["loss"] < stats["loss_first"] and after >= 0.75 and after > before
    assert {"soft/user_projector.weight", "soft/user_projector.bias"} <= set(module.state_arrays())


def test_position_examples_follow_the_tower_at_each_place(backend: TransformersBackend, toy) -> None:
    """Against a plain reference: each example is (history before place p → the tower's top-n unseen items for it, the
    item at p inserted when missed), with the tower's query vector for that history."""
    from pipeline.llm.softprompt import position_examples
    from retrieval.config import TowerConfig
    from retrieval.tower import RetrievalTower

    rng = np.random.default_rng(3)
    tower = RetrievalTower.create(rng.normal(size=(toy.n_items, 16)).astype(np.float32), TowerConfig(dim=8, max_len=8, layers=1, heads=1), seed=0)
    histories = [rng.permutation(toy.n_items)[:k] for k in (1, 2, 3, 4)]  # every prefix leaves ≥ 2 unseen of the toy's 5 items
    builder = _v4(backend, toy)
    examples = position_examples(builder, tower, histories, lambda i, p: f"user {i} first {p}", positions=2, n=2, seed=0)
    places = [(i, len(h) - b) for i, h in enumerate(histories) for b in (1, 2) if len(h) - b >= 1]
    assert len(examples) == len(places)  # the one-item history has no place with a history before it
    items = tower.item_matrix()
    for e, (i, p) in zip(examples, places, strict=True):
        prefix = histories[i][:p]
        query = tower.encode([prefix])[0]
        np.testing.assert_allclose(e.user, query, atol=1e-6)
        scores = items @ query
        scores[prefix] = -np.inf
        top = list(np.argsort(-scores, kind="stable")[:2])
        target = int(histories[i][p])
        assert e.items[e.target] == target
        if target in top:
            assert list(e.items) == [int(t) for t in top]
        else:
            assert sum(a != b for a, b in zip(e.items, top, strict=True)) == 1
    assert len({tuple(np.round(e.user, 5)) for e in examples}) == len(examples)  # different histories, different queries


def test_training_keeps_the_epoch_with_the_lowest_validation_loss(backend: TransformersBackend, toy) -> None:
    from pipeline.llm.softprompt import example_loss

    rng = np.random.default_rng(0)
    builder = _v4(backend, toy, max_history_titles=0)
    requests = [RerankRequest("p", (), tuple(Candidate(int(i), 0.0) for i in rng.permutation(toy.n_items)[:3])) for _ in range(8)]
    examples = make_examples(builder, requests, [r.candidates[k % 3].item for k, r in enumerate(requests)], users=rng.normal(size=(8, 8)))
    vectors = torch.as_tensor(rng.normal(size=(toy.n_items, 8)).astype(np.float32))
    module = SoftPrompt(2, backend.hidden_size, 8, seed=0, user_token=True)
    stats = train_soft_prompt(module, backend, examples[:5], vectors, builder.labels(3), epochs=4, batch_size=2, lr=0.5, valid=examples[5:])
    losses = [p["valid_loss"] for p in stats["curve"]]
    assert len(losses) == 4 and stats["best_epoch"] == int(np.argmin(losses)) + 1
    assert example_loss(module, backend, examples[5:], vectors, builder.labels(3)) == pytest.approx(min(losses), abs=1e-5)
