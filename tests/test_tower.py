"""The retrieval tower: training and inference compute the same function, queries depend on the history,
a trivial sequential task is learned, and the forward pass equals a plain reference implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from retrieval.config import TowerConfig
from retrieval.tower import RetrievalTower, TowerTrainer, fit_tower, sliding_windows


def _tower(n_items: int = 40, *, dim: int = 16, max_len: int = 10, layers: int = 2, heads: int = 2, dropout: float = 0.0,
           item_init: str = "text", seed: int = 0, **recipe: float) -> RetrievalTower:
    text = np.random.default_rng(seed).normal(size=(n_items, 24)).astype(np.float32)
    cfg = TowerConfig(dim=dim, max_len=max_len, layers=layers, heads=heads, dropout=dropout, item_init=item_init, **recipe)
    tower = RetrievalTower.create(text, cfg, seed=seed)
    with torch.no_grad():  # make every parameter non-trivial (the residual starts at zero)
        for p in tower.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    return tower


HISTORIES = [[3, 7, 1, 9, 2], list(range(10, 20)), [5], list(range(20, 35))]


@pytest.mark.parametrize("item_init", ["text", "projection", "id"])
def test_training_mode_and_inference_agree_for_padded_and_unpadded_histories(item_init: str) -> None:
    tower = _tower(item_init=item_init)
    padded = tower.pad_histories(HISTORIES)
    assert (padded[0] == tower.pad).sum() == 5 and (padded[1] != tower.pad).all()  # 5 items left-padded; 10 items fill max_len
    tower.train()
    train_states = tower.sequence_states(padded)
    tower.eval()
    with torch.no_grad():
        eval_states = tower.sequence_states(padded)
    assert torch.isfinite(eval_states).all()
    real = padded != tower.pad
    assert torch.allclose(train_states[real], eval_states[real], atol=1e-5)
    assert np.allclose(tower.encode(HISTORIES), train_states[:, -1].detach().numpy(), atol=1e-5)


def test_padding_never_changes_the_real_positions() -> None:
    tower = _tower(max_len=12).eval()
    short = torch.tensor([[3, 7, 1, 9, 2]])
    padded = tower.pad_histories([[3, 7, 1, 9, 2]])
    with torch.no_grad():
        alone = tower.sequence_states(short)[0]  # no padding at all (a window of 5)
        inside = tower.sequence_states(padded)[0, -5:]
    assert torch.allclose(alone, inside, atol=1e-5)


def test_different_histories_give_different_queries() -> None:
    tower = _tower(max_len=50).eval()
    histories = [[i, (i + 3) % 40] for i in range(30)] + [list(range(i, i + 7)) for i in range(10)]
    queries = tower.encode(histories)
    assert np.isfinite(queries).all()
    distances = np.linalg.norm(queries[:, None] - queries[None], axis=-1)
    assert distances[~np.eye(len(histories), dtype=bool)].min() > 1e-3
    assert len({tuple(np.round(q, 4)) for q in queries}) == len(histories)


def _reference_states(tower: RetrievalTower, items: torch.Tensor) -> torch.Tensor:
    """The same network written out by hand: explicit masked softmax attention, read off the tower's parameters."""
    cfg = tower.cfg
    table = torch.cat([tower.item_embeddings(), torch.zeros(1, cfg.dim)])
    length = items.shape[1]
    x = table[items] * math.sqrt(cfg.dim) + tower.position.weight[cfg.max_len - length :]
    pad = items == tower.pad
    allowed = torch.zeros(items.shape[0], length, length, dtype=torch.bool)
    for i in range(length):
        for j in range(i + 1):
            allowed[:, i, j] = ~pad[:, j]
        allowed[:, i, i] = True
    heads, head_dim = cfg.heads, cfg.dim // cfg.heads
    for block in tower.blocks:
        h = F.layer_norm(x, (cfg.dim,), block.norm1.weight, block.norm1.bias)
        q, k, v = (h @ block.qkv.weight.T + block.qkv.bias).split(cfg.dim, dim=-1)
        out = torch.zeros_like(x)
        for head in range(heads):
            cols = slice(head * head_dim, (head + 1) * head_dim)
            scores = q[..., cols] @ k[..., cols].transpose(1, 2) / math.sqrt(head_dim)
            scores = scores.masked_fill(~allowed, -torch.inf)
            out[..., cols] = torch.softmax(scores, dim=-1) @ v[..., cols]
        x = x + out @ block.out.weight.T + block.out.bias
        h = F.layer_norm(x, (cfg.dim,), block.norm2.weight, block.norm2.bias)
        first, last = block.ff[0], block.ff[3]
        x = x + F.gelu(h @ first.weight.T + first.bias) @ last.weight.T + last.bias
    return F.layer_norm(x, (cfg.dim,), tower.norm.weight, tower.norm.bias)


def test_tower_matches_a_plain_reference_implementation() -> None:
    tower = _tower(layers=2, heads=2).eval()
    padded = tower.pad_histories(HISTORIES)
    with torch.no_grad():
        ours = tower.sequence_states(padded)
        reference = _reference_states(tower, padded)
    assert torch.allclose(ours, reference, atol=1e-5), (ours - reference).abs().max()


def test_loss_is_full_softmax_cross_entropy_at_every_target_position() -> None:
    tower = _tower().eval()
    windows, targets = sliding_windows([np.array(h) for h in HISTORIES], tower.cfg.max_len, tower.pad)
    with torch.no_grad():
        states = tower.sequence_states(windows)
        logits = states @ tower.item_embeddings().T
        manual = []
        for b in range(len(windows)):
            for t in range(windows.shape[1]):
                if targets[b, t] != tower.pad:
                    manual.append(-torch.log_softmax(logits[b, t], -1)[targets[b, t]])
        assert torch.isclose(tower.loss(windows, targets), torch.stack(manual).mean(), atol=1e-5)


@pytest.mark.parametrize("item_init", ["text", "projection", "id"])
def test_a_trivial_sequential_task_is_learned(item_init: str) -> None:
    """Item i is always followed by i+1 (mod n): the next item of any history is learned at R@1 >= 0.95."""
    n = 30
    rng = np.random.default_rng(0)
    starts = rng.integers(0, n, size=200)
    histories = [np.array([(s + j) % n for j in range(int(rng.integers(3, 12)))]) for s in starts]
    tower = RetrievalTower.create(rng.normal(size=(n, 24)).astype(np.float32),
                                  TowerConfig(dim=32, max_len=12, layers=1, heads=1, dropout=0.0, item_init=item_init, lr=1e-2, batch_size=32),
                                  seed=0)
    TowerTrainer(tower, histories, seed=0).run(epochs=30)
    probe = [[(s + j) % n for j in range(int(length))] for s, length in zip(rng.integers(0, n, 100), rng.integers(1, 10, 100), strict=True)]
    scores = tower.encode(probe) @ tower.item_matrix().T
    hits = np.mean([int(np.argmax(s)) == (h[-1] + 1) % n for s, h in zip(scores, probe, strict=True)])
    assert hits >= 0.95


def test_fit_tower_restores_the_best_epoch_and_stops_with_patience() -> None:
    tower = _tower(dropout=0.0, lr=1e-2)
    histories = [np.array(h) for h in HISTORIES]
    snapshots, curve = [], iter([0.1, 0.3, 0.2, 0.25, 0.29, 0.5])

    def validate(t: RetrievalTower) -> float:
        snapshots.append({k: v.copy() for k, v in t.state_arrays().items()})
        return next(curve)

    result = fit_tower(tower, histories, validate, max_epochs=6, patience=3)
    assert result["best_epoch"] == 2 and result["epochs"] == 5 and result["best_valid"] == 0.3
    for key, value in tower.state_arrays().items():
        assert np.array_equal(value, snapshots[1][key])
    assert not tower.training


def test_state_round_trip_and_shape_errors() -> None:
    tower = _tower()
    arrays = tower.state_arrays()
    again = RetrievalTower.from_arrays(np.zeros((40, 24), np.float32), tower.cfg, arrays)
    assert all(np.array_equal(again.state_arrays()[k], v) for k, v in arrays.items())
    with pytest.raises(ValueError, match="shape"):
        RetrievalTower.from_arrays(np.zeros((40, 24), np.float32), tower.cfg.model_copy(update={"dim": 8, "heads": 1}), arrays)
    with pytest.raises(ValueError, match="lacks"):
        RetrievalTower.from_arrays(np.zeros((40, 24), np.float32), tower.cfg.model_copy(update={"item_init": "id"}), arrays)
    with pytest.raises(ValueError, match="which this tower lacks"):  # a text tower's residual must not be dropped silently
        RetrievalTower.from_arrays(np.zeros((40, 24), np.float32), tower.cfg.model_copy(update={"item_init": "projection"}), arrays)
    projection = _tower(item_init="projection").state_arrays()
    assert not any(v.shape[0] == 40 for v in projection.values())  # nothing per item travels


def test_config_rejects_heads_that_do_not_divide_dim() -> None:
    with pytest.raises(ValueError, match="heads"):
        TowerConfig(dim=10, heads=3)


def test_local_steps_run_exactly_that_many_optimiser_steps() -> None:
    tower = _tower()
    stats = TowerTrainer(tower, [np.array(h) for h in HISTORIES]).run(steps=7)
    assert stats["steps"] == 7 and stats["examples"] == len(sliding_windows([np.array(h) for h in HISTORIES], 10, 40)[0])
