"""Builds the configured backend; heavy clients are imported only when chosen."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.config import LLMConfig
from pipeline.llm.base import LLMBackend


def make_backend(cfg: LLMConfig, cache_dir: Path) -> LLMBackend:
    """The backend `cfg.backend` names."""
    if cfg.backend == "transformers":
        from pipeline.llm.transformers_backend import TransformersBackend

        return TransformersBackend(
            cfg.model, dtype=cfg.dtype, cache_dir=cache_dir, batch_size=cfg.batch_size, device=cfg.device, max_context=cfg.max_context,
            prefix_cache=cfg.prefix_cache,
        )
    if cfg.backend == "openai":
        from pipeline.llm.openai_backend import OpenAIBackend

        return OpenAIBackend(
            cfg.base_url, tokenizer=cfg.model, served_model=cfg.served_model, api_key=os.environ.get(cfg.api_key_env),
            concurrency=cfg.concurrency, timeout_s=cfg.timeout_s, max_retries=cfg.max_retries, cache_dir=cache_dir,
            max_context=cfg.max_context, soft_prompt_transport=cfg.soft_prompt_transport,
        )
    from pipeline.llm.vllm_backend import VLLMBackend

    return VLLMBackend(cfg.model, dtype=cfg.dtype, cache_dir=cache_dir, max_context=cfg.max_context)
