"""Versioned prompt templates, the code that renders them, and the candidate label sets.

A plain template is `templates/<name>.v<N>.jinja` (rendered to one string); a chat prompt is
`templates/<name>.v<N>.yaml` with `system` and `user` Jinja templates. Values are inserted as
data: a title holding braces or instructions is rendered verbatim and never evaluated.
"""

from __future__ import annotations

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
        trim_blocks=trim, lstrip_blocks=trim,
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


def _render_string(name: str, source: str, data: dict[str, Any], *, trim: bool) -> str:
    import jinja2

    try:
        return _environment(trim).from_string(source).render(**data).strip()
    except jinja2.UndefinedError as exc:
        raise ValueError(f"prompt template {name!r} needs a value that was not given: {exc.message}") from None


def render(name: str, **data: Any) -> str:
    """Render the text template `name` (e.g. `profile.v1`)."""
    kind, source = _source(name)
    if kind != "text":
        raise ValueError(f"prompt template {name!r} is a chat prompt; use render_chat")
    return _render_string(name, source, data, trim=True)  # type: ignore[arg-type]


def render_chat(name: str, **data: Any) -> list[dict[str, str]]:
    """Render the chat template `name` (e.g. `rerank.v1`) into `[{role, content}, ...]` messages."""
    kind, source = _source(name)
    if kind != "chat":
        raise ValueError(f"prompt template {name!r} is a text template; use render")
    return [{"role": role, "content": _render_string(name, text, data, trim=False)} for role, text in source.items()]  # type: ignore[union-attr]


def langchain_prompt(name: str) -> ChatPromptTemplate:
    """The chat template `name` as a LangChain `ChatPromptTemplate` (Jinja2 format, sandboxed)."""
    from langchain_core.prompts import ChatPromptTemplate

    kind, source = _source(name)
    if kind != "chat":
        raise ValueError(f"prompt template {name!r} is a text template, not a chat prompt")
    return ChatPromptTemplate.from_messages(
        [(role, text) for role, text in source.items()], template_format="jinja2"  # type: ignore[union-attr]
    )
