"""The served model: vLLM's OpenAI-compatible CPU server against the in-process backend."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.llm.base import ITEM_SLOT, LLMError
from pipeline.llm.openai_backend import OpenAIBackend
from pipeline.llm.transformers_backend import TransformersBackend

pytestmark = pytest.mark.vllm
LABELS = [chr(c) for c in range(ord("A"), ord("T") + 1)]


def _messages(n: int = 6) -> list[list[dict[str, str]]]:
    candidates = " ".join(f"({label}) film {i}" for i, label in enumerate(LABELS))
    return [
        [{"role": "system", "content": "Rank the candidates."},
         {"role": "user", "content": f"User who likes {'drama ' * (k + 1)}and comedy.\nCandidates: {candidates}\nAnswer with one letter."}]
        for k in range(n)
    ]


@pytest.fixture(scope="module")
def local(tiny_llama: Path) -> TransformersBackend:
    return TransformersBackend(str(tiny_llama))


@pytest.fixture(scope="module")
def served(vllm_server: str, tiny_llama: Path) -> OpenAIBackend:
    return OpenAIBackend(vllm_server, tokenizer=str(tiny_llama), concurrency=4, timeout_s=60)


def test_served_and_in_process_label_log_probs_agree(local: TransformersBackend, served: OpenAIBackend) -> None:
    a = local.score_labels(_messages(), LABELS)
    b = served.score_labels(_messages(), LABELS)
    assert b.shape == (6, 20)
    np.testing.assert_allclose(np.exp(b).sum(axis=1), 1.0, atol=1e-4)
    assert np.abs(a - b).max() <= 1e-3


def _with_line(messages: list[dict[str, str]], line: str) -> list[dict[str, str]]:
    return [dict(m, content=f"{line}\n{m['content']}") if m["role"] == "user" else m for m in messages]


@pytest.mark.parametrize("transport", ["chat", "completions"])
def test_prompt_embeds_of_own_tokens_equal_the_tokens(served: OpenAIBackend, transport: str) -> None:
    """The model's own token embeddings sent as prompt_embeds score exactly like the tokens sent as text."""
    served.soft_prompt_transport = transport
    ids = served.tokenizer("Hello there", add_special_tokens=False)["input_ids"]
    as_embeddings = served.score_labels(_messages(3), LABELS, soft_prompt=served.embedding_table[ids])
    as_text = served.score_labels([_with_line(m, "Hello there") for m in _messages(3)], LABELS)
    assert np.abs(as_embeddings - as_text).max() <= 1e-3


@pytest.mark.parametrize("transport", ["chat", "completions"])
def test_soft_prompt_changes_scores_identically_on_both_backends(local: TransformersBackend, served: OpenAIBackend, transport: str) -> None:
    served.soft_prompt_transport = transport
    soft = torch.randn(5, local.hidden_size, generator=torch.Generator().manual_seed(1))
    plain = served.score_labels(_messages(3), LABELS)
    a = local.score_labels(_messages(3), LABELS, soft_prompt=soft)
    b = served.score_labels(_messages(3), LABELS, soft_prompt=soft)
    assert np.abs(b - plain).max() > 1e-2
    assert np.abs(a - b).max() <= 1e-3


def _with_item_slots(messages: list[dict[str, str]], n: int, *, own_line: bool) -> list[dict[str, str]]:
    """The user message with an item-token slot after each of the first `n` candidate titles (rerank.v2 / v3 layouts)."""
    def mark(text: str) -> str:
        for i in range(n):
            text = text.replace(f"film {i} ", f"film {i}\n{ITEM_SLOT}\n" if own_line else f"film {i}{ITEM_SLOT} ", 1)
        return text

    return [dict(m, content=mark(m["content"])) if m["role"] == "user" else m for m in messages]


def test_item_tokens_through_both_transports(local: TransformersBackend, served: OpenAIBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Measured: item tokens score like in-process as full-prompt embeddings on /completions with any layout, and as
    chat `prompt_embeds` parts when each slot is on its own line (vLLM joins parts with newlines); the chat request
    carries only the item rows. A title-adjacent slot over chat is refused rather than silently scored differently."""
    table = served.embedding_table
    tokens = [table[torch.tensor([100 + 7 * k, 210 + k, 320, 330 - k])] for k in range(3)]
    soft = torch.randn(2, local.hidden_size, generator=torch.Generator().manual_seed(2))
    sizes: dict[str, list[int]] = {"chat": [], "completions": []}
    real = served._request

    def measured(method: str, path: str, body: dict | None = None) -> dict:
        if body is not None:
            sizes["chat" if path == "/chat/completions" else "completions"].append(len(json.dumps(body)))
        return real(method, path, body)

    monkeypatch.setattr(served, "_request", measured)
    for own_line in (False, True):
        messages = [_with_item_slots(m, 4, own_line=own_line) for m in _messages(3)]
        reference = local.score_labels(messages, LABELS, soft_prompt=soft, item_tokens=tokens)
        served.soft_prompt_transport = "completions"
        assert np.abs(served.score_labels(messages, LABELS, soft_prompt=soft, item_tokens=tokens) - reference).max() <= 1e-3
        served.soft_prompt_transport = "chat"
        if not own_line:
            with pytest.raises(LLMError, match=r"own line.*rerank.v3.*soft_prompt_transport=completions"):
                served.score_labels(messages, LABELS, soft_prompt=soft, item_tokens=tokens)
            continue
        assert np.abs(served.score_labels(messages, LABELS, soft_prompt=soft, item_tokens=tokens) - reference).max() <= 1e-3
        assert np.abs(served.score_labels(messages, LABELS, item_tokens=tokens) - local.score_labels(messages, LABELS, item_tokens=tokens)).max() <= 1e-3
    assert max(sizes["chat"]) * 5 < min(sizes["completions"])
    with pytest.raises(LLMError, match=r"more item slots than the 3 item tokens"):
        served.score_labels(messages[:1], LABELS, item_tokens=[tokens[0][:3]])


def test_generation_through_the_server(served: OpenAIBackend) -> None:
    texts = served.generate(_messages(2), max_tokens=5)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_too_many_logprobs_names_the_server_flag(served: OpenAIBackend) -> None:
    from pipeline.llm.base import LLMError

    labels52 = [chr(c) for c in range(ord("A"), ord("Z") + 1)] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    served.score_labels(_messages(1), labels52)  # the CI server allows 52
    with pytest.raises(LLMError, match=r"--max-logprobs"):
        served._request("POST", "/chat/completions", {
            "model": served.served_model, "messages": _messages(1)[0], "max_tokens": 1, "logprobs": True, "top_logprobs": 60,
        })


@pytest.mark.parametrize("template", ["rerank.v4", "rerank.v5", "rerank.v6"])
def test_compact_prompt_with_user_and_item_tokens_scores_alike(local: TransformersBackend, served: OpenAIBackend, movielens_csv: Path,
                                                               template: str) -> None:
    """The trained reranker's prompts (`rerank.v4`: a user token, then an item token per candidate, each on its own line;
    `rerank.v5`: the same without titles; `rerank.v6`: with bare letters) over vLLM's chat prompt_embeds parts score like
    in-process, whose shared start comes from the prefix KV cache."""
    from conftest import small_config

    from pipeline.config import RerankConfig
    from pipeline.data import load_dataset
    from pipeline.rerank import PromptBuilder, RerankRequest
    from retrieval import Candidate

    toy = load_dataset(small_config(movielens_csv).data, movielens_csv.parent / "cache")
    builder = PromptBuilder(local, toy.catalog, RerankConfig(template=template, max_title_tokens=6), item_tokens=True, user_token=True)
    rng = np.random.default_rng(0)
    requests = [RerankRequest("p", tuple(rng.permutation(toy.n_items)[:2].tolist()),
                              tuple(Candidate(int(i), 0.0) for i in rng.permutation(toy.n_items)[:3])) for _ in range(3)]
    messages = [builder.build(r, template) for r in requests]
    soft = torch.randn(4, local.hidden_size, generator=torch.Generator().manual_seed(5))
    tokens = [torch.randn(4, local.hidden_size, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    served.soft_prompt_transport = "chat"
    assert local.prefix_cache
    reference = local.score_labels(messages, list("ABC"), soft_prompt=soft, item_tokens=tokens)
    assert np.abs(served.score_labels(messages, list("ABC"), soft_prompt=soft, item_tokens=tokens) - reference).max() <= 1e-3
    other_user = [torch.cat([10 * t[:1], t[1:]]) for t in tokens]  # only the user token changes
    moved = served.score_labels(messages, list("ABC"), soft_prompt=soft, item_tokens=other_user)
    assert np.abs(moved - reference).max() > 1e-3
    assert np.abs(moved - local.score_labels(messages, list("ABC"), soft_prompt=soft, item_tokens=other_user)).max() <= 1e-3
