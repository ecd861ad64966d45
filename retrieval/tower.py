"""The trainable retrieval tower: item embeddings from item text plus a learned residual, and a
SASRec-style causal self-attention encoder over the recent history that produces the query.

Trained with a softmax over the whole catalogue on local sliding windows (next-item prediction
at every position). Its parameters, as named arrays, are what clients send as updates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from retrieval.retriever import Candidate


@dataclass(frozen=True)
class TowerConfig:
    """Shape of the tower."""

    dim: int = 64
    max_len: int = 50
    layers: int = 2
    heads: int = 2
    dropout: float = 0.1


def _pca(vectors: np.ndarray, dim: int) -> np.ndarray:
    """`(in_dim, dim)` top principal directions (so the untrained tower starts from the text geometry)."""
    centred = vectors - vectors.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    basis = vt[:dim].T
    if basis.shape[1] < dim:
        basis = np.pad(basis, ((0, 0), (0, dim - basis.shape[1])))
    return basis.astype(np.float32)


class RetrievalTower(nn.Module):
    """Item tower (text projection + residual) and history encoder.

    Args:
        text_vectors: `(n_items, text_dim)` item-text embeddings (frozen).
        cfg: tower shape.
    """

    def __init__(self, text_vectors: np.ndarray, cfg: TowerConfig = TowerConfig(), seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        n_items, text_dim = text_vectors.shape
        self.cfg = cfg
        self.n_items = n_items
        self.register_buffer("text", torch.as_tensor(np.asarray(text_vectors, dtype=np.float32)), persistent=False)
        self.proj = nn.Linear(text_dim, cfg.dim, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.as_tensor(_pca(np.asarray(text_vectors, dtype=np.float32), cfg.dim).T))
        self.residual = nn.Embedding(n_items + 1, cfg.dim, padding_idx=n_items)
        nn.init.zeros_(self.residual.weight)
        self.position = nn.Embedding(cfg.max_len, cfg.dim)
        nn.init.normal_(self.position.weight, std=0.02)
        layer = nn.TransformerEncoderLayer(cfg.dim, cfg.heads, cfg.dim * 2, cfg.dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.dim)

    @property
    def pad(self) -> int:
        return self.n_items

    def item_embeddings(self) -> torch.Tensor:
        """`(n_items, dim)` item vectors (the index is built from these)."""
        return self.proj(self.text) + self.residual.weight[: self.n_items]

    def _sequence_states(self, items: torch.Tensor) -> torch.Tensor:
        """`(b, L, dim)` causal encoder output for left-padded item index sequences `(b, L)`."""
        table = torch.cat([self.item_embeddings(), torch.zeros(1, self.cfg.dim, device=items.device)])
        x = table[items] + self.position(torch.arange(items.shape[1], device=items.device))
        causal = torch.triu(torch.ones(items.shape[1], items.shape[1], dtype=torch.bool, device=items.device), diagonal=1)
        padded = items == self.pad
        out = self.encoder(x, mask=causal, src_key_padding_mask=padded)
        return self.norm(torch.nan_to_num(out))

    def pad_histories(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        """Left-pad the last `max_len` items of each history into a `(b, max_len)` tensor."""
        out = torch.full((len(histories), self.cfg.max_len), self.pad, dtype=torch.long)
        for row, history in enumerate(histories):
            recent = list(history)[-self.cfg.max_len :]
            if recent:
                out[row, -len(recent) :] = torch.tensor(recent, dtype=torch.long)
        return out

    def query(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        """`(b, dim)` query vectors: the encoder state at each history's last position."""
        return self._sequence_states(self.pad_histories(histories))[:, -1]

    def top_candidates(self, histories: Sequence[Sequence[int]], n: int) -> tuple[torch.Tensor, list[list[Candidate]]]:
        """Item embeddings `(n_items, dim)` and, per history, its `n` best-scoring unseen items (no gradient, no dropout)."""
        training = self.training
        self.eval()
        with torch.no_grad():
            items = self.item_embeddings()
            scores = self.query(histories) @ items.T
        self.train(training)
        out = []
        for row, history in enumerate(histories):
            ranked = scores[row].clone()
            ranked[torch.as_tensor(np.array(history, dtype=np.int64))] = -torch.inf
            top = torch.topk(ranked, n)
            out.append([Candidate(int(i), float(v)) for i, v in zip(top.indices.tolist(), top.values.tolist(), strict=True)])
        return items, out

    def loss(self, windows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the catalogue at every non-padded position.

        Args:
            windows: `(b, L)` left-padded inputs.
            targets: `(b, L)` next items (pad where there is none).
        """
        states = self._sequence_states(windows)
        logits = states @ self.item_embeddings().T
        mask = targets != self.pad
        return nn.functional.cross_entropy(logits[mask], targets[mask])

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Trainable parameters as named float32 arrays (what travels)."""
        return {f"tower/{k}": v.detach().cpu().numpy().astype(np.float32).copy() for k, v in self.named_parameters()}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Set parameters from `state_arrays`-style names (missing names are an error)."""
        params = dict(self.named_parameters())
        missing = [k for k in params if f"tower/{k}" not in arrays]
        if missing:
            raise KeyError(f"tower state lacks {missing[:3]}")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(torch.as_tensor(arrays[f"tower/{k}"]))


def sliding_windows(histories: Sequence[np.ndarray], max_len: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training windows: each history cut into chunks of `max_len + 1`, as (inputs, next-item targets)."""
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


def train_tower(
    tower: RetrievalTower, histories: Sequence[np.ndarray], *, epochs: int = 1, batch_size: int = 64, lr: float = 1e-3,
    prox_mu: float = 0.0, seed: int = 0,
) -> dict[str, float]:
    """Train in place on local histories; with `prox_mu` > 0 a FedProx term pulls toward the starting weights.

    Returns:
        `loss` (mean over the last epoch) and `examples` (number of windows).
    """
    windows, targets = sliding_windows(histories, tower.cfg.max_len, tower.pad)
    if len(windows) == 0:
        return {"loss": float("nan"), "examples": 0}
    anchor = [p.detach().clone() for p in tower.parameters()] if prox_mu > 0 else None
    optimizer = torch.optim.Adam(tower.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    tower.train()
    losses: list[float] = []
    for _ in range(epochs):
        losses = []
        order = torch.randperm(len(windows), generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            loss = tower.loss(windows[idx], targets[idx])
            if anchor is not None:
                loss = loss + prox_mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(tower.parameters(), anchor, strict=True))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    tower.eval()
    return {"loss": float(np.mean(losses)), "examples": int(len(windows))}
