"""The retrieval tower's config section (beside its module; no torch import, so the CLI starts fast)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TowerConfig(BaseModel):
    """Shape and training recipe of the retrieval tower (SASRec-style, full-softmax cross-entropy)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True, frozen=False, allow_inf_nan=False)

    dim: int = Field(default=64, ge=4, le=4096)
    """Width of item embeddings and of the history encoder."""
    max_len: int = Field(default=200, ge=2, le=10_000)
    """Most recent history items the encoder reads (longer histories are cut into windows for training)."""
    layers: int = Field(default=2, ge=1, le=48)
    """Causal self-attention blocks."""
    heads: int = Field(default=1, ge=1, le=64)
    """Attention heads (must divide `dim`)."""
    dropout: float = Field(default=0.2, ge=0, lt=1)
    """Dropout on the input embeddings, attention weights and feed-forward outputs (training only)."""
    item_init: Literal["text", "projection", "id"] = "text"
    """Item side: `text` = PCA projection of the frozen item-text embeddings + a learned residual; `projection` = that projection alone (nothing per item travels); `id` = a random-init ID table (ablation)."""
    lr: float = Field(default=1e-3, gt=0, le=1)
    """AdamW learning rate on the client (or centrally)."""
    weight_decay: float = Field(default=0.01, ge=0, le=10)
    """AdamW weight decay."""
    batch_size: int = Field(default=64, ge=1, le=65_536)
    """Training windows per optimiser step."""

    @model_validator(mode="after")
    def _heads_divide(self) -> TowerConfig:
        if self.dim % self.heads:
            raise ValueError(f"tower.heads={self.heads} must divide tower.dim={self.dim}; pick heads in the divisors of dim")
        return self
