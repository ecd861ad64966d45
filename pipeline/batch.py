"""Batch offline reranking: JSONL requests in, JSONL results out, resumable.

Input lines are processed in fixed chunks of `batch_size` consecutive lines. After each chunk
the results and errors are appended (one write each, then fsync) and a progress file records
how many chunks are done and the length and sha256 of both files. A rerun checks both files
against that record, truncates anything written after the last recorded chunk and continues from
there, so a crash loses at most the chunk in flight, lines are never torn, and the output is
byte-identical to an uninterrupted run. A file that is shorter than recorded, or whose recorded
bytes changed, is refused rather than resumed. A lock file beside the output keeps a second job
off the same output.

Every line that cannot become a request (too long, not UTF-8, not JSON, nested too deeply,
invalid fields, unknown ids) becomes an error row; only a failing LLM backend stops the job.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PlainValidator, StrictInt, ValidationError, model_validator

from pipeline.config import FedrecConfig
from pipeline.errors import FedrecError, check_id
from pipeline.io import check_writable, file_digest, prefix_digest, write_json
from pipeline.llm.base import LLMError

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 1 << 20
"""Longest input line read as a request; a request needs far less, and the bound keeps memory flat."""
_PREVIEW_CHARS = 500
_MAX_MESSAGE_CHARS = 1000


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


_JOB_FIELDS = ("input", "input_sha256", "batch_size", "config_sha256", "run", "errors")


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
    """An input line that cannot even be parsed: why, and what of it to show."""

    reason: str
    preview: str


def _row_error(line: int, raw: str, message: str) -> dict[str, Any]:
    if len(message) > _MAX_MESSAGE_CHARS:
        message = message[: _MAX_MESSAGE_CHARS - 1] + "…"
    return {"line": line, "error": message, "input": raw[:_PREVIEW_CHARS]}


def _parse(text: str) -> RerankRow:
    try:
        payload = json.loads(text)
    except RecursionError:
        # The C decoder guards its recursion, so this is safe to catch; a request is never deeper than 2.
        raise ValueError("invalid JSON: arrays or objects nested too deeply; a request is one object holding lists of ids") from None
    except json.JSONDecodeError:
        raise
    except ValueError:
        # Python refuses to read huge integers (a guard against quadratic-time parsing).
        raise ValueError(
            f"invalid JSON: a number has more than {sys.get_int_max_str_digits():,} digits; write long ids as strings"
        ) from None
    if not isinstance(payload, dict):
        raise ValueError(f"expected a JSON object, got {type(payload).__name__}")
    return RerankRow.model_validate(payload)


def _describe(exc: Exception) -> str:
    """The error-row message for a row that failed."""
    if isinstance(exc, json.JSONDecodeError):
        return f"invalid JSON: {exc.msg} at column {exc.colno}"
    if isinstance(exc, ValidationError):
        found = exc.errors()
        detail = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'row'}: {e['msg'].removeprefix('Value error, ')}" for e in found[:5]
        )
        return detail + (f"; and {len(found) - 5} more errors" if len(found) > 5 else "")
    if isinstance(exc, (ValueError, FedrecError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


class BatchReranker:
    """Reranks a batch of request lines; a callable class so Ray Data's `map_batches` can run it.

    Args:
        config: the experiment config (a `FedrecConfig` or its dict form, for Ray workers).
    """

    def __init__(self, config: FedrecConfig | dict, run: Path | str | None = None) -> None:
        from pipeline.recommender import Recommender

        cfg = config if isinstance(config, FedrecConfig) else FedrecConfig.model_validate(config)
        self.rec = Recommender.from_config(cfg, run=run if run is not None else "auto")
        self.reranker = self.rec.reranker()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`{"line": ints, "text": strings[, "problem": strings]}` → `{"line", "result", "error"}` (JSON strings, one empty)."""
        lines = batch["line"].tolist()
        texts = batch["text"].tolist()
        problems = batch["problem"].tolist() if "problem" in batch else [""] * len(lines)
        pairs = [(n, Unreadable(p, t) if p else t) for n, t, p in zip(lines, texts, problems, strict=True)]
        results, errors = self.process(pairs)
        by_line = {r["line"]: json.dumps(r, ensure_ascii=False) for r in results}
        failed = {e["line"]: json.dumps(e, ensure_ascii=False) for e in errors}
        return {
            "line": np.array(lines),
            "result": np.array([by_line.get(n, "") for n in lines], dtype=object),
            "error": np.array([failed.get(n, "") for n in lines], dtype=object),
        }

    def _request(self, row: RerankRow):  # noqa: ANN202 - pipeline.rerank.RerankRequest
        # A dataset user's whole history is the context (split=None): offline jobs rank what comes after everything known.
        return self.rec.request(user_id=row.user_id, history=row.history, candidates=row.candidates)

    def _rerank(self, valid: list[tuple[int, str, RerankRow, Any]]) -> tuple[list[tuple[Any, Any]], list[dict]]:
        """Rerank the valid rows together; if that fails for any reason but the backend, one at a time."""
        try:
            return list(zip(valid, self.reranker.rerank_batch([r for *_, r in valid]), strict=True)), []
        except LLMError:
            raise
        except Exception as exc:  # noqa: BLE001 - one row must not sink the rows batched with it
            log.warning("reranking lines %d..%d together failed (%s); retrying them one at a time", valid[0][0], valid[-1][0], exc)
        ranked, errors = [], []
        for entry in valid:
            try:
                ranked.append((entry, self.reranker.rerank_batch([entry[3]])[0]))
            except LLMError:
                raise
            except Exception as exc:  # noqa: BLE001 - the row becomes an error row, as for any bad row
                errors.append(_row_error(entry[0], entry[1], f"reranking failed: {_describe(exc)}"))
        return ranked, errors

    def process(self, lines: Sequence[tuple[int, str | Unreadable]]) -> tuple[list[dict], list[dict]]:
        """Results and errors for `(line number, text)` pairs; a bad row never stops the others.

        Raises:
            LLMError: the backend failed; then no row of `lines` is answered.
        """
        results, errors, valid = [], [], []
        for number, text in lines:
            if isinstance(text, Unreadable):
                errors.append(_row_error(number, text.preview, text.reason))
                continue
            try:
                row = _parse(text)
                valid.append((number, text, row, self._request(row)))
            except LLMError:
                raise
            except Exception as exc:  # noqa: BLE001 - any line may be hostile; each failure is an error row
                errors.append(_row_error(number, text, _describe(exc)))
        if valid:
            ranked, failed = self._rerank(valid)
            errors = sorted(errors + failed, key=lambda e: e["line"])
            cat = self.rec.dataset.catalog
            for (number, _, row, _), items in ranked:
                top = items[: row.k] if row.k else items
                results.append({
                    "id": row.id if row.id is not None else number,
                    "line": number,
                    "items": [
                        {"item_id": cat.item_id(x.item), "title": cat.label(x.item), "score": round(x.score, 6),
                         "llm_score": round(x.llm_score, 6), "retrieval_rank": x.retrieval_rank + 1}
                        for x in top
                    ],
                })
        return results, errors


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


def _chunks(path: Path, size: int) -> Iterator[list[tuple[int, str | Unreadable]]]:
    chunk: list[tuple[int, str | Unreadable]] = []
    for line in _lines(path):
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


def _resume(job: JobProgress, output_path: Path, errors_path: Path, progress_path: Path) -> tuple[JobProgress, Any, Any]:
    """The job's state and the running hashes of both files, after checking them against the progress file."""
    start_over = f"delete {output_path}, {errors_path} and {progress_path} to start the job over"
    if not progress_path.exists():
        for what, path in (("--output", output_path), ("--errors", errors_path)):
            if path.exists() and path.stat().st_size:
                raise FedrecError(f"{path} exists but has no progress file {progress_path.name}; choose another {what} or remove it")
        return job, hashlib.sha256(), hashlib.sha256()
    try:
        saved = JobProgress.model_validate_json(progress_path.read_bytes())
    except (ValidationError, OSError) as exc:
        reason = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else exc.strerror
        raise FedrecError(f"{progress_path} is not a progress file fedrec can read ({reason}); {start_over}") from None
    if saved.output_sha256 is None or saved.errors_sha256 is None:
        raise FedrecError(
            f"{progress_path} records no checksums (an older fedrec wrote it), so {output_path} cannot be checked "
            f"before resuming; {start_over}"
        )
    differs = [k for k in _JOB_FIELDS if getattr(saved, k) != getattr(job, k)]
    if differs:
        raise FedrecError(
            f"{output_path} belongs to a job with a different {', '.join(differs)}; rerun with the same input, "
            f"config and --batch-size (and --errors, --run) to resume, or choose another --output"
        )
    out = _verify(output_path, "--output", saved.output_bytes, saved.output_sha256, progress_path, start_over)
    err = _verify(errors_path, "--errors", saved.errors_bytes, saved.errors_sha256, progress_path, start_over)
    return saved, out, err


def _check_paths(input_path: Path, paths: dict[str, Path]) -> None:
    """Refuse output paths that collide, are not plain writable files, or lie where no folder can be made, before any
    model work (folders are created)."""
    seen = {input_path.resolve(): "--input"}
    for what, path in paths.items():
        key = path.resolve()
        if key in seen:
            raise FedrecError(f"{what} {path} is the same file as {seen[key]}; give each its own path")
        seen[key] = what
    for what, path in paths.items():
        check_writable(path, what)


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


def run_job(
    cfg: FedrecConfig, input_path: Path, output_path: Path, *, errors_path: Path | None = None, batch_size: int = 16,
    progress: bool = False, run: Path | None = None,
) -> Summary:
    """Rerank every request in `input_path`, resuming a previous run of the same job.

    Candidates come from `run` (a `fedrec train` folder; default: the newest one for this config), else from
    zero-shot text retrieval. While it runs the job holds `<output>.lock`.

    Raises:
        FedrecError: the input is missing; an output path is unusable; another job holds the output; or the output
            belongs to a different job or no longer matches its progress file.
        LLMError: the backend failed; everything up to the last finished chunk is kept.
    """
    from pipeline.ui import rate_progress

    if not input_path.is_file():
        state = "is not a regular file" if input_path.exists() else "does not exist"
        raise FedrecError(f"--input {input_path} {state}; pass a JSONL file of requests")
    if batch_size < 1:
        raise FedrecError(f"--batch-size must be >= 1, got {batch_size}")
    errors_path = errors_path or output_path.with_name(output_path.name + ".errors.jsonl")
    progress_path = output_path.with_name(output_path.name + ".progress.json")
    lock_path = output_path.with_name(output_path.name + ".lock")
    _check_paths(input_path, {"--output": output_path, "--errors": errors_path, "the progress file": progress_path,
                              "the lock file": lock_path})
    with _exclusive(lock_path, output_path):
        job = JobProgress(
            input=str(input_path.resolve()), input_sha256=file_digest(input_path), batch_size=batch_size,
            config_sha256=hashlib.sha256(cfg.model_dump_json().encode()).hexdigest(),
            run=str(run) if run is not None else "auto", errors=str(errors_path.resolve()),
        )
        state, out_digest, err_digest = _resume(job, output_path, errors_path, progress_path)
        _touch(output_path, "--output")
        _touch(errors_path, "--errors")
        state.output_sha256, state.errors_sha256 = out_digest.hexdigest(), err_digest.hexdigest()
        _save(progress_path, state)
        total = sum(1 for _ in _lines(input_path))
        summary = Summary(skipped=min(total, state.chunks_done * batch_size))
        worker: BatchReranker | None = None
        start = time.perf_counter()
        with rate_progress("rows", enabled=progress) as bar:
            task = bar.add_task("rerank", total=total, completed=summary.skipped)
            for index, chunk in enumerate(_chunks(input_path, batch_size)):
                if index < state.chunks_done:
                    continue
                worker = worker or BatchReranker(cfg, run)
                results, errors = worker.process(chunk)
                state.output_bytes = _append(output_path, [json.dumps(r, ensure_ascii=False) for r in results], out_digest,
                                             state.output_bytes)
                state.errors_bytes = _append(errors_path, [json.dumps(e, ensure_ascii=False) for e in errors], err_digest,
                                             state.errors_bytes)
                state.output_sha256, state.errors_sha256 = out_digest.hexdigest(), err_digest.hexdigest()
                state.chunks_done = index + 1
                state.ok += len(results)
                state.failed += len(errors)
                summary.ok += len(results)
                summary.failed += len(errors)
                _save(progress_path, state)
                bar.advance(task, len(chunk))
        state.complete = True
        _save(progress_path, state)
    summary.seconds = time.perf_counter() - start
    return summary


def run_ray(cfg: FedrecConfig, input_path: Path, output_dir: Path, *, batch_size: int = 16, concurrency: int = 1,
            run: Path | None = None) -> None:
    """The same reranker under Ray Data's `map_batches`, for jobs larger than one machine (not resumable)."""
    try:
        import ray.data
    except ImportError:
        raise ImportError("--engine ray needs Ray Data; install it with `pip install 'ray[data]'`") from None
    items = [
        {"line": n, "text": t.preview, "problem": t.reason} if isinstance(t, Unreadable) else {"line": n, "text": t, "problem": ""}
        for n, t in _lines(input_path)
    ]
    dataset = ray.data.from_items(items)
    out = dataset.map_batches(
        BatchReranker, fn_constructor_kwargs={"config": cfg.model_dump(mode="json"), "run": str(run) if run else None}, batch_size=batch_size,
        concurrency=concurrency, batch_format="numpy",
    )
    out.write_json(str(output_dir))
