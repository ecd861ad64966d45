"""The LLM backend contract: label log-probabilities in one forward pass, and generation.

Every backend scores the same rendered chat prompt the same way: the next-token logits at
the answer position, restricted to the label tokens, in fp32, log-softmaxed over the labels.
A soft prompt is a `(m, hidden)` tensor of input embeddings on its own line at the start of the
first user message: the user content becomes `<soft prompt>` + "\n" + content. That is exactly
what vLLM renders for a chat message whose content parts are `[prompt_embeds, text]` (it joins
parts with a newline), so both backends see the same sequence.

Only the chat template may put control tokens in a prompt. `prompts.render_chat` already strips
them from data (given `control_tokens()`), and `encode` checks the result: the special-token ids
of the encoded prompt must be exactly those the chat template makes for the same roles with
placeholder contents, or it raises. Every backend scores or sends a prompt only after `encode`,
so text with `<|im_start|>` in a title can never open a real turn, in process or on a server
that re-renders the messages with the same tokenizer.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from prompts import SLOT_MARK, Verbatim

if TYPE_CHECKING:
    import torch

DTYPES = ("float32", "bfloat16", "float16")
BF16_CPU_FLAGS = {"avx512_bf16", "amx_bf16"}
"""CPU flags (Linux /proc/cpuinfo) of native bf16 matrix instructions, where `llm.dtype=auto` picks bfloat16."""


def cpu_flags() -> set[str]:
    """This CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.partition(":")[2].split()}


def resolve_dtype(dtype: str, device: str = "cpu", flags: set[str] | None = None) -> str:
    """`dtype`, with `auto` made concrete: bfloat16 on a GPU or on a CPU with native bf16 instructions (AVX-512 BF16 or
    AMX), float32 on other CPUs, where bf16 is emulated and slower."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"llm.dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
        return dtype
    if not device.startswith("cpu"):
        return "bfloat16"
    return "bfloat16" if BF16_CPU_FLAGS & (cpu_flags() if flags is None else flags) else "float32"


Messages = list[dict[str, str]]
# Verbatim: templates keep these markers, while data loses every SLOT_MARK (see `prompts`).
SOFT_PROMPT_SLOT = Verbatim(f"{SLOT_MARK}soft-prompt{SLOT_MARK}")
"""Marker rendered where the soft prompt goes, then split out before tokenisation."""
ITEM_SLOT = Verbatim(f"{SLOT_MARK}item{SLOT_MARK}")
"""Marker a template renders right after a candidate's title, where its collaborative item token goes."""
_PLACEHOLDER = "x"
"""Message content for the chat template's own control tokens (not empty: some templates skip empty messages)."""
_SLOTS = re.compile(f"({re.escape(SOFT_PROMPT_SLOT)}|{re.escape(ITEM_SLOT)})")


class LLMError(RuntimeError):
    """The LLM backend failed (server down, missing server flag, timeout) — the message says which."""


@dataclass(frozen=True)
class EncodedPrompt:
    """Token ids of a rendered prompt, split at its embedding slots.

    `pieces[i]` are the token ids before slot `i`; `slots[i]` is `soft` or `item`.
    """

    pieces: tuple[tuple[int, ...], ...]
    slots: tuple[str, ...] = ()

    @property
    def ids(self) -> list[int]:
        """All token ids (slots left out)."""
        return [t for piece in self.pieces for t in piece]

    @property
    def n_items(self) -> int:
        return sum(1 for s in self.slots if s == "item")

    def compose(self, embed: Callable[[Sequence[int]], torch.Tensor], soft_prompt: torch.Tensor | None,
                item_tokens: torch.Tensor | None) -> torch.Tensor:
        """`(length, hidden)` input embeddings: token embeddings with the soft prompt and item tokens in their slots."""
        import torch

        if self.n_items and (item_tokens is None or len(item_tokens) != self.n_items):
            got = 0 if item_tokens is None else len(item_tokens)
            raise ValueError(f"the prompt has {self.n_items} item-token slots but {got} item tokens were given")
        parts = [embed(self.pieces[0])]
        next_item = 0
        for slot, piece in zip(self.slots, self.pieces[1:], strict=True):
            if slot == "soft":
                if soft_prompt is None:
                    raise ValueError("the prompt has a soft-prompt slot but no soft prompt was given")
                parts.append(soft_prompt.float())
            else:
                parts.append(item_tokens[next_item : next_item + 1].float())  # type: ignore[index]
                next_item += 1
            parts.append(embed(piece))
        return torch.cat(parts)


class LLMBackend(ABC):
    """Scores candidate labels and generates text for chat prompts."""

    tokenizer: Any
    context_length: int

    @abstractmethod
    def score_labels(
        self, prompts: Sequence[Messages], labels: Sequence[str], soft_prompt: torch.Tensor | None = None,
        item_tokens: Sequence[torch.Tensor] | None = None,
    ) -> np.ndarray:
        """`(len(prompts), len(labels))` float32 log-probabilities over the labels (each row's exp sums to 1).

        `item_tokens[i]` is a `(n_slots, hidden)` tensor for prompt i's item-token slots, in order.
        """

    @abstractmethod
    def generate(self, prompts: Sequence[Messages], *, max_tokens: int = 64) -> list[str]:
        """Greedy completions of each prompt."""

    def describe(self) -> str:
        """One line naming the backend and model, for logs and status pages."""
        return type(self).__name__

    def render(self, messages: Messages) -> str:
        """The chat-template text of `messages`, ending where the assistant's answer starts."""
        return self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def prompt_tokens(self, messages: Messages) -> int:
        """Length of the rendered prompt in tokens."""
        return self.count_tokens(self.render(messages))

    def control_tokens(self) -> tuple[str, ...]:
        """The strings this tokenizer reads as control tokens: its special tokens and added special tokens."""
        added = getattr(self.tokenizer, "added_tokens_decoder", None) or {}
        found = set(self.tokenizer.all_special_tokens) | {t.content for t in added.values() if getattr(t, "special", False)}
        return tuple(sorted(found))

    def _special_ids(self) -> set[int]:
        tok = self.tokenizer
        added = getattr(tok, "added_tokens_decoder", None) or {}
        ids = set(tok.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}
        # Without byte fallback an odd character encodes as unk, which opens no turn; keep it only when it doubles as one.
        unk = getattr(tok, "unk_token_id", None)
        if unk not in {getattr(tok, "bos_token_id", None), getattr(tok, "eos_token_id", None), getattr(tok, "pad_token_id", None)}:
            ids.discard(unk)
        return ids

    def encode(self, messages: Messages, *, with_slot: bool) -> EncodedPrompt:
        """Token ids of the rendered prompt, split at item-token slots and (with `with_slot`) the soft-prompt slot.

        Raises:
            ValueError: a message holds control-token text or a soft-prompt marker of its own.
        """
        if any(SOFT_PROMPT_SLOT in m["content"] for m in messages):
            raise ValueError("a message already holds the soft-prompt slot marker; render data with prompts.render_chat, which drops it")
        marked = [dict(m) for m in messages]
        if with_slot:
            first_user = next((i for i, m in enumerate(marked) if m["role"] == "user"), None)
            if first_user is None:
                raise ValueError("a soft prompt needs a user message to precede; the prompt has none")
            marked[first_user]["content"] = SOFT_PROMPT_SLOT + "\n" + marked[first_user]["content"]
        parts = _SLOTS.split(self.render(marked))
        pieces = tuple(tuple(self._ids(text)) for text in parts[0::2])
        slots = tuple("soft" if marker == SOFT_PROMPT_SLOT else "item" for marker in parts[1::2])
        encoded = EncodedPrompt(pieces, slots)
        self._check_control_tokens(messages, encoded.ids)
        return encoded

    def _check_control_tokens(self, messages: Messages, ids: Sequence[int]) -> None:
        """Raise unless the special-token ids in `ids` are exactly the chat template's own, in order."""
        special = self._special_ids()
        found = [t for t in ids if t in special]
        skeleton = self._ids(self.render([{"role": m["role"], "content": _PLACEHOLDER} for m in messages]))
        expected = [t for t in skeleton if t in special]
        if found != expected:
            texts = [m["content"] for m in messages]
            named = [tok for tok in self.control_tokens() if any(tok in text for text in texts)]
            raise ValueError(
                f"the prompt has {len(found)} control tokens where its chat template makes {len(expected)}: the messages "
                f"hold {', '.join(map(repr, named)) or 'control-token text'}; render data with prompts.render_chat "
                "(control_tokens=backend.control_tokens()), which removes them, or use prompts.inert on the text"
            )

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def label_ids(self, labels: Sequence[str]) -> list[int]:
        """Token id of each label, checking that every label is exactly one token.

        Raises:
            ValueError: a label is several tokens, or two labels share a token.
        """
        ids = []
        for label in labels:
            encoded = self._ids(label)
            if len(encoded) != 1:
                raise ValueError(
                    f"label {label!r} is {len(encoded)} tokens in this tokenizer, but verbalizer scoring needs "
                    "single-token labels; use rerank.label_set=letters or a model whose tokenizer has them"
                )
            ids.append(encoded[0])
        if len(set(ids)) != len(ids):
            raise ValueError(f"labels {list(labels)} do not map to distinct tokens in this tokenizer")
        return ids


def read_embedding_table(model_dir: str | Path) -> torch.Tensor:
    """`(vocab, hidden)` fp32 input embeddings from a model folder's safetensors (for soft prompts sent as embeddings)."""
    from safetensors import safe_open

    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            key = next((k for k in handle.keys() if k.endswith("embed_tokens.weight")), None)
            if key:
                return handle.get_tensor(key).float()
    raise LLMError(f"no embed_tokens.weight in {model_dir}; soft prompts need the model's safetensors locally")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64, returned as float32."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    return (shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))).astype(np.float32)
