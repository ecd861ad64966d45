"""Versioned prompt templates and the code that renders them from structured data.

A template is a file `templates/<name>.v<N>.jinja`. Values are inserted as data: a title that
contains braces or instructions is rendered verbatim and never evaluated.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"


def available() -> list[str]:
    """Names of the shipped templates, e.g. `profile.v1`."""
    return sorted(p.name.removesuffix(".jinja") for p in TEMPLATE_DIR.glob("*.jinja"))


@lru_cache(maxsize=None)
def _environment():  # noqa: ANN202 - jinja2 is imported lazily
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=False,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render(name: str, **data: Any) -> str:
    """Render template `name` (e.g. `profile.v1`) with `data`.

    Raises:
        ValueError: the template does not exist or a variable it needs is missing.
    """
    import jinja2

    if name not in available():
        raise ValueError(f"prompt template {name!r} does not exist; available: {', '.join(available())}")
    try:
        return _environment().get_template(f"{name}.jinja").render(**data).strip()
    except jinja2.UndefinedError as exc:
        raise ValueError(f"prompt template {name!r} needs a value that was not given: {exc.message}") from None
