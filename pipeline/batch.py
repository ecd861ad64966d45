"""Batch offline reranking: JSONL requests in, JSONL results out, resumable.

Input lines are processed in fixed chunks of `batch_size` consecutive lines. After each chunk
the results and errors are appended (one write each, then fsync) and a progress file records
how many chunks are done and how long both files were. A rerun truncates anything written after
the last recorded chunk and continues from there, so a crash loses at most the chunk in flight,
lines are never torn, and the output is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from pipeline.config import FedrecConfig
from pipeline.errors import FedrecError
from pipeline.io import file_digest, write_json


class RerankRow(BaseModel):
    """One request line."""

    model_config = ConfigDict(extra="forbid")

    id: str | int | None = None
    """Caller's id, echoed back (default: the line number)."""
    user_id: str | int | None = None
    """A user of the dataset; their whole history is used unless `history` is given."""
    history: list[str | int] | None = None
    """Item ids the user interacted with, oldest first."""
    candidates: list[str | int] | None = None
    """Item ids to rerank; retrieved from the index when absent."""
    k: int | None = None
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


def _row_error(line: int, raw: str, message: str) -> dict[str, Any]:
    return {"line": line, "error": message, "input": raw[:500]}


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
        """`{"line": ints, "text": strings}` → `{"line", "result", "error"}` (JSON strings, one empty)."""
        results, errors = self.process(list(zip(batch["line"].tolist(), batch["text"].tolist(), strict=True)))
        by_line = {r["line"]: json.dumps(r, ensure_ascii=False) for r in results}
        failed = {e["line"]: json.dumps(e, ensure_ascii=False) for e in errors}
        lines = batch["line"].tolist()
        return {
            "line": np.array(lines),
            "result": np.array([by_line.get(n, "") for n in lines], dtype=object),
            "error": np.array([failed.get(n, "") for n in lines], dtype=object),
        }

    def _request(self, row: RerankRow):  # noqa: ANN202 - pipeline.rerank.RerankRequest
        from pipeline.rerank import RerankRequest
        from retrieval import Candidate, Query

        data, cat = self.rec.dataset, self.rec.dataset.catalog
        ratings, client = None, 0
        if row.history is not None:
            history = [cat.index_of(i) for i in row.history]
            unknown = [i for i, idx in zip(row.history, history, strict=True) if idx is None]
            if unknown:
                raise ValueError(f"history has item ids not in the catalogue: {unknown[:5]}")
        else:
            user = data.user_index(row.user_id)
            history, ratings = data.sequences[user].tolist(), data.ratings[user]
            client = int(self.rec.client_of[user])
        profile = self.rec.text_profile(history, ratings)
        query = Query(tuple(history), profile, client)
        if row.candidates is None:
            found = self.rec.retriever.retrieve(query, self.rec.cfg.retrieval.num_candidates)
        else:
            idx = [cat.index_of(i) for i in row.candidates]
            unknown = [i for i, j in zip(row.candidates, idx, strict=True) if j is None]
            if unknown:
                raise ValueError(f"candidates has item ids not in the catalogue: {unknown[:5]}")
            scores = self.rec.retriever.score_items(query, idx)
            found = [Candidate(int(i), float(s)) for i, s in zip(idx, scores, strict=True)]
        from prompts import labels_for

        labels_for(len(found), self.rec.cfg.rerank.label_set)
        return RerankRequest(profile, tuple(history), tuple(found))

    def process(self, lines: list[tuple[int, str]]) -> tuple[list[dict], list[dict]]:
        """Results and errors for `(line number, text)` pairs; a bad row never stops the others."""
        results, errors, valid = [], [], []
        for number, text in lines:
            try:
                payload = json.loads(text)
                if not isinstance(payload, dict):
                    raise ValueError(f"expected a JSON object, got {type(payload).__name__}")
                row = RerankRow.model_validate(payload)
                valid.append((number, row, self._request(row)))
            except json.JSONDecodeError as exc:
                errors.append(_row_error(number, text, f"invalid JSON: {exc.msg} at column {exc.colno}"))
            except ValidationError as exc:
                detail = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'row'}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors())
                errors.append(_row_error(number, text, detail))
            except (ValueError, FedrecError) as exc:
                errors.append(_row_error(number, text, str(exc)))
        if valid:
            ranked = self.reranker.rerank_batch([r for _, _, r in valid])
            cat = self.rec.dataset.catalog
            for (number, row, _), items in zip(valid, ranked, strict=True):
                top = items[: row.k] if row.k else items
                results.append({
                    "id": row.id if row.id is not None else number,
                    "line": number,
                    "items": [
                        {"item_id": cat.item_ids[x.item].item(), "title": cat.label(x.item), "score": round(x.score, 6),
                         "llm_score": round(x.llm_score, 6), "retrieval_rank": x.retrieval_rank + 1}
                        for x in top
                    ],
                })
        return results, errors


def _chunks(path: Path, size: int) -> Iterator[list[tuple[int, str]]]:
    chunk: list[tuple[int, str]] = []
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            chunk.append((number, text.rstrip("\n")))
            if len(chunk) == size:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def _append(path: Path, lines: list[str]) -> int:
    """Append lines with one write and fsync; return the new file size."""
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        if data:
            os.write(fd, data)
        os.fsync(fd)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def _truncate(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size != size:
        with path.open("r+b") as handle:
            handle.truncate(size)


def run_job(
    cfg: FedrecConfig, input_path: Path, output_path: Path, *, errors_path: Path | None = None, batch_size: int = 16,
    progress: bool = False, run: Path | None = None,
) -> Summary:
    """Rerank every request in `input_path`, resuming a previous run of the same job.

    Candidates come from `run` (a `fedrec train` folder; default: the newest one for this config), else from
    zero-shot text retrieval.

    Raises:
        FedrecError: the input is missing, or the output belongs to a different job.
        LLMError: the backend failed; everything up to the last finished chunk is kept.
    """
    from pipeline.ui import rate_progress

    if not input_path.is_file():
        raise FedrecError(f"--input {input_path} does not exist")
    errors_path = errors_path or output_path.with_name(output_path.name + ".errors.jsonl")
    progress_path = output_path.with_name(output_path.name + ".progress.json")
    job = {
        "input": str(input_path.resolve()), "input_sha256": file_digest(input_path), "batch_size": batch_size,
        "config_sha256": hashlib.sha256(cfg.model_dump_json().encode()).hexdigest(),
        "run": str(run) if run is not None else "auto",
    }
    state = {"chunks_done": 0, "output_bytes": 0, "errors_bytes": 0, "ok": 0, "failed": 0}
    if progress_path.is_file():
        saved = json.loads(progress_path.read_text())
        differs = [k for k in job if saved.get(k) != job[k]]
        if differs:
            raise FedrecError(
                f"{output_path} belongs to a job with a different {', '.join(differs)}; rerun with the same input, "
                f"config and --batch-size to resume, or choose another --output"
            )
        state.update({k: saved[k] for k in state})
        _truncate(output_path, state["output_bytes"])
        _truncate(errors_path, state["errors_bytes"])
    elif output_path.exists() and output_path.stat().st_size:
        raise FedrecError(f"{output_path} exists but has no progress file {progress_path.name}; choose another --output or remove it")
    output_path.parent.mkdir(parents=True, exist_ok=True)
    total = sum(1 for line in input_path.open(encoding="utf-8", errors="replace") if line.strip())
    summary = Summary(skipped=min(total, state["chunks_done"] * batch_size))
    worker: BatchReranker | None = None
    start = time.perf_counter()
    with rate_progress("rows", enabled=progress) as bar:
        task = bar.add_task("rerank", total=total, completed=summary.skipped)
        for index, chunk in enumerate(_chunks(input_path, batch_size)):
            if index < state["chunks_done"]:
                continue
            worker = worker or BatchReranker(cfg, run)
            results, errors = worker.process(chunk)
            state["output_bytes"] = _append(output_path, [json.dumps(r, ensure_ascii=False) for r in results])
            state["errors_bytes"] = _append(errors_path, [json.dumps(e, ensure_ascii=False) for e in errors])
            state["chunks_done"] = index + 1
            state["ok"] += len(results)
            state["failed"] += len(errors)
            summary.ok += len(results)
            summary.failed += len(errors)
            write_json(progress_path, {**job, **state, "complete": False})
            bar.advance(task, len(chunk))
    write_json(progress_path, {**job, **state, "complete": True})
    summary.seconds = time.perf_counter() - start
    return summary


def run_ray(cfg: FedrecConfig, input_path: Path, output_dir: Path, *, batch_size: int = 16, concurrency: int = 1,
            run: Path | None = None) -> None:
    """The same reranker under Ray Data's `map_batches`, for jobs larger than one machine (not resumable)."""
    try:
        import ray.data
    except ImportError:
        raise ImportError("--engine ray needs Ray Data; install it with `pip install 'ray[data]'`") from None
    lines = [(n, t) for chunk in _chunks(input_path, batch_size) for n, t in chunk]
    dataset = ray.data.from_items([{"line": n, "text": t} for n, t in lines])
    out = dataset.map_batches(
        BatchReranker, fn_constructor_kwargs={"config": cfg.model_dump(mode="json"), "run": str(run) if run else None}, batch_size=batch_size,
        concurrency=concurrency, batch_format="numpy",
    )
    out.write_json(str(output_dir))
