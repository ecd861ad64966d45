"""Soft-prompt tuning with collaborative item tokens (LlaRA/CoLLM-style), the LLM frozen.

A measurement on SmolLM2-135M (docs/DESIGN.md) showed that a text-only soft prompt stays at chance as
a reranker, so the collaborative signal reaches the LLM as one projected retrieval-tower item
embedding per candidate, placed right after its title (`rerank.v2`). The trainable module is the
soft prompt `(m, hidden)` and the projector `tower_dim → hidden`; both are federated as named
arrays. The loss is the cross-entropy of the target's label among the candidate labels at the
answer position, from fp32 logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.llm.base import Messages
from pipeline.llm.transformers_backend import TransformersBackend
from pipeline.rerank import PromptBuilder, RerankRequest
from retrieval import Candidate


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
                 personal: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        start = init.float().clone() if init is not None else torch.randn(n_tokens, hidden, generator=generator) * 0.02
        self.prompt = nn.Parameter(start)
        self.projector = nn.Linear(item_dim, hidden)
        with torch.no_grad():
            self.projector.weight.normal_(0, 0.02, generator=generator)
            self.projector.bias.zero_()
        self.personal = nn.Parameter(torch.randn(personal, hidden, generator=generator) * 0.02) if personal else None

    def full_prompt(self) -> torch.Tensor:
        """`(personal + m, hidden)`: the personal tokens (if any), then the shared soft prompt."""
        return self.prompt if self.personal is None else torch.cat([self.personal, self.prompt])

    def item_tokens(self, vectors: torch.Tensor) -> torch.Tensor:
        """`(n, hidden)` item tokens from `(n, item_dim)` item vectors."""
        return self.projector(vectors.float())

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


def make_examples(
    builder: PromptBuilder, requests: Sequence[RerankRequest], targets: Sequence[int], *, seed: int = 0
) -> list[Example]:
    """LlamaRec-style examples: the retriever's candidates, with the positive put in at a random slot when missed."""
    rng = np.random.default_rng(seed)
    examples = []
    for request, target in zip(requests, targets, strict=True):
        items = [c.item for c in request.candidates]
        if target not in items:
            items[int(rng.integers(len(items)))] = int(target)
        candidates = tuple(Candidate(i, 0.0) for i in items)
        messages = builder.build(RerankRequest(request.profile, request.history, candidates), builder.cfg.template)
        examples.append(Example(messages, tuple(items), items.index(int(target))))
    return examples


def train_soft_prompt(
    module: SoftPrompt, backend: TransformersBackend, examples: Sequence[Example], item_vectors: torch.Tensor, labels: Sequence[str],
    *, epochs: int = 1, batch_size: int = 8, lr: float = 1e-2, seed: int = 0,
) -> dict[str, float]:
    """Train the soft prompt and projector in place; the LLM stays frozen.

    Returns:
        `loss_first` (first batch), `loss` (mean over the last epoch) and `examples`.
    """
    label_ids = backend.label_ids(labels)
    encoded = [backend.encode(e.messages, with_slot=True) for e in examples]
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    first, losses = float("nan"), []
    for _ in range(epochs):
        losses = []
        for batch in torch.randperm(len(examples), generator=generator).split(batch_size):
            tokens = [module.item_tokens(item_vectors[list(examples[i].items)]) for i in batch.tolist()]
            hidden = backend.last_hidden([encoded[i] for i in batch.tolist()], module.full_prompt(), tokens)
            logits = backend.label_logits(hidden, label_ids)
            target = torch.tensor([examples[i].target for i in batch.tolist()])
            loss = nn.functional.cross_entropy(logits, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            first = losses[0] if np.isnan(first) else first
    return {"loss_first": first, "loss": float(np.mean(losses)) if losses else float("nan"), "examples": len(examples)}


def accuracy(module: SoftPrompt, backend: TransformersBackend, examples: Sequence[Example], item_vectors: torch.Tensor,
             labels: Sequence[str]) -> float:
    """HR@1: how often the target's label scores highest."""
    with torch.no_grad():
        tokens = [module.item_tokens(item_vectors[list(e.items)]) for e in examples]
        scores = backend.score_labels([e.messages for e in examples], labels, soft_prompt=module.full_prompt().detach(), item_tokens=tokens)
    return float(np.mean(scores.argmax(axis=1) == np.array([e.target for e in examples])))
