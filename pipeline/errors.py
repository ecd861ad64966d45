"""Errors that fedrec reports to users without a traceback."""

from __future__ import annotations

from collections.abc import Sequence


def show_ids(values: Sequence[object], limit: int = 5) -> str:
    """At most `limit` ids for a message, each cut short, since ids may be of any length."""
    shown = [r if len(r := repr(v)) <= 40 else r[:39] + "…" for v in values[:limit]]
    return "[" + ", ".join(shown) + "]" + (f" and {len(values) - limit} more" if len(values) > limit else "")


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
