"""The trainable retrieval tower: item embeddings and a SASRec-style causal self-attention encoder
over the recent history that produces the query.

Item side: the PCA projection of the frozen item-text embeddings plus a learned residual (the
foundation-model start), that projection alone (`tower.item_init=projection`: nothing per item is
learned or sent), or a random-init ID table (`tower.item_init=id`, the ablation). Inputs
are scaled by √dim, positions are learned, and the same item table scores the output (shared
input/output embedding). Training is full-softmax cross-entropy over the catalogue at every
position of local windows, with AdamW.

Attention is written out with `scaled_dot_product_attention` and an explicit mask in which every
position may attend to itself, so a left-padded row never has an empty softmax. Training (with
dropout 0) and inference run exactly the same code: PyTorch's `TransformerEncoder` fast path,
taken in eval mode under `no_grad`, returned NaN for left-padded histories.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from retrieval.config import TowerConfig
from retrieval.retriever import Candidate

PREFIX = "tower/"
ITEM_TABLE_KEYS = (f"{PREFIX}residual.weight", f"{PREFIX}items.weight")
"""The per-item table (text residual or ID embeddings): the one array whose rows belong to items."""


def text_basis(text_vectors: np.ndarray, dim: int) -> np.ndarray:
    """`(text_dim, dim)` top principal directions of the item texts (the untrained tower starts from the text geometry).

    Computed once per run for the initial state; a client loading a state never needs it.
    """
    vectors = np.asarray(text_vectors, dtype=np.float64)
    centred = vectors - vectors.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    basis = vt[:dim].T
    if basis.shape[1] < dim:
        basis = np.pad(basis, ((0, 0), (0, dim - basis.shape[1])))
    return basis.astype(np.float32)


def attention_mask(padded: torch.Tensor) -> torch.Tensor:
    """`(b, 1, L, L)` boolean mask, True where query position i may attend to key j.

    Causal (j ≤ i), keys that are padding are hidden, and the diagonal is always open so that a
    padding query (whose keys are all padding) still has one finite softmax entry. Real positions
    never see padding, so what padding computes cannot reach them.
    """
    length = padded.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=padded.device).tril()
    diagonal = torch.eye(length, dtype=torch.bool, device=padded.device)
    return ((causal & ~padded[:, None, :]) | diagonal)[:, None]


class CausalBlock(nn.Module):
    """Pre-norm self-attention + feed-forward block."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`(b, L, dim)` → `(b, L, dim)`; `mask` from `attention_mask`."""
        b, length, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.out(attended.transpose(1, 2).reshape(b, length, dim)))
        return x + self.drop(self.ff(self.norm2(x)))


class RetrievalTower(nn.Module):
    """Item embeddings and history encoder. Build with `create` (a fresh state) or `from_arrays` (a trained one).

    Args:
        text_vectors: `(n_items, text_dim)` frozen item-text embeddings (read unless `item_init=id`).
        cfg: shape and recipe.
        seed: initialisation seed.
        basis: `(text_dim, dim)` starting projection (`text_basis`); None leaves the default init.
    """

    def __init__(self, text_vectors: np.ndarray, cfg: TowerConfig, *, seed: int = 0, basis: np.ndarray | None = None) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        n_items, text_dim = np.shape(text_vectors)
        self.cfg = cfg
        self.n_items = n_items
        if cfg.item_init in ("text", "projection"):
            vectors = np.asarray(text_vectors, dtype=np.float32)
            vectors = vectors if vectors.flags.writeable else vectors.copy()  # read-only under Ray's object store
            self.register_buffer("text", torch.as_tensor(vectors), persistent=False)
            self.proj = nn.Linear(text_dim, cfg.dim, bias=False)
            with torch.no_grad():
                if basis is not None:
                    self.proj.weight.copy_(torch.as_tensor(basis).T)
            if cfg.item_init == "text":
                self.residual = nn.Embedding(n_items, cfg.dim)
                with torch.no_grad():
                    self.residual.weight.zero_()
        else:
            self.items = nn.Embedding(n_items, cfg.dim)
            with torch.no_grad():
                self.items.weight.normal_(0.0, 1.0 / math.sqrt(cfg.dim), generator=generator)
        self.position = nn.Embedding(cfg.max_len, cfg.dim)
        with torch.no_grad():
            self.position.weight.normal_(0.0, 0.02, generator=generator)
        self.embed_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(CausalBlock(cfg.dim, cfg.heads, cfg.dropout) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.dim)

    @classmethod
    def create(cls, text_vectors: np.ndarray, cfg: TowerConfig, *, seed: int = 0) -> RetrievalTower:
        """A fresh tower (text side projected onto the item texts' principal directions)."""
        basis = text_basis(text_vectors, cfg.dim) if cfg.item_init != "id" else None
        return cls(text_vectors, cfg, seed=seed, basis=basis)

    @classmethod
    def from_arrays(cls, text_vectors: np.ndarray, cfg: TowerConfig, arrays: dict[str, np.ndarray]) -> RetrievalTower:
        """A tower holding `arrays` (names as in `state_arrays`), in eval mode."""
        tower = cls(text_vectors, cfg)
        tower.load_arrays(arrays)
        return tower.eval()

    @property
    def pad(self) -> int:
        return self.n_items

    def item_embeddings(self) -> torch.Tensor:
        """`(n_items, dim)` item vectors: the output table, and what the FAISS index holds."""
        if self.cfg.item_init == "text":
            return self.proj(self.text) + self.residual.weight
        if self.cfg.item_init == "projection":
            return self.proj(self.text)
        return self.items.weight

    def sequence_states(self, items: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        """`(b, L, dim)` encoder output for left-padded item index sequences `(b, L)` (padding = `self.pad`).

        `table`: the `(n_items, dim)` item embeddings when the caller already has them.
        """
        table = self.item_embeddings() if table is None else table
        table = torch.cat([table, torch.zeros(1, self.cfg.dim, device=items.device)])
        padded = items == self.pad
        x = table[items] * math.sqrt(self.cfg.dim) + self.position.weight[-items.shape[1] :]
        x = self.embed_drop(x)
        mask = attention_mask(padded)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    def _trim(self, *batches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Drop the leading columns that are padding in every row (positions count from the right and padding never
        reaches real positions, so the result is unchanged; short histories cost less)."""
        real = (batches[0] != self.pad).any(dim=0)
        start = int(torch.argmax(real.int())) if bool(real.any()) else batches[0].shape[1] - 1
        return tuple(b[:, start:] for b in batches)

    def pad_histories(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        """Left-pad the last `max_len` items of each history into a `(b, max_len)` tensor."""
        out = torch.full((len(histories), self.cfg.max_len), self.pad, dtype=torch.long)
        for row, history in enumerate(histories):
            recent = np.asarray(history, dtype=np.int64)[-self.cfg.max_len :]
            if len(recent):
                out[row, -len(recent) :] = torch.tensor(recent)
        return out

    def query(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        """`(b, dim)` query vectors: the encoder state at each history's last position."""
        (items,) = self._trim(self.pad_histories(histories))
        return self.sequence_states(items)[:, -1]

    @torch.no_grad()
    def encode(self, histories: Sequence[Sequence[int]], batch_size: int = 512) -> np.ndarray:
        """`(b, dim)` float32 query vectors, in eval mode (no dropout), batched."""
        training = self.training
        self.eval()
        try:
            parts = [self.query(histories[i : i + batch_size]) for i in range(0, len(histories), batch_size)]
        finally:
            self.train(training)
        return torch.cat(parts).numpy().astype(np.float32) if parts else np.zeros((0, self.cfg.dim), np.float32)

    @torch.no_grad()
    def item_matrix(self) -> np.ndarray:
        """`(n_items, dim)` float32 item embeddings."""
        return self.item_embeddings().numpy().astype(np.float32)

    def top_candidates(self, histories: Sequence[Sequence[int]], n: int) -> tuple[torch.Tensor, list[list[Candidate]]]:
        """Item embeddings `(n_items, dim)` and, per history, its `n` best-scoring unseen items (no gradient, no dropout);
        fewer when the history leaves fewer than `n` unseen."""
        queries = torch.as_tensor(self.encode(histories))
        items = torch.as_tensor(self.item_matrix())
        scores = queries @ items.T
        out = []
        for row, history in enumerate(histories):
            ranked = scores[row].clone()
            ranked[torch.tensor(np.asarray(history, dtype=np.int64))] = -torch.inf
            top = torch.topk(ranked, min(n, int(torch.isfinite(ranked).sum())))
            out.append([Candidate(int(i), float(v)) for i, v in zip(top.indices.tolist(), top.values.tolist(), strict=True)])
        return items, out

    def loss(self, windows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the whole catalogue at every position with a target.

        Args:
            windows: `(b, L)` left-padded inputs.
            targets: `(b, L)` next items (pad where there is none).
        """
        windows, targets = self._trim(windows, targets)
        table = self.item_embeddings()
        states = self.sequence_states(windows, table)
        mask = targets != self.pad
        return F.cross_entropy(states[mask] @ table.T, targets[mask])

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Trainable parameters as named float32 arrays (what travels)."""
        return {f"{PREFIX}{k}": v.detach().cpu().numpy().astype(np.float32).copy() for k, v in self.named_parameters()}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Set parameters from `state_arrays`-style names; a missing name or another shape is a ValueError that says so."""
        params = dict(self.named_parameters())
        missing = [k for k in params if f"{PREFIX}{k}" not in arrays]
        if missing:
            raise ValueError(f"tower state lacks {missing[:3]}: it was saved by a tower of another shape (tower.item_init / tower.layers?)")
        extra = [k for k in arrays if k.startswith(PREFIX) and k[len(PREFIX):] not in params]
        if extra:
            raise ValueError(f"tower state has {extra[:3]}, which this tower lacks: it was saved by a tower of another shape "
                             "(tower.item_init / tower.layers?)")
        for k, p in params.items():
            shape = tuple(np.shape(arrays[f"{PREFIX}{k}"]))
            if shape != tuple(p.shape):
                raise ValueError(f"tower state {PREFIX}{k} has shape {shape}, this tower expects {tuple(p.shape)} "
                                 f"(tower.dim / tower.max_len or the catalogue differ)")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(torch.as_tensor(np.asarray(arrays[f"{PREFIX}{k}"])))


def sliding_windows(histories: Sequence[np.ndarray], max_len: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training windows: each history cut from its end into chunks of `max_len + 1`, as (inputs, next-item targets)."""
    inputs, targets = [], []
    for seq in histories:
        seq = np.asarray(seq)
        if len(seq) < 2:
            continue
        for end in range(len(seq), 1, -max_len):
            chunk = seq[max(0, end - max_len - 1) : end]
            x, y = chunk[:-1], chunk[1:]
            inputs.append(np.concatenate([np.full(max_len - len(x), pad), x]))
            targets.append(np.concatenate([np.full(max_len - len(y), pad), y]))
    if not inputs:
        return torch.zeros(0, max_len, dtype=torch.long), torch.zeros(0, max_len, dtype=torch.long)
    return torch.as_tensor(np.stack(inputs), dtype=torch.long), torch.as_tensor(np.stack(targets), dtype=torch.long)


class TowerTrainer:
    """AdamW over a tower's local windows, in epochs or in a fixed number of steps.

    The optimiser lives as long as the trainer, so a centralized fit keeps its moments across
    epochs; a federated client builds one per round.
    """

    def __init__(self, tower: RetrievalTower, histories: Sequence[np.ndarray], *, prox_mu: float = 0.0, seed: int = 0) -> None:
        self.tower = tower
        self.windows, self.targets = sliding_windows(histories, tower.cfg.max_len, tower.pad)
        self.optimizer = torch.optim.AdamW(tower.parameters(), lr=tower.cfg.lr, weight_decay=tower.cfg.weight_decay)
        self.generator = torch.Generator().manual_seed(seed)
        self.anchor = [p.detach().clone() for p in tower.parameters()] if prox_mu > 0 else None
        self.prox_mu = prox_mu

    @property
    def examples(self) -> int:
        return int(len(self.windows))

    def _batches(self) -> Any:
        size = self.tower.cfg.batch_size
        while True:
            order = torch.randperm(len(self.windows), generator=self.generator)
            for start in range(0, len(order), size):
                yield order[start : start + size]

    def run(self, *, epochs: int = 1, steps: int | None = None) -> dict[str, float]:
        """Train in place for `steps` optimiser steps, or else `epochs` passes; returns mean `loss` and `examples`."""
        if not self.examples:
            return {"loss": float("nan"), "examples": 0, "steps": 0}
        per_epoch = math.ceil(self.examples / self.tower.cfg.batch_size)
        total = steps if steps is not None else epochs * per_epoch
        self.tower.train()
        losses = []
        batches = self._batches()
        for _ in range(total):
            idx = next(batches)
            loss = self.tower.loss(self.windows[idx], self.targets[idx])
            if self.anchor is not None:
                loss = loss + self.prox_mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(self.tower.parameters(), self.anchor, strict=True))
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            losses.append(loss.item())
        self.tower.eval()
        return {"loss": float(np.mean(losses)), "examples": self.examples, "steps": total}


def train_tower(tower: RetrievalTower, histories: Sequence[np.ndarray], *, epochs: int = 1, steps: int | None = None,
                prox_mu: float = 0.0, seed: int = 0) -> dict[str, float]:
    """Train in place on local histories (one optimiser for the whole call); see `TowerTrainer.run`."""
    return TowerTrainer(tower, histories, prox_mu=prox_mu, seed=seed).run(epochs=epochs, steps=steps)


def fit_tower(tower: RetrievalTower, histories: Sequence[np.ndarray], validate: Callable[[RetrievalTower], float], *,
              max_epochs: int, patience: int, seed: int = 0,
              on_epoch: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Centralized training with model selection: one epoch at a time, `validate` after each (higher is better),
    the best epoch's weights restored at the end, stopping after `patience` epochs without improvement.

    Returns:
        `best_epoch`, `best_valid`, `epochs` run and the per-epoch `history` (loss, valid).
    """
    trainer = TowerTrainer(tower, histories, seed=seed)
    best, best_epoch, best_state, history = -math.inf, 0, copy.deepcopy(tower.state_dict()), []
    for epoch in range(1, max_epochs + 1):
        stats = trainer.run(epochs=1)
        valid = float(validate(tower))
        row = {"epoch": epoch, "loss": stats["loss"], "valid": valid}
        history.append(row)
        if on_epoch is not None:
            on_epoch(epoch, row)
        if valid > best:
            best, best_epoch, best_state = valid, epoch, copy.deepcopy(tower.state_dict())
        elif epoch - best_epoch >= patience:
            break
    tower.load_state_dict(best_state)
    tower.eval()
    return {"best_epoch": best_epoch, "best_valid": best, "epochs": len(history), "history": history}
