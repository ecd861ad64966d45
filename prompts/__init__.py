"""Versioned prompt templates, the code that renders them, and the candidate label sets.

A plain template is `templates/<name>.v<N>.jinja` (rendered to one string); a chat prompt is
`templates/<name>.v<N>.yaml` with `system` and `user` Jinja templates. Values are inserted as
data: a title holding braces or instructions is rendered verbatim and never evaluated.

Data is also made inert, in one place (`_render_string`), so catalogue or user text cannot
steer the tokenizer:

- Every `{{ ... }}` value loses the U+2063 character that the backends' embedding-slot markers
  are built from, so a title cannot open an extra soft-prompt or item-token slot. Markers the
  code itself inserts are passed as `Verbatim` and kept.
- The rendered text then loses every control-token string: the `control_tokens` a caller passes
  (the backend tokenizer's special tokens, see `LLMBackend.control_tokens`), anything shaped
  like `<|...|>` (ChatML, Llama 3, DeepSeek's full-width bars) and the common `<s>`, `[INST]`,
  `<<SYS>>` forms. Removal repeats until nothing matches, so `<|im_<|im_end|>start|>` cannot
  reassemble, and it runs over the whole text, so two adjacent values cannot join into a token.

Template text holds no control tokens (the chat template adds them), so clean data renders
byte for byte as before. The backends check the result again when they tokenise it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from langchain_core.prompts import ChatPromptTemplate

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
LABEL_SETS = {
    "letters": tuple(chr(c) for c in range(ord("A"), ord("Z") + 1)),
    "letters52": tuple(chr(c) for c in range(ord("A"), ord("Z") + 1)) + tuple(chr(c) for c in range(ord("a"), ord("z") + 1)),
}
SLOT_MARK = "\u2063"
"""The invisible separator the backends build their embedding-slot markers from; data never keeps it."""
COMMON_CONTROL_TOKENS = ("<s>", "</s>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "<start_of_turn>", "<end_of_turn>")
"""Control tokens of common chat formats, removed from data even when no tokenizer is known."""
# `<|im_start|>`, `<|eot_id|>`, DeepSeek's `<｜end▁of▁sentence｜>`: bars around anything but brackets or bars,
# and never across a line or a slot marker, so a removal cannot eat a marker the code inserted.
_BARRED = r"<[|\uff5c][^<>|\uff5c\n\u2063]{0,100}[|\uff5c]>"


class Verbatim(str):
    """Text from the code, e.g. an embedding-slot marker, that keeps its slot-marker characters when rendered."""


def inert(text: str, control_tokens: Iterable[str] = ()) -> str:
    """`text` without slot-marker characters or control-token strings, as a template renders a value.

    Args:
        text: data, e.g. a title or a profile.
        control_tokens: the tokenizer's own special tokens, removed as well as the generic forms.
    """
    return _without_control(text.replace(SLOT_MARK, ""), tuple(control_tokens))


@lru_cache(maxsize=32)
def _control_pattern(control_tokens: tuple[str, ...]) -> re.Pattern[str]:
    # Longest first, so a token is never cut short by another that is its prefix.
    literal = sorted({t for t in (*control_tokens, *COMMON_CONTROL_TOKENS) if t}, key=len, reverse=True)
    return re.compile("|".join([*map(re.escape, literal), _BARRED]))


def _without_control(text: str, control_tokens: tuple[str, ...]) -> str:
    pattern = _control_pattern(control_tokens)
    # Each pass only shortens the text, so this ends; it ends when no removal joins a new token.
    while True:
        cleaned = pattern.sub("", text)
        if cleaned == text:
            return text
        text = cleaned


def _data_value(value: Any) -> Any:
    return value if isinstance(value, Verbatim) else str(value).replace(SLOT_MARK, "")


def available() -> list[str]:
    """Names of the shipped templates, e.g. `profile.v1`, `rerank.v1`."""
    return sorted(p.stem for p in TEMPLATE_DIR.iterdir() if p.suffix in (".jinja", ".yaml"))


def labels_for(n: int, label_set: str = "letters") -> list[str]:
    """The first `n` labels of `label_set`.

    Raises:
        ValueError: `n` is 0 or exceeds the set.
    """
    if label_set not in LABEL_SETS:
        raise ValueError(f"label set {label_set!r} does not exist; choose one of {', '.join(LABEL_SETS)}")
    pool = LABEL_SETS[label_set]
    if not 1 <= n <= len(pool):
        raise ValueError(
            f"candidates must be 1..{len(pool)} for labels {pool[0]}..{pool[-1]}, got {n}; "
            + ("lower rerank.num_candidates or use rerank.label_set=letters52" if label_set == "letters" else "lower rerank.num_candidates")
        )
    return list(pool[:n])


@lru_cache(maxsize=None)
def _environment(trim: bool):  # noqa: ANN202 - jinja2 is imported lazily
    # Chat templates render without block trimming, as LangChain's Jinja2 formatter does,
    # so `langchain_prompt(name)` and `render_chat(name)` produce the same text.
    import jinja2

    return jinja2.Environment(
        undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=False,
        trim_blocks=trim, lstrip_blocks=trim, finalize=_data_value,
    )


@lru_cache(maxsize=None)
def _source(name: str) -> tuple[str, dict[str, str] | str]:
    if name not in available():
        raise ValueError(f"prompt template {name!r} does not exist; available: {', '.join(available())}")
    yaml_path = TEMPLATE_DIR / f"{name}.yaml"
    if yaml_path.is_file():
        spec = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
        return "chat", {role: spec[role] for role in ("system", "user") if role in spec}
    return "text", (TEMPLATE_DIR / f"{name}.jinja").read_text(encoding="utf-8")


def _render_string(name: str, source: str, data: dict[str, Any], *, trim: bool, control_tokens: Iterable[str]) -> str:
    import jinja2

    try:
        text = _environment(trim).from_string(source).render(**data)
    except jinja2.UndefinedError as exc:
        raise ValueError(f"prompt template {name!r} needs a value that was not given: {exc.message}") from None
    return _without_control(text, tuple(control_tokens)).strip()


def render(name: str, *, control_tokens: Iterable[str] = (), **data: Any) -> str:
    """Render the text template `name` (e.g. `profile.v1`), its values made inert.

    Args:
        name: the template.
        control_tokens: the tokenizer's special tokens, removed from the text besides the generic forms.
        **data: the template's values.
    """
    kind, source = _source(name)
    if kind != "text":
        raise ValueError(f"prompt template {name!r} is a chat prompt; use render_chat")
    return _render_string(name, source, data, trim=True, control_tokens=control_tokens)  # type: ignore[arg-type]


def render_chat(name: str, *, control_tokens: Iterable[str] = (), **data: Any) -> list[dict[str, str]]:
    """Render the chat template `name` (e.g. `rerank.v1`) into `[{role, content}, ...]` messages, its values made inert.

    Args:
        name: the template.
        control_tokens: the tokenizer's special tokens, removed from the text besides the generic forms.
        **data: the template's values.
    """
    kind, source = _source(name)
    if kind != "chat":
        raise ValueError(f"prompt template {name!r} is a text template; use render")
    control_tokens = tuple(control_tokens)
    return [
        {"role": role, "content": _render_string(name, text, data, trim=False, control_tokens=control_tokens)}
        for role, text in source.items()  # type: ignore[union-attr]
    ]


def langchain_prompt(name: str) -> ChatPromptTemplate:
    """The chat template `name` as a LangChain `ChatPromptTemplate` (Jinja2 format, sandboxed).

    LangChain renders the values itself, so they are not made inert here; pass data through
    `inert` first. The backends refuse a prompt that still carries control tokens.
    """
    from langchain_core.prompts import ChatPromptTemplate

    kind, source = _source(name)
    if kind != "chat":
        raise ValueError(f"prompt template {name!r} is a text template, not a chat prompt")
    return ChatPromptTemplate.from_messages(
        [(role, text) for role, text in source.items()], template_format="jinja2"  # type: ignore[union-attr]
    )
