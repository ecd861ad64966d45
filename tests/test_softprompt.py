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
    with pytest.raises(ValueError, match=r"has no item-token slot .* use rerank\.v2"):
        PromptBuilder(backend, toy.catalog, RerankConfig(), item_tokens=True).build(request, "rerank.v1")


def test_item_tokens_change_scores_and_reranker_uses_them(backend: TransformersBackend, toy) -> None:
    builder = PromptBuilder(backend, toy.catalog, RerankConfig(template="rerank.v2"), item_tokens=True)
    request = RerankRequest("p", (0,), tuple(Candidate(i, 1.0 - i / 10) for i in range(4)))
    module = SoftPrompt(3, backend.hidden_size, 8)
    vectors = torch.randn(toy.n_items, 8, generator=torch.Generator().manual_seed(0))
    a = VerbalizerReranker(backend, builder, soft_prompt=module.prompt.detach(),
                           item_tokens=lambda items: module.item_tokens(vectors[list(items)]).detach()).llm_scores([request])[0]
    b = VerbalizerReranker(backend, builder, soft_prompt=module.prompt.detach(),
                           item_tokens=lambda items: 10 * module.item_tokens(vectors[list(items)]).detach()).llm_scores([request])[0]
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
