"""LLM reranking of retrieved candidates.

`VerbalizerReranker` (LlamaRec): the candidates are labelled A, B, C… and one forward pass gives
the log-probability of each label at the answer position; those scores are fused with the
retrieval scores. `ListwiseReranker` (LLMRank) generates a ranking instead and is kept as the
baseline it is measured against.
"""

from __future__ import annotations

import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

import prompts
from pipeline.config import RerankConfig, SoftPromptConfig
from pipeline.data import Catalog
from pipeline.llm.base import ITEM_SLOT, LLMBackend, Messages
from retrieval import Candidate

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
_YEAR = re.compile(r" \(\d{4}\)$")


@dataclass(frozen=True)
class RerankRequest:
    """One user's reranking input."""

    profile: str
    history: Sequence[int]
    """Item indices, oldest first."""
    candidates: Sequence[Candidate]
    """Retrieved candidates, best first."""


@dataclass(frozen=True)
class RankedItem:
    """A candidate after reranking."""

    item: int
    label: str
    retrieval_rank: int
    retrieval_score: float
    llm_score: float
    """Label log-probability (verbalizer) or a rank-derived score (listwise)."""
    score: float
    """The fused score the list is sorted by."""


class Reranker(ABC):
    """One required method; `rerank_batch` batches LLM calls."""

    @abstractmethod
    def rerank_batch(self, requests: Sequence[RerankRequest]) -> list[list[RankedItem]]:
        """Reranked candidates for each request, best first."""

    def rerank(self, request: RerankRequest) -> list[RankedItem]:
        return self.rerank_batch([request])[0]


class PromptBuilder:
    """Renders a prompt from structured data and makes it fit the model's context.

    When the prompt is too long, history titles are dropped first (oldest first), then titles are
    shortened; a warning says what was cut. Titles and the profile are made inert against the
    backend's control tokens (`prompts.render_chat`), so a title cannot open a chat turn.
    """

    def __init__(self, backend: LLMBackend, catalog: Catalog, cfg: RerankConfig, *, item_tokens: bool = False,
                 user_token: bool = False) -> None:
        self.backend = backend
        self.catalog = catalog
        self.cfg = cfg
        self.item_tokens = item_tokens
        self.user_token = user_token
        """Render a `{{ user_slot }}` (the first embedding slot) for the user token; needs `item_tokens`."""
        self._titles: dict[int, str] = {}

    @property
    def n_user_slots(self) -> int:
        return int(self.user_token)

    def title(self, item: int) -> str:
        """The item's label within `cfg.max_title_tokens` LLM tokens (cached per item). A longer one is cut and loses its
        trailing " (year)" rather than keep a piece of it (the year alone is 6 tokens in SmolLM2's tokenizer)."""
        if item not in self._titles:
            label, limit = self.catalog.label(item), self.cfg.max_title_tokens
            if limit is not None and len(self.backend._ids(label)) > limit:
                stem = _YEAR.sub("", label)
                ids = self.backend._ids(stem)
                label = stem if len(ids) <= limit else self.backend.tokenizer.decode(ids[: limit - 1]).rstrip() + "…"
            self._titles[item] = label
        return self._titles[item]

    def top_genres(self, history: Sequence[int], n: int = 3) -> list[str]:
        """The history's most frequent genres (ties alphabetical), as the text profile lists them."""
        from pipeline.profile import top_genres

        return [g for g, _ in top_genres(self.catalog, history, n)]

    def labels(self, n: int) -> list[str]:
        return prompts.labels_for(n, self.cfg.label_set)

    def build(self, request: RerankRequest, template: str, *, reserve: int = 1) -> Messages:
        """Messages for `request` within `backend.context_length - reserve` tokens.

        Raises:
            ValueError: even with no history and 16-character titles the prompt does not fit.
        """
        labels = self.labels(len(request.candidates))
        if self.user_token and not self.item_tokens:
            raise ValueError("a user token travels in the item-token slots; build the prompt with item_tokens=True")
        slot = ITEM_SLOT if self.item_tokens else ""
        history = [self.title(i) for i in list(request.history)[-self.cfg.max_history_titles :]] if self.cfg.max_history_titles else []
        titles = [self.title(c.item) for c in request.candidates]
        genres = self.top_genres(request.history)
        budget = self.backend.context_length - reserve
        control = self.backend.control_tokens()

        def render(hist: list[str], limit: int | None) -> Messages:
            def cut(title: str) -> str:
                return title if limit is None or len(title) <= limit else title[: limit - 1] + "…"

            return prompts.render_chat(
                template, control_tokens=control, profile=request.profile, history=[cut(t) for t in hist],
                candidates=[{"label": lab, "title": cut(t), "item_slot": slot} for lab, t in zip(labels, titles, strict=True)],
                labels=labels, user_slot=ITEM_SLOT if self.user_token else "", top_genres=genres,
            )

        messages = render(history, None)
        if self.item_tokens and sum(m["content"].count(ITEM_SLOT) for m in messages) != len(titles) + self.n_user_slots:
            need = "a {{ user_slot }} and " if self.user_token else ""
            raise ValueError(f"prompt template {template!r} lacks {need}an item-token slot per candidate ({{{{ c.item_slot }}}}); "
                             "use rerank.v6 (user and item tokens) or rerank.v3 (item tokens)")
        if self.backend.prompt_tokens(messages) <= budget:
            return messages
        dropped, limit = 0, None
        while history and self.backend.prompt_tokens(messages) > budget:
            history, dropped = history[1:], dropped + 1
            messages = render(history, None)
        limit = self.cfg.max_title_chars
        while self.backend.prompt_tokens(messages) > budget:
            messages = render(history, limit)
            if limit <= 16:
                break
            limit = max(16, limit // 2)
        tokens = self.backend.prompt_tokens(messages)
        if tokens > budget:
            raise ValueError(
                f"the {template} prompt needs {tokens} tokens with no history and 16-character titles, over the "
                f"budget of {budget}; lower retrieval.num_candidates, shorten profile.max_tokens or raise llm.max_context"
            )
        log.warning("prompt shortened to fit %d tokens: dropped %d history titles%s", budget, dropped,
                    f", titles cut to {limit} characters" if limit else "")
        return messages


def trained_prompt_builder(backend: LLMBackend, catalog: Catalog, rerank: RerankConfig, soft: SoftPromptConfig, *,
                           user_token: bool | None = None) -> PromptBuilder:
    """The prompt of the trained reranker: `soft_prompt.template` with its title and history budget, item slots, and a
    user slot when `user_token` (default: `soft_prompt.user_token`)."""
    cfg = rerank.model_copy(update={"template": soft.template, "max_title_tokens": soft.max_title_tokens,
                                    "max_history_titles": soft.max_history_titles})
    return PromptBuilder(backend, catalog, cfg, item_tokens=True, user_token=soft.user_token if user_token is None else user_token)


def _zscore(values: np.ndarray) -> np.ndarray:
    std = values.std()
    return (values - values.mean()) / std if std > 0 else np.zeros_like(values)


def fuse(retrieval_scores: np.ndarray, llm_scores: np.ndarray, weight: float) -> np.ndarray:
    """`weight · z(llm) + (1 − weight) · z(retrieval)`, each standardised within the list."""
    return weight * _zscore(np.asarray(llm_scores, dtype=np.float64)) + (1 - weight) * _zscore(np.asarray(retrieval_scores, dtype=np.float64))


def order_by(scores: np.ndarray) -> np.ndarray:
    """Indices best first; ties keep retrieval order (never the target's favour: retrieval order is fixed beforehand)."""
    return np.lexsort((np.arange(len(scores)), -np.asarray(scores)))


def _ranked(request: RerankRequest, labels: Sequence[str], llm: np.ndarray, weight: float) -> list[RankedItem]:
    retrieval = np.array([c.score for c in request.candidates], dtype=np.float64)
    fused = fuse(retrieval, llm, weight)
    return [
        RankedItem(request.candidates[i].item, labels[i], int(i), float(retrieval[i]), float(llm[i]), float(fused[i]))
        for i in order_by(fused)
    ]


class VerbalizerReranker(Reranker):
    """Ranks all candidates from one forward pass (label log-probs), fused with retrieval scores.

    Args:
        backend: the LLM backend.
        builder: prompt rendering and fitting.
        fusion_weight: weight of the LLM score (1 = LLM only, 0 = retrieval order).
        soft_prompt: optional `(m, hidden)` trained soft prompt.
    """

    def __init__(
        self, backend: LLMBackend, builder: PromptBuilder, *, fusion_weight: float = 1.0, soft_prompt: torch.Tensor | None = None,
        item_tokens: Callable[[Sequence[RerankRequest]], list[torch.Tensor]] | None = None,
    ) -> None:
        self.backend = backend
        self.builder = builder
        self.fusion_weight = fusion_weight
        self.soft_prompt = soft_prompt
        self.item_tokens = item_tokens
        """Maps requests to their `(slots, hidden)` embedding tokens, in slot order: the user token (with
        `builder.user_token`), then one per candidate (the trained projectors); needs `builder.item_tokens`."""

    def llm_scores(self, requests: Sequence[RerankRequest]) -> list[np.ndarray]:
        """Per request, `(n_candidates,)` label log-probabilities; requests are grouped by candidate count."""
        out: list[np.ndarray | None] = [None] * len(requests)
        groups: dict[int, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(len(request.candidates), []).append(i)
        for n, members in groups.items():
            labels = self.builder.labels(n)
            messages = [self.builder.build(requests[i], self.builder.cfg.template) for i in members]
            tokens = None
            if self.item_tokens is not None:
                tokens = self.item_tokens([requests[i] for i in members])
            scores = self.backend.score_labels(messages, labels, soft_prompt=self.soft_prompt, item_tokens=tokens)
            for row, i in enumerate(members):
                out[i] = scores[row]
        return out  # type: ignore[return-value]

    def rerank_batch(self, requests: Sequence[RerankRequest]) -> list[list[RankedItem]]:
        results = []
        for request, llm in zip(requests, self.llm_scores(requests), strict=True):
            results.append(_ranked(request, self.builder.labels(len(request.candidates)), llm, self.fusion_weight))
        return results


_LABEL = re.compile(r"(?<![A-Za-z'’])([A-Za-z])(?![A-Za-z'’])")
_BRACKETED = re.compile(r"[(\[]([A-Za-z])[)\]]")


def parse_ranking(text: str, labels: Sequence[str]) -> tuple[list[int], dict[str, int]]:
    """Candidate indices in the order a generated ranking names them.

    Duplicates keep their first mention, letters that are not labels are ignored, and labels the
    text never mentions are appended in retrieval order.

    Returns:
        The full order, and counts of `duplicates`, `invented` and `missing` labels.
    """
    index = {label: i for i, label in enumerate(labels)}
    order, seen = [], set()
    stats = {"duplicates": 0, "invented": 0, "missing": 0}
    # "(C) Heat (1995)" lines: only bracketed letters count, so the "A" in a title is not a label.
    pattern = _BRACKETED if _BRACKETED.search(text) else _LABEL
    for match in pattern.finditer(text):
        label = match.group(1)
        if label not in index:
            stats["invented"] += label.isupper()
            continue
        if label in seen:
            stats["duplicates"] += 1
            continue
        seen.add(label)
        order.append(index[label])
    missing = [i for i in range(len(labels)) if labels[i] not in seen]
    stats["missing"] = len(missing)
    return order + missing, stats


class ListwiseReranker(Reranker):
    """Baseline: the LLM writes the ranking (LLMRank); parsing is robust to malformed output.

    `listwise.v1` asks for letters only; `listwise.v2` (LLMRank's output) for one "(X) title" line
    per candidate, which costs about ten tokens per candidate to generate.
    """

    def __init__(self, backend: LLMBackend, builder: PromptBuilder, *, max_tokens: int | None = None) -> None:
        self.backend = backend
        self.builder = builder
        self.max_tokens = max_tokens

    def _budget(self, request: RerankRequest) -> int:
        if self.max_tokens:
            return self.max_tokens
        if self.builder.cfg.listwise_template == "listwise.v1":
            return 3 * len(request.candidates) + 4
        control = self.backend.control_tokens()
        return sum(self.backend.count_tokens(prompts.inert(f"({c}) {self.builder.catalog.label(x.item)}\n", control)) for c, x in
                   zip(self.builder.labels(len(request.candidates)), request.candidates, strict=True)) + 8

    def rerank_batch(self, requests: Sequence[RerankRequest]) -> list[list[RankedItem]]:
        budgets = [self._budget(r) for r in requests]
        messages = [self.builder.build(r, self.builder.cfg.listwise_template, reserve=b) for r, b in zip(requests, budgets, strict=True)]
        texts = self.backend.generate(messages, max_tokens=max(budgets))
        results = []
        for request, text in zip(requests, texts, strict=True):
            labels = self.builder.labels(len(request.candidates))
            order, _ = parse_ranking(text, labels)
            position = np.empty(len(order))
            position[order] = np.arange(len(order))
            results.append(_ranked(request, labels, -position, 1.0))
        return results


def explain(backend: LLMBackend, profile: str, titles: Sequence[str], cfg: RerankConfig) -> str:
    """A short generated note on why `titles` suit the user."""
    messages = prompts.render_chat(cfg.explain_template, control_tokens=backend.control_tokens(), profile=profile, picks=list(titles))
    return backend.generate([messages], max_tokens=cfg.explain_max_tokens)[0]


def choose_fusion_weight(
    requests: Sequence[RerankRequest], llm: Sequence[np.ndarray], targets: Sequence[int], grid: Sequence[float]
) -> tuple[float, dict[float, float]]:
    """The grid weight with the best mean NDCG@10 on these (validation) users; ties go to the smaller weight.

    Returns:
        The chosen weight and NDCG@10 for every weight tried.
    """
    table = {}
    for weight in grid:
        gains = []
        for request, scores, target in zip(requests, llm, targets, strict=True):
            items = [c.item for c in request.candidates]
            if target not in items:
                gains.append(0.0)
                continue
            fused = fuse(np.array([c.score for c in request.candidates]), scores, weight)
            rank = int(np.flatnonzero(order_by(fused) == items.index(target))[0])
            gains.append(1 / np.log2(rank + 2) if rank < 10 else 0.0)
        table[float(weight)] = float(np.mean(gains)) if gains else 0.0
    best = max(sorted(table), key=lambda w: (table[w], -w))
    return best, table
