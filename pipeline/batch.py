"""Batch offline reranking: JSONL requests in, JSONL results out, resumable, on one machine or a Ray cluster.

A line is a native fedrec request or an OpenAI batch line (`custom_id`, `method`, `url`, `body` holding the native
request). A job reads one format, given by `--format` or taken from the first line that is a JSON object, and writes its
results and errors in that format; a line in the other format is an error row.

Local engine: input lines are processed in fixed chunks of `batch_size` consecutive lines. After each chunk
the results and errors are appended (one write each, then fsync) and a progress file records
how many chunks are done and the length and sha256 of both files. A rerun checks both files
against that record, truncates anything written after the last recorded chunk and continues from
there, so a crash loses at most the chunk in flight, lines are never torn, and the output is
byte-identical to an uninterrupted run. A file that is shorter than recorded, or whose recorded
bytes changed, is refused rather than resumed. A lock file beside the output keeps a second job
off the same output.

Ray engine: the same chunks are grouped into shards of `shard_size` lines and reranked by Ray Data actors. The driver
writes each finished shard's results and errors to `<output>.shards/` (atomically, fsynced) and records the shard and the
sha256 of both files in the progress file, so a rerun skips finished shards and a killed job loses at most the shards in
flight. When every shard is done they are joined, in input order, into the same results and errors files the local
engine writes, byte for byte, and the shard folder is removed.

Every line that cannot become a request (too long, not UTF-8, not JSON, nested too deeply,
invalid fields, unknown ids) becomes an error row; only a failing LLM backend stops the job.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PlainValidator, StrictInt, ValidationError, model_validator

from pipeline.config import FedrecConfig
from pipeline.errors import FedrecError, check_id, show_ids
from pipeline.io import atomic_path, check_writable, file_digest, prefix_digest, write_json
from pipeline.llm.base import LLMError

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 1 << 20
"""Longest input line read as a request; a request needs far less, and the bound keeps memory flat."""
_PREVIEW_CHARS = 500
_MAX_MESSAGE_CHARS = 1000

FORMATS = ("auto", "native", "openai")
"""Values of `--format`: auto takes the format of the first line that is a JSON object."""
OPENAI_URL = "/v1/fedrec/rerank"
"""The `url` of an OpenAI batch line whose body is a fedrec request."""
SHARD_BATCHES = 64
"""Default shard of the ray engine, in batches of `--batch-size` lines."""
_OPENAI_KEYS = frozenset({"custom_id", "method", "url", "body"})
_OTHER_ENDPOINTS = {
    "/v1/chat/completions": "chat-completions", "/v1/completions": "completions", "/v1/embeddings": "embeddings",
    "/v1/responses": "responses", "/v1/rerank": "document-rerank", "/v1/score": "scoring",
}
_OTHER_BODIES = (("messages", "chat-completions"), ("prompt", "completions"), ("documents", "document-rerank"), ("input", "embeddings"))


Id = Annotated[int | str, PlainValidator(check_id, json_schema_input_type=int | str)]
"""A user or item id as the dataset spells it (`pipeline.errors.check_id`)."""


class RerankRow(BaseModel):
    """One request line."""

    model_config = ConfigDict(extra="forbid")

    id: Id | None = None
    """Caller's id, echoed back (default: the line number)."""
    user_id: Id | None = None
    """A user of the dataset (their whole history is the context); give this or `history`."""
    history: list[Id] | None = None
    """Instead of `user_id`: item ids the user interacted with, oldest first."""
    candidates: list[Id] | None = None
    """Item ids to rerank, each once; retrieved from the index when absent."""
    k: StrictInt | None = None
    """How many results to return (default: all candidates)."""

    @model_validator(mode="after")
    def _needs_someone(self) -> RerankRow:
        if self.user_id is None and not self.history:
            raise ValueError("give user_id or a non-empty history")
        if self.candidates is not None and not self.candidates:
            raise ValueError("candidates is empty; omit it to retrieve candidates, or list at least one item id")
        if self.k is not None and self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        return self


class ShardRecord(BaseModel):
    """One finished shard of a ray job, kept until the shards are joined into the output."""

    model_config = ConfigDict(extra="forbid")

    lines: int = Field(default=0, ge=0)
    """Input lines in the shard."""
    ok: int = Field(default=0, ge=0)
    """Rows answered."""
    failed: int = Field(default=0, ge=0)
    """Rows recorded as errors."""
    results_sha256: str = ""
    """sha256 of the shard's results file."""
    errors_sha256: str = ""
    """sha256 of the shard's errors file."""


class JobProgress(BaseModel):
    """The progress file: which job writes the output, how far it got, and exactly what it wrote."""

    model_config = ConfigDict(extra="forbid")

    input: str = ""
    """Resolved path of the input."""
    input_sha256: str = ""
    """sha256 of the input file."""
    batch_size: int = Field(default=16, ge=1)
    """Lines per chunk; chunk boundaries must not move between runs."""
    config_sha256: str = ""
    """sha256 of the config's JSON form."""
    run: str = "auto"
    """The trained run candidates come from."""
    errors: str = ""
    """Resolved path of the errors file."""
    engine: str = "local"
    """The engine that writes the output: local or ray."""
    format: str = "native"
    """Line format of the input and the output: native or openai."""
    shard_size: int = Field(default=0, ge=0)
    """Lines per shard, the ray engine's unit of resume (0 for the local engine)."""
    shards: dict[int, ShardRecord] = Field(default_factory=dict)
    """The ray engine's finished shards by index, until they are joined into the output."""
    chunks_done: int = Field(default=0, ge=0)
    """Chunks whose results and errors are both written."""
    output_bytes: int = Field(default=0, ge=0)
    """Length of the output after the last finished chunk."""
    output_sha256: str | None = None
    """sha256 of those bytes (None in files written before checksums were kept)."""
    errors_bytes: int = Field(default=0, ge=0)
    """Length of the errors file after the last finished chunk."""
    errors_sha256: str | None = None
    """sha256 of those bytes (None in files written before checksums were kept)."""
    ok: int = Field(default=0, ge=0)
    """Rows answered so far."""
    failed: int = Field(default=0, ge=0)
    """Rows recorded as errors so far."""
    complete: bool = False
    """Every chunk is done."""


_JOB_FIELDS = ("input", "input_sha256", "batch_size", "config_sha256", "run", "errors", "engine", "format", "shard_size")


@dataclass
class Summary:
    """What a run did."""

    ok: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0

    @property
    def rows_per_s(self) -> float:
        return (self.ok + self.failed) / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class Unreadable:
    """An input line refused before parsing: why, what of it to show, its OpenAI error code and custom_id (if known)."""

    reason: str
    preview: str
    code: str = "invalid_input"
    custom_id: str | None = None


class BadRow(ValueError):
    """A line that cannot become a request: the message, the OpenAI error code and the line's custom_id (if known)."""

    def __init__(self, message: str, code: str = "invalid_request", custom_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.custom_id = custom_id


class _Valid(NamedTuple):
    number: int
    text: str
    row: RerankRow
    custom_id: str | None
    request: Any


def _row_error(line: int, raw: str, message: str) -> dict[str, Any]:
    if len(message) > _MAX_MESSAGE_CHARS:
        message = message[: _MAX_MESSAGE_CHARS - 1] + "…"
    return {"line": line, "error": message, "input": raw[:_PREVIEW_CHARS]}


def _load_json(text: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        # The C decoder guards its recursion, so this is safe to catch; a request is never deeper than 3.
        raise ValueError("invalid JSON: arrays or objects nested too deeply; a request is one object holding lists of ids") from None
    except json.JSONDecodeError:
        raise
    except ValueError:
        # Python refuses to read huge integers (a guard against quadratic-time parsing).
        raise ValueError(
            f"invalid JSON: a number has more than {sys.get_int_max_str_digits():,} digits; write long ids as strings"
        ) from None


def _valid_custom_id(value: object) -> str | None:
    """`value` if it can be a custom_id (a non-empty, valid Unicode string), else None."""
    if not isinstance(value, str):
        return None
    try:
        return str(check_id(value))
    except ValueError:
        return None


def _read(text: str, fmt: str, model: str) -> tuple[RerankRow, str | None]:
    """The request on a line of a `fmt` job, and its custom_id (None for native lines).

    Raises:
        BadRow: the line is not JSON, not an object, in the other format, or not a valid request.
    """
    try:
        payload = _load_json(text)
    except ValueError as exc:
        raise BadRow(_describe(exc), "invalid_json") from None
    if not isinstance(payload, dict):
        raise BadRow(f"expected a JSON object, got {type(payload).__name__}", "invalid_json")
    if fmt == "openai":
        return _read_openai(payload, model)
    if not _OPENAI_KEYS.isdisjoint(payload):
        raise BadRow(
            "the line has custom_id, method, url or body, the keys of an OpenAI batch line, but this job reads native "
            "requests (--format native, or --format auto found a native line first); give every line one format, "
            "or pass --format openai", "invalid_batch_line",
        )
    try:
        return RerankRow.model_validate(payload), None
    except ValidationError as exc:
        raise BadRow(_describe(exc)) from None


def _read_openai(payload: dict, model: str) -> tuple[RerankRow, str]:
    """The fedrec request in the body of an OpenAI batch line, and the line's custom_id."""
    raw_id = payload.get("custom_id")
    custom_id = _valid_custom_id(raw_id)

    def bad(message: str, code: str = "invalid_batch_line") -> BadRow:
        return BadRow(message, code, custom_id)

    if _OPENAI_KEYS.isdisjoint(payload):
        raise bad(
            "the line is a native fedrec request, but this job reads OpenAI batch lines (--format openai, or --format "
            f'auto found an OpenAI line first); wrap it as {{"custom_id": "request-1", "method": "POST", "url": '
            f'"{OPENAI_URL}", "body": {{...the request...}}}}, or pass --format native'
        )
    unknown = sorted(set(payload) - _OPENAI_KEYS)
    if unknown:
        raise bad(f"unknown key(s) {show_ids(unknown)} in an OpenAI batch line; it has custom_id, method, url and body, "
                  "and the request's fields (user_id or history, candidates, k) go in body")
    if raw_id is None:
        raise bad('custom_id is missing; give every line a unique string id, e.g. "custom_id": "request-1"')
    if not isinstance(raw_id, str):
        raise bad(f"custom_id must be a string, got {type(raw_id).__name__} {show_ids([raw_id])[1:-1]}; "
                  f'quote it, e.g. "custom_id": "request-1"')
    try:
        check_id(raw_id)
    except ValueError as exc:
        raise bad(f"custom_id {exc}") from None
    method = payload.get("method")
    if method is None:
        raise bad('method is missing; add "method": "POST" (every batch line is a POST request)')
    if method != "POST":
        raise bad(f'method must be "POST", got {show_ids([method])[1:-1]}; every batch line is a POST request')
    url, body = payload.get("url"), payload.get("body")
    kind = _OTHER_ENDPOINTS.get(url) if isinstance(url, str) else None
    if kind is None and isinstance(body, dict):
        kind = next((name for key, name in _OTHER_BODIES if key in body), None)
    if kind is not None:
        raise bad(
            f"this is a {kind} request (url {show_ids([url])[1:-1]}, body keys {show_ids(sorted(body) if isinstance(body, dict) else [])}), "
            f"but fedrec reranks recommendation requests: url \"{OPENAI_URL}\" with a body of user_id or history, "
            f"candidates and k; run {kind} batches with `vllm run-batch` or a hosted batch API", "unsupported_url",
        )
    if url is None:
        raise bad(f'url is missing; add "url": "{OPENAI_URL}"')
    if url != OPENAI_URL:
        raise bad(f'url must be "{OPENAI_URL}" for a fedrec request, got {show_ids([url])[1:-1]}; fix the url', "unsupported_url")
    if body is None:
        raise bad('body is missing; put the fedrec request in it, e.g. "body": {"user_id": 1, "k": 10}')
    if not isinstance(body, dict):
        hint = "; put the object itself in body, not JSON text in a string" if isinstance(body, str) else ""
        raise bad(f"body must be a JSON object holding a fedrec request (user_id or history, candidates, k), "
                  f"got {type(body).__name__}{hint}")
    if "id" in body:
        raise bad("body.id: the custom_id is the id of an OpenAI batch line (the result echoes it as id); drop body.id",
                  "invalid_request")
    fields = dict(body)
    if "model" in fields and (given := fields.pop("model")) != model:
        raise bad(f"body.model: this job reranks with llm.model {show_ids([model])[1:-1]}, got {show_ids([given])[1:-1]}; "
                  "drop body.model, or run the job with --set llm.model=<that model>", "invalid_request")
    try:
        return RerankRow.model_validate({**fields, "id": raw_id}), raw_id
    except ValidationError as exc:
        raise bad(_describe(exc, "body"), "invalid_request") from None


def _describe(exc: Exception, within: str = "") -> str:
    """The error-row message for a row that failed; `within` names the object holding the fields (e.g. body)."""
    if isinstance(exc, json.JSONDecodeError):
        return f"invalid JSON: {exc.msg} at column {exc.colno}"
    if isinstance(exc, ValidationError):
        found = exc.errors()
        places = [".".join(map(str, (within, *e["loc"]) if within else e["loc"])) or "row" for e in found[:5]]
        detail = "; ".join(f"{place}: {e['msg'].removeprefix('Value error, ')}" for place, e in zip(places, found, strict=False))
        return detail + (f"; and {len(found) - 5} more errors" if len(found) > 5 else "")
    if isinstance(exc, (ValueError, FedrecError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _dumps(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False)


def _encode_shard(lines: Sequence[tuple[int, str | Unreadable]]) -> str:
    """A shard's numbered lines as one JSON string, the form a Ray Data row carries."""
    return json.dumps([[n, t.reason, t.preview, t.code, t.custom_id] if isinstance(t, Unreadable) else [n, t] for n, t in lines])


def _decode_shard(payload: str) -> list[tuple[int, str | Unreadable]]:
    return [(entry[0], Unreadable(*entry[1:]) if len(entry) > 2 else entry[1]) for entry in json.loads(payload)]


class BatchReranker:
    """Reranks request lines; a callable class so Ray Data's `map_batches` can run it, one shard per call.

    Args:
        config: the experiment config (a `FedrecConfig` or its dict form, for Ray workers).
        run: the trained run candidates come from (default: the newest one made for this config).
        fmt: the job's line format, native or openai; results and errors are written in it.
        batch_size: lines reranked together within a shard (the local engine's chunk).
        id_seed: makes the OpenAI `id` and `request_id` of each line unique to the job and equal on every rerun.
    """

    def __init__(self, config: FedrecConfig | dict, run: Path | str | None = None, *, fmt: str = "native",
                 batch_size: int = 16, id_seed: str = "") -> None:
        from pipeline.recommender import Recommender

        cfg = config if isinstance(config, FedrecConfig) else FedrecConfig.model_validate(config)
        self.rec = Recommender.from_config(cfg, run=run if run is not None else "auto")
        self.reranker = self.rec.reranker()
        self.model = cfg.llm.model
        self.fmt, self.batch_size, self.id_seed = fmt, batch_size, id_seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Ray Data entry point: `{"shard": ints, "lines": strings}` → `{"shard", "lines", "ok", "failed", "results", "errors"}`.

        Each `lines` value is one shard (`_encode_shard`); `results` and `errors` are its output lines as JSONL text.

        Raises:
            LLMError: the backend failed; then no row of the shard is answered.
        """
        out: dict[str, list] = {"shard": [], "lines": [], "ok": [], "failed": [], "results": [], "errors": []}
        for shard, payload in zip(batch["shard"].tolist(), batch["lines"].tolist(), strict=True):
            lines = _decode_shard(payload)
            results, errors = [], []
            for start in range(0, len(lines), self.batch_size):
                answered, failed = self.process(lines[start:start + self.batch_size])
                results += answered
                errors += failed
            out["shard"].append(shard)
            out["lines"].append(len(lines))
            out["ok"].append(len(results))
            out["failed"].append(len(errors))
            out["results"].append("".join(_dumps(r) + "\n" for r in results))
            out["errors"].append("".join(_dumps(e) + "\n" for e in errors))
        return {key: np.array(values, dtype=object if key in ("results", "errors") else np.int64) for key, values in out.items()}

    def _request(self, row: RerankRow):  # noqa: ANN202 - pipeline.rerank.RerankRequest
        # A dataset user's whole history is the context (split=None): offline jobs rank what comes after everything known.
        return self.rec.request(user_id=row.user_id, history=row.history, candidates=row.candidates)

    def _key(self, number: int) -> str:
        return hashlib.sha256(f"{self.id_seed}:{number}".encode()).hexdigest()[:24]

    def _result(self, entry: _Valid, items: list) -> dict[str, Any]:
        cat = self.rec.dataset.catalog
        top = items[: entry.row.k] if entry.row.k else items
        native = {
            "id": entry.row.id if entry.row.id is not None else entry.number,
            "line": entry.number,
            "items": [
                {"item_id": cat.item_id(x.item), "title": cat.label(x.item), "score": round(x.score, 6),
                 "llm_score": round(x.llm_score, 6), "retrieval_rank": x.retrieval_rank + 1}
                for x in top
            ],
        }
        if self.fmt == "native":
            return native
        key = self._key(entry.number)
        return {"id": f"batch_req_{key}", "custom_id": entry.custom_id,
                "response": {"status_code": 200, "request_id": f"req_{key}", "body": native}, "error": None}

    def _error(self, number: int, raw: str, message: str, code: str, custom_id: str | None) -> tuple[int, dict[str, Any]]:
        if self.fmt == "native":
            return number, _row_error(number, raw, message)
        if len(message) > _MAX_MESSAGE_CHARS:
            message = message[: _MAX_MESSAGE_CHARS - 1] + "…"
        return number, {"id": f"batch_req_{self._key(number)}", "custom_id": custom_id, "response": None,
                        "error": {"code": code, "message": message, "line": number}}

    def _rerank(self, valid: list[_Valid]) -> tuple[list[tuple[_Valid, Any]], list[tuple[int, dict]]]:
        """Rerank the valid rows together; if that fails for any reason but the backend, one at a time."""
        try:
            return list(zip(valid, self.reranker.rerank_batch([v.request for v in valid]), strict=True)), []
        except LLMError:
            raise
        except Exception as exc:  # noqa: BLE001 - one row must not sink the rows batched with it
            log.warning("reranking lines %d..%d together failed (%s); retrying them one at a time", valid[0].number, valid[-1].number, exc)
        ranked, errors = [], []
        for entry in valid:
            try:
                ranked.append((entry, self.reranker.rerank_batch([entry.request])[0]))
            except LLMError:
                raise
            except Exception as exc:  # noqa: BLE001 - the row becomes an error row, as for any bad row
                errors.append(self._error(entry.number, entry.text, f"reranking failed: {_describe(exc)}", "rerank_failed", entry.custom_id))
        return ranked, errors

    def process(self, lines: Sequence[tuple[int, str | Unreadable]]) -> tuple[list[dict], list[dict]]:
        """Results and errors, in the job's format, for `(line number, text)` pairs; a bad row never stops the others.

        Raises:
            LLMError: the backend failed; then no row of `lines` is answered.
        """
        errors: list[tuple[int, dict]] = []
        valid: list[_Valid] = []
        for number, text in lines:
            if isinstance(text, Unreadable):
                errors.append(self._error(number, text.preview, text.reason, text.code, text.custom_id))
                continue
            custom_id = None
            try:
                row, custom_id = _read(text, self.fmt, self.model)
                valid.append(_Valid(number, text, row, custom_id, self._request(row)))
            except BadRow as exc:
                errors.append(self._error(number, text, str(exc), exc.code, exc.custom_id))
            except LLMError:
                raise
            except Exception as exc:  # noqa: BLE001 - any line may be hostile; each failure is an error row
                errors.append(self._error(number, text, _describe(exc), "invalid_request", custom_id))
        results = []
        if valid:
            ranked, failed = self._rerank(valid)
            errors += failed
            results = [self._result(entry, items) for entry, items in ranked]
        return results, [record for _, record in sorted(errors, key=lambda e: e[0])]


def _limit() -> str:
    return f"{MAX_LINE_BYTES >> 20} MiB" if MAX_LINE_BYTES % (1 << 20) == 0 else f"{MAX_LINE_BYTES:,}-byte"


def _lines(path: Path) -> Iterator[tuple[int, str | Unreadable]]:
    """Numbered non-blank lines as text, or `Unreadable` for a line too long or not UTF-8.

    At most `MAX_LINE_BYTES + 1` bytes of a line are held at once.
    """
    with path.open("rb") as handle:
        number = 0
        while head := handle.readline(MAX_LINE_BYTES + 1):
            number += 1
            piece, size = head, len(head)
            while size > MAX_LINE_BYTES and not piece.endswith(b"\n"):
                if not (piece := handle.readline(1 << 20)):
                    break
                size += len(piece)
            size -= piece.endswith(b"\n")
            if size > MAX_LINE_BYTES:
                yield number, Unreadable(
                    f"line {number} is {size:,} bytes, more than the {_limit()} limit; a request needs far less, "
                    "so split it into several lines or drop it",
                    head[:_PREVIEW_CHARS].decode("utf-8", "replace"),
                )
                continue
            raw = head.removesuffix(b"\n").removesuffix(b"\r")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield number, Unreadable(
                    f"line {number} is not valid UTF-8 at byte {exc.start + 1} ({exc.reason}); save the input as UTF-8",
                    raw[:_PREVIEW_CHARS].decode("utf-8", "replace"),
                )
                continue
            if text.strip():
                yield number, text


def _detect_format(path: Path) -> str:
    """openai if the first line that is a JSON object has a key of an OpenAI batch line, else native."""
    for _, text in _lines(path):
        if isinstance(text, Unreadable):
            continue
        try:
            payload = json.loads(text)
        except (ValueError, RecursionError):
            continue
        if isinstance(payload, dict):
            return "native" if _OPENAI_KEYS.isdisjoint(payload) else "openai"
    return "native"


def _resolve_format(fmt: str, path: Path) -> str:
    if fmt not in FORMATS:
        raise FedrecError(f"--format must be {', '.join(FORMATS[:-1])} or {FORMATS[-1]}, got {fmt!r}")
    return _detect_format(path) if fmt == "auto" else fmt


def _items(path: Path, fmt: str) -> Iterator[tuple[int, str | Unreadable]]:
    """`_lines`, where in an openai job a line repeating an earlier line's custom_id becomes `Unreadable`.

    Only a 16-byte hash of each custom_id is kept, so memory stays small for any input.
    """
    first: dict[bytes, int] = {}
    for number, text in _lines(path):
        if fmt == "openai" and isinstance(text, str):
            try:
                payload = json.loads(text)
            except (ValueError, RecursionError):
                payload = None
            custom_id = _valid_custom_id(payload.get("custom_id")) if isinstance(payload, dict) else None
            if custom_id is not None:
                key = hashlib.blake2b(custom_id.encode("utf-8"), digest_size=16).digest()
                if key in first:
                    text = Unreadable(
                        f"custom_id {show_ids([custom_id])[1:-1]} is also on line {first[key]}; custom_ids must be unique in a "
                        "batch (results are matched to requests by it), so give this line its own custom_id",
                        text[:_PREVIEW_CHARS], "duplicate_custom_id", custom_id,
                    )
                else:
                    first[key] = number
        yield number, text


def _chunks(lines: Iterable[tuple[int, str | Unreadable]], size: int) -> Iterator[list[tuple[int, str | Unreadable]]]:
    chunk: list[tuple[int, str | Unreadable]] = []
    for line in lines:
        chunk.append(line)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _append(path: Path, lines: list[str], digest: Any, expected: int) -> int:
    """Append lines with one write and fsync, feeding them to `digest`; return the new file size.

    Raises:
        FedrecError: the file was not `expected` bytes long, so something else changed it during the job.
    """
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        found = os.fstat(fd).st_size
        if found != expected:
            raise FedrecError(
                f"{path} changed while the job ran: it is {found:,} bytes, the job wrote {expected:,}; "
                "stop whatever else writes to it, then delete the output and its progress file and start over"
            )
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        digest.update(data)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def _truncate(path: Path, size: int) -> None:
    """Cut `path` back to `size` bytes (the torn tail of a crashed chunk); never extends it."""
    if path.exists() and path.stat().st_size > size:
        with path.open("r+b") as handle:
            handle.truncate(size)
            os.fsync(handle.fileno())


def _verify(path: Path, what: str, size: int, sha256: str, progress_path: Path, start_over: str) -> Any:
    """Check that `path` starts with the `size` bytes the progress file recorded, cut off any torn tail after them,
    and return the hash of those bytes to go on feeding."""
    if not path.exists():
        if size:
            raise FedrecError(
                f"{what} {path} is missing, but {progress_path} records {size:,} bytes written there; "
                f"restore the file, or {start_over}"
            )
        return hashlib.sha256()
    found = path.stat().st_size
    if found < size:
        raise FedrecError(
            f"{what} {path} is {found:,} bytes, but {progress_path} records {size:,} bytes written there "
            f"(it was cut short or replaced); restore the file, or {start_over}"
        )
    digest = prefix_digest(path, size)
    if digest.hexdigest() != sha256:
        raise FedrecError(
            f"{what} {path} no longer holds what the job wrote: its first {size:,} bytes hash to sha256 "
            f"{digest.hexdigest()[:16]}…, {progress_path} records {sha256[:16]}… (it was edited or replaced); "
            f"restore the file, or {start_over}"
        )
    _truncate(path, size)
    return digest


@dataclass(frozen=True)
class _Paths:
    """The files of one job, all named after its output."""

    output: Path
    errors: Path
    progress: Path
    lock: Path
    shards: Path

    @classmethod
    def of(cls, output: Path, errors: Path | None) -> _Paths:
        progress, lock, shards = (output.with_name(output.name + suffix) for suffix in (".progress.json", ".lock", ".shards"))
        return cls(output, errors or output.with_name(output.name + ".errors.jsonl"), progress, lock, shards)

    @property
    def start_over(self) -> str:
        return f"delete {self.output}, {self.errors} and {self.progress} to start the job over"


def _load_saved(job: JobProgress, paths: _Paths, others: Sequence[tuple[str, Path]] = ()) -> JobProgress | None:
    """The progress file of this job, or None when there is none yet (then no output may exist either).

    Raises:
        FedrecError: an output exists without a progress file, or the progress file is unreadable or another job's.
    """
    if not paths.progress.exists():
        for what, path in (("--output", paths.output), ("--errors", paths.errors)):
            if path.exists() and path.stat().st_size:
                raise FedrecError(f"{path} exists but has no progress file {paths.progress.name}; choose another {what} or remove it")
        for what, path in others:
            if path.exists():
                raise FedrecError(f"{what} {path} exists but has no progress file {paths.progress.name}; remove it, or choose another --output")
        return None
    try:
        saved = JobProgress.model_validate_json(paths.progress.read_bytes())
    except (ValidationError, OSError) as exc:
        reason = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else exc.strerror
        raise FedrecError(f"{paths.progress} is not a progress file fedrec can read ({reason}); {paths.start_over}") from None
    if saved.output_sha256 is None or saved.errors_sha256 is None:
        raise FedrecError(
            f"{paths.progress} records no checksums (an older fedrec wrote it), so {paths.output} cannot be checked "
            f"before resuming; {paths.start_over}"
        )
    differs = [k for k in _JOB_FIELDS if getattr(saved, k) != getattr(job, k)]
    if differs:
        raise FedrecError(
            f"{paths.output} belongs to a job with a different {', '.join(differs)}; rerun with the same input, "
            f"config and --batch-size (and --errors, --run, --format, --engine, --shard-size) to resume, or choose another --output"
        )
    return saved


def _resume(job: JobProgress, paths: _Paths) -> tuple[JobProgress, Any, Any]:
    """The local job's state and the running hashes of both files, after checking them against the progress file."""
    saved = _load_saved(job, paths)
    if saved is None:
        return job, hashlib.sha256(), hashlib.sha256()
    out = _verify(paths.output, "--output", saved.output_bytes, saved.output_sha256, paths.progress, paths.start_over)
    err = _verify(paths.errors, "--errors", saved.errors_bytes, saved.errors_sha256, paths.progress, paths.start_over)
    return saved, out, err


def _check_paths(input_path: Path, paths: dict[str, Path], folders: frozenset[str] | set[str] = frozenset()) -> None:
    """Refuse output paths that collide, are not plain writable files (or folders, for the names in `folders`), or lie
    where no folder can be made, before any model work (parent folders are created)."""
    seen = {input_path.resolve(): "--input"}
    for what, path in paths.items():
        key = path.resolve()
        if key in seen:
            raise FedrecError(f"{what} {path} is the same file as {seen[key]}; give each its own path")
        seen[key] = what
    for what, path in paths.items():
        check_writable(path, what, folder=what in folders)


def _touch(path: Path, what: str) -> None:
    """Create `path` if needed, so an unwritable file fails now rather than after the first chunk."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644))
    except OSError as exc:
        raise FedrecError(f"cannot write {what} {path}: {exc.strerror}; choose a writable path") from None


def _save(progress_path: Path, state: JobProgress) -> None:
    try:
        write_json(progress_path, state.model_dump(mode="json"))
    except OSError as exc:
        raise FedrecError(f"cannot write the progress file {progress_path}: {exc.strerror}; choose a writable --output folder") from None


@contextmanager
def _exclusive(lock_path: Path, output_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path` for the body; fail at once if another job holds it."""
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise FedrecError(f"cannot create the lock file {lock_path}: {exc.strerror}; choose a writable --output folder") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FedrecError(
                f"another job holds {lock_path} and is writing {output_path}; wait for it to finish, or choose another --output"
            ) from None
        yield
    finally:
        # Closing releases the lock. The file stays: unlinking it could let two jobs lock different files.
        os.close(fd)


def _check_input(input_path: Path, batch_size: int) -> None:
    if not input_path.is_file():
        state = "is not a regular file" if input_path.exists() else "does not exist"
        raise FedrecError(f"--input {input_path} {state}; pass a JSONL file of requests")
    if batch_size < 1:
        raise FedrecError(f"--batch-size must be >= 1, got {batch_size}")


def _job(cfg: FedrecConfig, input_path: Path, paths: _Paths, *, batch_size: int, run: Path | None, fmt: str, engine: str,
         shard_size: int = 0) -> JobProgress:
    """The identity of a job, as its progress file records it."""
    return JobProgress(
        input=str(input_path.resolve()), input_sha256=file_digest(input_path), batch_size=batch_size,
        config_sha256=hashlib.sha256(cfg.model_dump_json().encode()).hexdigest(),
        run=str(run) if run is not None else "auto", errors=str(paths.errors.resolve()), engine=engine, format=fmt,
        shard_size=shard_size,
    )


def _id_seed(job: JobProgress) -> str:
    return f"{job.input_sha256}:{job.config_sha256}"


def run_job(
    cfg: FedrecConfig, input_path: Path, output_path: Path, *, errors_path: Path | None = None, batch_size: int = 16,
    progress: bool = False, run: Path | None = None, fmt: str = "auto",
) -> Summary:
    """Rerank every request in `input_path`, resuming a previous run of the same job.

    Candidates come from `run` (a `fedrec train` folder; default: the newest one for this config), else from
    zero-shot text retrieval. `fmt` is the line format (`FORMATS`). While it runs the job holds `<output>.lock`.

    Raises:
        FedrecError: the input is missing; an output path is unusable; another job holds the output; or the output
            belongs to a different job or no longer matches its progress file.
        LLMError: the backend failed; everything up to the last finished chunk is kept.
    """
    from pipeline.ui import rate_progress

    _check_input(input_path, batch_size)
    paths = _Paths.of(output_path, errors_path)
    _check_paths(input_path, {"--output": paths.output, "--errors": paths.errors, "the progress file": paths.progress,
                              "the lock file": paths.lock})
    fmt = _resolve_format(fmt, input_path)
    with _exclusive(paths.lock, paths.output):
        job = _job(cfg, input_path, paths, batch_size=batch_size, run=run, fmt=fmt, engine="local")
        state, out_digest, err_digest = _resume(job, paths)
        _touch(paths.output, "--output")
        _touch(paths.errors, "--errors")
        state.output_sha256, state.errors_sha256 = out_digest.hexdigest(), err_digest.hexdigest()
        _save(paths.progress, state)
        total = sum(1 for _ in _lines(input_path))
        summary = Summary(skipped=min(total, state.chunks_done * batch_size))
        worker: BatchReranker | None = None
        start = time.perf_counter()
        with rate_progress("rows", enabled=progress) as bar:
            task = bar.add_task("rerank", total=total, completed=summary.skipped)
            for index, chunk in enumerate(_chunks(_items(input_path, fmt), batch_size)):
                if index < state.chunks_done:
                    continue
                worker = worker or BatchReranker(cfg, run, fmt=fmt, batch_size=batch_size, id_seed=_id_seed(job))
                results, errors = worker.process(chunk)
                state.output_bytes = _append(paths.output, [_dumps(r) for r in results], out_digest, state.output_bytes)
                state.errors_bytes = _append(paths.errors, [_dumps(e) for e in errors], err_digest, state.errors_bytes)
                state.output_sha256, state.errors_sha256 = out_digest.hexdigest(), err_digest.hexdigest()
                state.chunks_done = index + 1
                state.ok += len(results)
                state.failed += len(errors)
                summary.ok += len(results)
                summary.failed += len(errors)
                _save(paths.progress, state)
                bar.advance(task, len(chunk))
        state.complete = True
        _save(paths.progress, state)
    summary.seconds = time.perf_counter() - start
    return summary


def _import_ray():  # noqa: ANN202 - the ray module
    try:
        import ray
        import ray.data  # noqa: F401 - needs pyarrow, which plain ray lacks
    except ImportError as exc:
        raise ImportError(f"--engine ray needs Ray Data ({exc}); install the batch extra: pip install -e '.[batch]'") from None
    return ray


_JOIN_HINT = "start it with `ray start --head --port=6379` on the head node, then pass --ray-address <head>:6379 (or set RAY_ADDRESS)"


def _check_reachable(address: str | None) -> None:
    """Fail at once where Ray would retry for minutes: a `host:port` cluster address that accepts no connection."""
    import socket

    host, sep, port = (address or "").removeprefix("ray://").rpartition(":")
    if not (host and sep and port.isdigit()):
        return  # no address (a local Ray is started), or `auto`: Ray finds the cluster itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:
        raise FedrecError(f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); {_JOIN_HINT}") from None


@contextmanager
def _ray_session(ray: Any, address: str | None) -> Iterator[None]:
    """Join the Ray cluster at `address` (default: $RAY_ADDRESS, else a new local one) unless Ray is already running here.

    The job's FEDREC_* and HF_* variables travel to the workers, so they read the same cache, data and model settings.
    """
    if ray.is_initialized():
        yield
        return
    env = {key: value for key, value in os.environ.items() if key.startswith(("FEDREC_", "HF_"))}
    options: dict[str, Any] = {"runtime_env": {"env_vars": env}, "logging_level": logging.WARNING}
    if address is None and not os.environ.get("RAY_ADDRESS"):
        options["include_dashboard"] = False
    target = address or os.environ.get("RAY_ADDRESS")
    try:
        ray.init(address=address, **options)
    except (ConnectionError, TimeoutError, RuntimeError) as exc:
        raise FedrecError(f"cannot join the Ray cluster at {target or 'a new local Ray'}: {exc}; {_JOIN_HINT}") from None
    try:
        yield
    finally:
        ray.shutdown()


def _ray_failure(exc: BaseException) -> BaseException | None:
    """The fedrec error (`LLMError`, `FedrecError`) a Ray worker stopped with, found in the chain Ray wraps it in."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        cause = getattr(current, "cause", None)
        if isinstance(cause, (LLMError, FedrecError)):
            return cause
        if isinstance(current, (LLMError, FedrecError)) and not hasattr(current, "cause"):
            return current
        current = cause if isinstance(cause, BaseException) else current.__cause__
    return None


def _shard_file(folder: Path, index: int, part: str) -> Path:
    return folder / f"{index:06d}.{part}.jsonl"


def _write_synced(path: Path, data: bytes) -> None:
    """Write `path` atomically and fsync it, so a recorded shard survives a crash of the machine too."""
    with atomic_path(path) as tmp:
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())


def _intact(folder: Path, index: int, record: ShardRecord) -> bool:
    for part, sha256 in (("results", record.results_sha256), ("errors", record.errors_sha256)):
        path = _shard_file(folder, index, part)
        if not path.is_file() or file_digest(path) != sha256:
            log.warning("shard %d: %s is missing or changed since it was recorded; reranking the shard again", index, path)
            return False
    return True


def _join(paths: _Paths, state: JobProgress, shards: int) -> None:
    """Write the output and errors files from the shard files in input order, then record the job complete.

    Raises:
        FedrecError: a shard file changed after it was recorded (a rerun reranks that shard).
    """
    digests = {"results": hashlib.sha256(), "errors": hashlib.sha256()}
    with atomic_path(paths.output) as results_tmp, atomic_path(paths.errors) as errors_tmp:
        with results_tmp.open("wb") as results, errors_tmp.open("wb") as errors:
            for index in range(shards):
                record = state.shards[index]
                for part, handle, sha256 in (("results", results, record.results_sha256), ("errors", errors, record.errors_sha256)):
                    path = _shard_file(paths.shards, index, part)
                    data = path.read_bytes()
                    if hashlib.sha256(data).hexdigest() != sha256:
                        raise FedrecError(f"{path} changed after it was recorded; rerun the same command to rerank that shard")
                    handle.write(data)
                    digests[part].update(data)
            for handle in (results, errors):
                handle.flush()
                os.fsync(handle.fileno())
    state.output_bytes, state.output_sha256 = paths.output.stat().st_size, digests["results"].hexdigest()
    state.errors_bytes, state.errors_sha256 = paths.errors.stat().st_size, digests["errors"].hexdigest()
    state.ok = sum(r.ok for r in state.shards.values())
    state.failed = sum(r.failed for r in state.shards.values())
    state.chunks_done = sum(-(-r.lines // state.batch_size) for r in state.shards.values())
    state.shards = {}
    state.complete = True
    _save(paths.progress, state)
    shutil.rmtree(paths.shards, ignore_errors=True)


def run_ray(
    cfg: FedrecConfig, input_path: Path, output_path: Path, *, errors_path: Path | None = None, batch_size: int = 16,
    shard_size: int | None = None, concurrency: int = 1, progress: bool = False, run: Path | None = None,
    fmt: str = "auto", address: str | None = None,
) -> Summary:
    """`run_job` on Ray Data: the same results and errors files, byte for byte, resumable by shard.

    The driver reads the input and writes every file; `concurrency` actors, each holding the model once, rerank one
    shard of `shard_size` lines (default `SHARD_BATCHES` batches) per call in batches of `batch_size`. Shards are written
    to `<output>.shards/` as they finish and joined into the output at the end. `address` is the Ray cluster to join
    (`host:6379`, or `auto`); by default $RAY_ADDRESS, else a local Ray is started, and stopped after the job. If Ray is
    already running in this process, that session is used.

    Raises:
        ImportError: Ray Data is not installed (the batch extra).
        FedrecError: as `run_job`; also a shard size that is not a multiple of `batch_size`, or a cluster out of reach.
        LLMError: the backend failed; every finished shard is kept.
    """
    from pipeline.ui import rate_progress

    ray = _import_ray()
    _check_input(input_path, batch_size)
    shard_size = shard_size if shard_size is not None else batch_size * SHARD_BATCHES
    if shard_size < 1 or shard_size % batch_size:
        lower = max(batch_size, shard_size - shard_size % batch_size)
        raise FedrecError(f"--shard-size must be a positive multiple of --batch-size ({batch_size}), got {shard_size}, so that "
                          f"shards hold whole batches; use {lower} or {lower + batch_size}")
    if concurrency < 1:
        raise FedrecError(f"--concurrency must be >= 1, got {concurrency}")
    if not ray.is_initialized():
        _check_reachable(address or os.environ.get("RAY_ADDRESS"))
    paths = _Paths.of(output_path, errors_path)
    _check_paths(input_path, {"--output": paths.output, "--errors": paths.errors, "the progress file": paths.progress,
                              "the lock file": paths.lock, "the shard folder": paths.shards}, folders={"the shard folder"})
    fmt = _resolve_format(fmt, input_path)
    start = time.perf_counter()
    with _exclusive(paths.lock, paths.output):
        job = _job(cfg, input_path, paths, batch_size=batch_size, run=run, fmt=fmt, engine="ray", shard_size=shard_size)
        saved = _load_saved(job, paths, [("the shard folder", paths.shards)])
        state = saved or job.model_copy(update={"output_sha256": "", "errors_sha256": ""})
        if state.complete:
            _verify(paths.output, "--output", state.output_bytes, state.output_sha256, paths.progress, paths.start_over)
            _verify(paths.errors, "--errors", state.errors_bytes, state.errors_sha256, paths.progress, paths.start_over)
            shutil.rmtree(paths.shards, ignore_errors=True)
            return Summary(skipped=sum(1 for _ in _lines(input_path)), seconds=time.perf_counter() - start)
        state.shards = {i: r for i, r in state.shards.items() if _intact(paths.shards, i, r)}
        _save(paths.progress, state)
        summary, pending, total, shards = Summary(), [], 0, 0
        for index, shard in enumerate(_chunks(_items(input_path, fmt), shard_size)):
            total, shards = total + len(shard), index + 1
            if index in state.shards:
                summary.skipped += len(shard)
            else:
                pending.append({"shard": index, "lines": _encode_shard(shard)})
        if pending:
            paths.shards.mkdir(exist_ok=True)
            with _ray_session(ray, address), rate_progress("rows", enabled=progress) as bar:
                context = ray.data.DataContext.get_current()
                context.enable_progress_bars = False  # the job's own bar counts rows
                context.print_on_execution_start = False
                context.raise_original_map_exception = True  # a worker's LLMError reaches the driver as itself
                logging.getLogger("ray.data").setLevel(logging.ERROR)  # its tuning tips and INFO lines would break up the bar
                task = bar.add_task("rerank", total=total, completed=summary.skipped)
                constructor = {"config": cfg.model_dump(mode="json"), "run": str(run) if run is not None else None,
                               "fmt": fmt, "batch_size": batch_size, "id_seed": _id_seed(job)}
                answered = ray.data.from_items(pending).map_batches(
                    BatchReranker, fn_constructor_kwargs=constructor, batch_size=1, batch_format="numpy",
                    compute=ray.data.ActorPoolStrategy(size=concurrency),
                )
                try:
                    for row in answered.iter_rows():
                        index, results, errors = int(row["shard"]), row["results"].encode("utf-8"), row["errors"].encode("utf-8")
                        _write_synced(_shard_file(paths.shards, index, "results"), results)
                        _write_synced(_shard_file(paths.shards, index, "errors"), errors)
                        record = ShardRecord(lines=int(row["lines"]), ok=int(row["ok"]), failed=int(row["failed"]),
                                             results_sha256=hashlib.sha256(results).hexdigest(),
                                             errors_sha256=hashlib.sha256(errors).hexdigest())
                        state.shards[index] = record
                        state.ok, state.failed = state.ok + record.ok, state.failed + record.failed
                        _save(paths.progress, state)
                        summary.ok += record.ok
                        summary.failed += record.failed
                        bar.advance(task, record.lines)
                except Exception as exc:
                    failure = _ray_failure(exc)
                    if failure is None:
                        raise
                    raise failure from None
        _join(paths, state, shards)
    summary.seconds = time.perf_counter() - start
    return summary
