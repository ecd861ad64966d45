"""Errors that fedrec reports to users without a traceback."""


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
