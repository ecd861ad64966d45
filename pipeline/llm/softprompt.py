"""Soft-prompt tuning with collaborative user and item tokens (LlaRA/CoLLM-style), the LLM frozen.

A measurement on SmolLM2-135M (docs/DESIGN.md) showed that a text-only soft prompt stays at chance as
a reranker, so the collaborative signal reaches the LLM as projected retrieval-tower vectors: one
item token per candidate (after its letter in `rerank.v6`, after its title in `rerank.v4`), and
(`user_token`) one user token, the tower's query vector for the history, projected the same way. The trainable module is the
soft prompt `(m, hidden)`, the item projector and the user projector (`tower_dim → hidden`); all are
federated as named arrays. The loss is the cross-entropy of the target's label among the candidate
labels at the answer position, from fp32 logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from pipeline.llm.base import Messages
from pipeline.llm.transformers_backend import TransformersBackend
from pipeline.rerank import PromptBuilder, RerankRequest
from retrieval import Candidate

if TYPE_CHECKING:
    from retrieval.tower import RetrievalTower


class SoftPrompt(nn.Module):
    """`m` virtual tokens and a projector from item vectors to the LLM's input space.

    Args:
        n_tokens: virtual tokens in the soft prompt (0 = item tokens only).
        hidden: the LLM's hidden size.
        item_dim: width of the item vectors the projector reads.
        init: `(n_tokens, hidden)` starting embeddings (e.g. of a text prompt); small noise otherwise.
        personal: personal virtual tokens put before the shared ones. They are trained with the rest but
            are not in `state_arrays` (what travels): `personal_arrays` / `load_personal` keep them on the client.
    """

    def __init__(self, n_tokens: int, hidden: int, item_dim: int, *, init: torch.Tensor | None = None, seed: int = 0,
                 personal: int = 0, user_token: bool = False) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        start = init.float().clone() if init is not None else torch.randn(n_tokens, hidden, generator=generator) * 0.02
        self.prompt = nn.Parameter(start)
        self.projector = nn.Linear(item_dim, hidden)
        self.user_projector = nn.Linear(item_dim, hidden) if user_token else None
        with torch.no_grad():
            for layer in (self.projector, self.user_projector):
                if layer is not None:
                    layer.weight.normal_(0, 0.02, generator=generator)
                    layer.bias.zero_()
        self.personal = nn.Parameter(torch.randn(personal, hidden, generator=generator) * 0.02) if personal else None

    @staticmethod
    def has_user_token(arrays: dict[str, np.ndarray]) -> bool:
        """Whether saved `state_arrays` hold a user projector."""
        return "soft/user_projector.weight" in arrays

    def full_prompt(self) -> torch.Tensor:
        """`(personal + m, hidden)`: the personal tokens (if any), then the shared soft prompt."""
        return self.prompt if self.personal is None else torch.cat([self.personal, self.prompt])

    def item_tokens(self, vectors: torch.Tensor) -> torch.Tensor:
        """`(n, hidden)` item tokens from `(n, item_dim)` item vectors."""
        return self.projector(vectors.float())

    def slot_tokens(self, item_vectors: torch.Tensor, user_vector: torch.Tensor | None = None) -> torch.Tensor:
        """`(slots, hidden)` tokens in a prompt's slot order: the user token (when the module has a user projector), then the items."""
        items = self.item_tokens(item_vectors)
        if self.user_projector is None:
            return items
        if user_vector is None:
            raise ValueError("this soft prompt has a user projector: pass the tower's query vector for the user")
        return torch.cat([self.user_projector(user_vector.float().reshape(1, -1)), items])

    def _shared(self) -> dict[str, nn.Parameter]:
        return {k: v for k, v in self.named_parameters() if k != "personal"}

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The shared arrays (what a client sends); personal tokens are never among them."""
        return {f"soft/{k}": v.detach().cpu().numpy().astype(np.float32).copy() for k, v in self._shared().items()}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        with torch.no_grad():
            for k, p in self._shared().items():
                p.copy_(torch.as_tensor(arrays[f"soft/{k}"]))

    def personal_arrays(self) -> dict[str, np.ndarray]:
        """The client-only personal tokens (empty without them)."""
        return {} if self.personal is None else {"personal/tokens": self.personal.detach().cpu().numpy().astype(np.float32).copy()}

    def load_personal(self, arrays: dict[str, np.ndarray]) -> None:
        if self.personal is None or "personal/tokens" not in arrays:
            return
        tokens = np.asarray(arrays["personal/tokens"])
        if tokens.shape != tuple(self.personal.shape):
            raise ValueError(f"saved personal tokens have shape {tokens.shape}, expected {tuple(self.personal.shape)} "
                             "(soft_prompt.personal_tokens changed?)")
        with torch.no_grad():
            self.personal.copy_(torch.as_tensor(tokens))


@dataclass(frozen=True)
class Example:
    """One training prompt: the candidates (target inserted if the retriever missed it) and the target's position."""

    messages: Messages
    items: tuple[int, ...]
    target: int
    user: np.ndarray | None = None
    """The tower's `(dim,)` query vector for the history before the target (for the user token)."""


def make_examples(
    builder: PromptBuilder, requests: Sequence[RerankRequest], targets: Sequence[int], *, seed: int = 0,
    users: np.ndarray | None = None,
) -> list[Example]:
    """LlamaRec-style examples: the retriever's candidates, with the positive put in at a random slot when missed.

    `users`: `(len(requests), dim)` tower query vectors, one per request (for the user token).
    """
    rng = np.random.default_rng(seed)
    examples = []
    for row, (request, target) in enumerate(zip(requests, targets, strict=True)):
        items = [c.item for c in request.candidates]
        if target not in items:
            items[int(rng.integers(len(items)))] = int(target)
        candidates = tuple(Candidate(i, 0.0) for i in items)
        messages = builder.build(RerankRequest(request.profile, request.history, candidates), builder.cfg.template)
        examples.append(Example(messages, tuple(items), items.index(int(target)), None if users is None else users[row]))
    return examples


def position_examples(
    builder: PromptBuilder, tower: RetrievalTower, histories: Sequence[np.ndarray], profile: Callable[[int, int], str], *,
    positions: int, n: int, seed: int = 0,
) -> list[Example]:
    """Examples from the last `positions` places of each history: the history before place p → the tower's top `n`
    unseen items for it → the item at p (inserted when missed). `profile(i, p)` is the text profile of history i's
    first p items. Histories too short for a place are skipped there (each example keeps at least one history item)."""
    cut = [(i, len(h) - back) for i, h in enumerate(histories) for back in range(1, positions + 1) if len(h) - back >= 1]
    if not cut:
        return []
    prefixes = [histories[i][:p] for i, p in cut]
    _, found = tower.top_candidates(prefixes, n)
    queries = tower.encode(prefixes)
    requests = [RerankRequest(profile(i, p), tuple(h.tolist()), tuple(c)) for (i, p), h, c in zip(cut, prefixes, found, strict=True)]
    return make_examples(builder, requests, [int(histories[i][p]) for i, p in cut], seed=seed, users=queries)


def _batch_tokens(module: SoftPrompt, item_vectors: torch.Tensor, examples: Sequence[Example]) -> list[torch.Tensor]:
    return [module.slot_tokens(item_vectors[list(e.items)], None if e.user is None else torch.as_tensor(e.user)) for e in examples]


def example_loss(module: SoftPrompt, backend: TransformersBackend, examples: Sequence[Example], item_vectors: torch.Tensor,
                 labels: Sequence[str], *, batch_size: int = 8) -> float:
    """Mean cross-entropy of the targets' labels over `examples` (no gradient): the validation loss, against ln(n) at chance."""
    label_ids = backend.label_ids(labels)
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            hidden = backend.last_hidden([backend.encode(e.messages, with_slot=True) for e in chunk], module.full_prompt(),
                                         _batch_tokens(module, item_vectors, chunk))
            logits = backend.label_logits(hidden, label_ids)
            total += nn.functional.cross_entropy(logits, torch.tensor([e.target for e in chunk]), reduction="sum").item()
    return total / max(len(examples), 1)


def train_soft_prompt(
    module: SoftPrompt, backend: TransformersBackend, examples: Sequence[Example], item_vectors: torch.Tensor, labels: Sequence[str],
    *, epochs: int = 1, batch_size: int = 8, lr: float = 1e-2, seed: int = 0, valid: Sequence[Example] = (),
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Train the soft prompt and projectors in place; the LLM stays frozen.

    With `valid` examples, the validation loss is measured after every epoch and the module ends with the
    state of the epoch where it was lowest.

    Returns:
        `loss_first` (first batch), `loss` (mean over the last epoch), `examples`, `curve` (per epoch: mean
        train loss and, with `valid`, validation loss), `best_epoch` (1-based; the last one without `valid`).
    """
    label_ids = backend.label_ids(labels)
    encoded = [backend.encode(e.messages, with_slot=True) for e in examples]
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    first, losses, curve = float("nan"), [], []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    steps = epochs * -(-len(examples) // batch_size)
    for epoch in range(epochs):
        losses = []
        for batch in torch.randperm(len(examples), generator=generator).split(batch_size):
            chunk = [examples[i] for i in batch.tolist()]
            hidden = backend.last_hidden([encoded[i] for i in batch.tolist()], module.full_prompt(), _batch_tokens(module, item_vectors, chunk))
            logits = backend.label_logits(hidden, label_ids)
            loss = nn.functional.cross_entropy(logits, torch.tensor([e.target for e in chunk]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            first = losses[0] if np.isnan(first) else first
            if progress is not None:
                progress(epoch * -(-len(examples) // batch_size) + len(losses), steps)
        point: dict[str, float] = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)) if losses else float("nan")}
        if valid:
            point["valid_loss"] = example_loss(module, backend, valid, item_vectors, labels, batch_size=batch_size)
            if best is None or point["valid_loss"] < best[0]:
                best = (point["valid_loss"], epoch + 1, {k: v.detach().clone() for k, v in module.state_dict().items()})
        curve.append(point)
    best_epoch = epochs
    if best is not None:
        module.load_state_dict(best[2])
        best_epoch = best[1]
    return {"loss_first": first, "loss": float(np.mean(losses)) if losses else float("nan"), "examples": len(examples),
            "curve": curve, "best_epoch": best_epoch}


def accuracy(module: SoftPrompt, backend: TransformersBackend, examples: Sequence[Example], item_vectors: torch.Tensor,
             labels: Sequence[str]) -> float:
    """HR@1: how often the target's label scores highest."""
    with torch.no_grad():
        tokens = _batch_tokens(module, item_vectors, examples)
        scores = backend.score_labels([e.messages for e in examples], labels, soft_prompt=module.full_prompt().detach(), item_tokens=tokens)
    return float(np.mean(scores.argmax(axis=1) == np.array([e.target for e in examples])))
