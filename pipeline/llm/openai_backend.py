"""OpenAI-compatible server backend (vLLM first).

Verbalizer request (vLLM started with `--enable-prompt-embeds --logprobs-mode
processed_logprobs --max-logprobs N`): `max_tokens=1`, `temperature=1`, `allowed_token_ids` =
the label ids, `logprobs`/`top_logprobs` = N and `return_tokens_as_token_ids=true`, so the
answer position's log-probs come back for exactly the labels. A soft prompt travels either as
a chat content part `{"type": "prompt_embeds", "data": base64(torch.save(tensor))}` ahead of the
user's text (`soft_prompt_transport="chat"`, the default), or as a full-prompt embedding tensor
on the Completions API, computed here from the model's own input embedding table
(`"completions"`). Both give the server exactly the sequence the in-process backend scores.

Item tokens travel either way too. As chat parts, vLLM joins every content part with a newline,
so a chat request reproduces the in-process prompt only when each item slot sits on its own line
(`rerank.v3`); such a request carries the item rows only (KBs) where /completions carries the
whole prompt's embeddings (MBs). Measured in tests/test_vllm.py.

The server re-renders chat messages and parses control tokens in their text, so every request
is first encoded here with the same tokenizer (`LLMBackend.encode`), which refuses messages
whose text would add a control token to the ones the chat template makes.
"""

from __future__ import annotations

import base64
import io
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.llm.base import (
    ITEM_SLOT,
    LLMBackend,
    LLMError,
    Messages,
    log_softmax,
    read_embedding_table,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
# Substrings of vLLM's 400 errors, and the server flag that fixes each.
_FLAG_HINTS = (
    ("enable-prompt-embeds", "start the server with --enable-prompt-embeds"),
    ("greater than max allowed", "start the server with --max-logprobs at least the number of candidates"),
)


def encode_tensor(tensor: torch.Tensor) -> str:
    """base64 of `torch.save(tensor)` for `prompt_embeds` (a contiguous copy, so only its own bytes travel)."""
    import torch

    buffer = io.BytesIO()
    torch.save(tensor.detach().to("cpu").contiguous().clone(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class OpenAIBackend(LLMBackend):
    """Talks to an OpenAI-compatible server; tokenisation and chat templates run locally.

    Args:
        base_url: e.g. `http://127.0.0.1:8000/v1`.
        tokenizer: local model folder (or id) whose tokenizer and chat template match the served model.
        served_model: model name on the server (default: the first one `/v1/models` lists).
        api_key: sent as a bearer token when given.
        concurrency: requests in flight.
        timeout_s: per request.
        max_retries: retries with exponential backoff on connection errors, timeouts and 5xx.
        soft_prompt_transport: `chat` (a `prompt_embeds` content part) or `completions` (full-prompt embeddings).
    """

    def __init__(
        self, base_url: str, *, tokenizer: str, served_model: str | None = None, api_key: str | None = None,
        concurrency: int = 4, timeout_s: float = 60.0, max_retries: int = 3, cache_dir: str | Path = ".cache",
        max_context: int | None = None, backoff_s: float = 0.5, soft_prompt_transport: str = "chat",
    ) -> None:
        import httpx
        from transformers import AutoConfig, AutoTokenizer

        from pipeline.llm.transformers_backend import resolve_model

        self.base_url = base_url.rstrip("/")
        self.model_path = resolve_model(tokenizer, Path(cache_dir))
        local = Path(self.model_path).is_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, local_files_only=not local)
        config = AutoConfig.from_pretrained(self.model_path, local_files_only=not local)
        self.context_length = max_context or int(getattr(config, "max_position_embeddings", 2048))
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        if soft_prompt_transport not in ("chat", "completions"):
            raise ValueError(f"llm.soft_prompt_transport must be chat or completions, got {soft_prompt_transport!r}")
        self.soft_prompt_transport = soft_prompt_transport
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=timeout_s, headers=headers, limits=httpx.Limits(max_connections=concurrency))
        self._served_model = served_model
        self._warned_unnormalised = False

    def describe(self) -> str:
        return f"OpenAI-compatible server {self.base_url} ({self.served_model})"

    @cached_property
    def served_model(self) -> str:
        if self._served_model:
            return self._served_model
        models = self._request("GET", "/models").get("data", [])
        if not models:
            raise LLMError(f"{self.base_url}/models lists no models; start the server with --model or set llm.served_model")
        return str(models[0]["id"])

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        import httpx

        url = self.base_url + path
        for attempt in range(self.max_retries + 1):
            try:
                response = self.client.request(method, url, json=body)
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code < 400:
                    return response.json()
                if response.status_code < 500:
                    raise LLMError(self._explain(url, response.status_code, response.text))
                problem = f"HTTP {response.status_code}: {response.text[:300]}"
            if attempt < self.max_retries:
                delay = self.backoff_s * 2**attempt
                log.warning("%s failed (%s); retry %d/%d in %.1f s", url, problem, attempt + 1, self.max_retries, delay)
                time.sleep(delay)
        raise LLMError(f"{url} failed after {self.max_retries + 1} attempts ({problem}); is the server running at llm.base_url?")

    @staticmethod
    def _explain(url: str, status: int, text: str) -> str:
        lowered = text.lower()
        for needle, hint in _FLAG_HINTS:
            if needle in lowered:
                return f"{url} rejected the request (HTTP {status}): {text[:400]}; {hint}"
        return f"{url} rejected the request (HTTP {status}): {text[:400]}"

    @cached_property
    def embedding_table(self) -> torch.Tensor:
        """`(vocab, hidden)` input embeddings read from the local model folder (for soft prompts)."""
        return read_embedding_table(self.model_path)

    @property
    def hidden_size(self) -> int:
        """The served model's width (from the local model folder), for soft prompts and projectors."""
        return int(self.embedding_table.shape[1])

    def _parse(self, entries: dict[int, float], label_ids: Sequence[int]) -> np.ndarray:
        missing = [t for t in label_ids if t not in entries]
        if missing:
            raise LLMError(
                f"the server returned log-probs for {len(entries) - len(set(entries) - set(label_ids))} of {len(label_ids)} "
                f"labels; start it with --logprobs-mode processed_logprobs and --max-logprobs >= {len(label_ids)}"
            )
        raw = np.array([entries[t] for t in label_ids], dtype=np.float64)
        total = float(np.exp(raw).sum())
        if abs(total - 1) > 1e-3 and not self._warned_unnormalised:
            log.warning("label probabilities sum to %.3f, not 1: start vLLM with --logprobs-mode processed_logprobs "
                        "(scores are renormalised over the labels meanwhile)", total)
            self._warned_unnormalised = True
        return log_softmax(raw[None])[0]

    def _score_one(self, messages: Messages, label_ids: list[int], soft_prompt: torch.Tensor | None,
                   item_tokens: torch.Tensor | None = None) -> np.ndarray:
        common = {
            "model": self.served_model, "max_tokens": 1, "temperature": 1.0, "allowed_token_ids": label_ids,
            "return_tokens_as_token_ids": True,
        }
        plain = soft_prompt is None and item_tokens is None
        # Encoded locally even when sent as text: this is what refuses control tokens from data.
        encoded = self.encode(messages, with_slot=soft_prompt is not None)
        if plain or self.soft_prompt_transport == "chat":
            if not plain:
                messages = self._with_embedding_parts(messages, soft_prompt, item_tokens)
            body = {**common, "messages": list(messages), "logprobs": True, "top_logprobs": len(label_ids)}
            reply = self._request("POST", "/chat/completions", body)
            top = reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
            entries = {int(t["token"].split(":", 1)[1]): float(t["logprob"]) for t in top}
        else:
            import torch

            table = self.embedding_table
            with torch.no_grad():
                embeds = encoded.compose(lambda ids: table[list(ids)], None if soft_prompt is None else soft_prompt.detach().cpu(),
                                         None if item_tokens is None else item_tokens.detach().cpu())
            body = {**common, "prompt_embeds": encode_tensor(embeds), "logprobs": len(label_ids)}
            reply = self._request("POST", "/completions", body)
            top = reply["choices"][0]["logprobs"]["top_logprobs"][0]
            entries = {int(k.split(":", 1)[1]): float(v) for k, v in top.items()}
        return self._parse(entries, label_ids)

    @staticmethod
    def _with_embedding_parts(messages: Messages, soft_prompt: torch.Tensor | None, item_tokens: torch.Tensor | None) -> list[dict[str, Any]]:
        """Messages as chat content parts: the soft prompt ahead of the first user message's text, and one part per
        item slot in place of it. vLLM joins parts with a newline, so each slot must stand on its own line (whose
        newlines the join puts back); otherwise the server would score a different prompt, and this raises."""
        out: list[dict[str, Any]] = [dict(m) for m in messages]
        first_user = next(i for i, m in enumerate(out) if m["role"] == "user")
        rows = iter(item_tokens.float() if item_tokens is not None else ())
        for i, message in enumerate(out):
            texts = message["content"].split(ITEM_SLOT)
            if len(texts) == 1 and not (i == first_user and soft_prompt is not None):
                continue
            parts: list[dict[str, Any]] = [{"type": "prompt_embeds", "data": encode_tensor(soft_prompt.float())}] if i == first_user and soft_prompt is not None else []
            for k, text in enumerate(texts):
                if k > 0:
                    if not (texts[k - 1].endswith("\n") and text.startswith("\n")):
                        raise LLMError("item tokens as chat content parts need each item slot on its own line (vLLM joins parts with "
                                       "newlines): use rerank.v3, or set llm.soft_prompt_transport=completions")
                    row = next(rows, None)
                    if row is None:
                        raise LLMError(f"the prompt has more item slots than the {len(item_tokens) if item_tokens is not None else 0} item tokens given")
                    parts.append({"type": "prompt_embeds", "data": encode_tensor(row[None])})
                start = 1 if k > 0 else 0
                end = len(text) - 1 if k < len(texts) - 1 else len(text)
                parts.append({"type": "text", "text": text[start:end]})
            message["content"] = parts
        if next(rows, None) is not None:
            raise LLMError("more item tokens were given than the prompt has item slots")
        return out

    def score_labels(
        self, prompts: Sequence[Messages], labels: Sequence[str], soft_prompt: torch.Tensor | None = None,
        item_tokens: Sequence[torch.Tensor] | None = None,
    ) -> np.ndarray:
        label_ids = self.label_ids(labels)
        items = list(item_tokens) if item_tokens is not None else [None] * len(prompts)
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            rows = list(pool.map(lambda pair: self._score_one(pair[0], label_ids, soft_prompt, pair[1]), zip(prompts, items, strict=True)))
        return np.stack(rows).astype(np.float32) if rows else np.zeros((0, len(labels)), dtype=np.float32)

    def generate(self, prompts: Sequence[Messages], *, max_tokens: int = 64) -> list[str]:
        def one(messages: Messages) -> str:
            self.encode(messages, with_slot=False)  # refuses control tokens from data before the server parses them
            body = {"model": self.served_model, "messages": list(messages), "max_tokens": max_tokens, "temperature": 0.0}
            return str(self._request("POST", "/chat/completions", body)["choices"][0]["message"]["content"] or "").strip()

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(one, prompts))
