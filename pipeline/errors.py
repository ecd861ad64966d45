"""Errors that fedrec reports to users without a traceback."""

from __future__ import annotations

from collections.abc import Sequence


def show_ids(values: Sequence[object], limit: int = 5) -> str:
    """At most `limit` ids for a message, each cut short, since ids may be of any length."""
    shown = [r if len(r := repr(v)) <= 40 else r[:39] + "…" for v in values[:limit]]
    return "[" + ", ".join(shown) + "]" + (f" and {len(values) - limit} more" if len(values) > limit else "")


MAX_ID_CHARS = 100_000
"""Longest id accepted from outside (the JSON API, batch rows)."""


def check_id(value: object) -> int | str:
    """An outside user or item id as the dataset spells it: an int (not a bool) or a non-empty, valid Unicode string.

    Strict on purpose: lax parsing reads true as 1 and 2.0 as 2, which would name the wrong user or item.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"must be an integer or a string, got {type(value).__name__} {show_ids([value])[1:-1]}")
    if isinstance(value, str):
        if not value or len(value) > MAX_ID_CHARS:
            raise ValueError(f"must be 1 to {MAX_ID_CHARS:,} characters, got {len(value):,}")
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:  # JSON may spell a lone surrogate ("\ud800"); it could not be written back as UTF-8
                raise ValueError(f"has a lone surrogate {value[exc.start]!r} at character {exc.start + 1}; ids must be valid Unicode") from None
    return value


class FedrecError(Exception):
    """Base class: the message alone tells the user what went wrong and how to fix it."""


class ConfigError(FedrecError, ValueError):
    """A configuration key or value is invalid."""


class DataError(FedrecError, ValueError):
    """A data file is missing, corrupt or does not fit the expected format."""


class IndexMismatchError(FedrecError, ValueError):
    """A saved index does not fit the vectors or the model it is used with."""


class RequestError(FedrecError, ValueError):
    """One request (a batch row, an API call) is invalid; `field` names the part to fix."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
