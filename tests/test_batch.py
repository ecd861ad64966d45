"""The batch reranking job: resumable, byte-identical, bad rows recorded, server failures clean, OpenAI batch lines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

from pipeline.batch import OPENAI_URL, run_job
from pipeline.config import load_config
from pipeline.errors import FedrecError
from pipeline.llm.base import LLMError
from pipeline.llm.openai_backend import OpenAIBackend

TINY = REPO / "configs" / "tiny.yaml"


def _config(tiny_llama: Path, *extra: str):
    return load_config(TINY, [f"llm.model={tiny_llama}", "rerank.fusion_weight=0.5", "retrieval.num_candidates=8", *extra])


def _requests(path: Path, n: int = 24) -> Path:
    rows = [json.dumps({"id": f"r{i}", "user_id": i + 1, "k": 5}) for i in range(n)]
    rows[3] = "{not json"
    rows[7] = json.dumps({"id": "ghost", "user_id": 999999})
    rows[11] = json.dumps({"id": "empty", "history": [1, 2], "candidates": []})
    rows[15] = json.dumps({"id": "wide", "history": [1], "candidates": list(range(1, 31))})
    rows[19] = json.dumps({"id": "adhoc", "history": [1, 50, 181], "candidates": [100, 258, 286, 288, 294], "k": 3})
    path.write_text("\n".join(rows) + "\n")
    return path


def test_bad_rows_are_recorded_and_the_job_goes_on(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    summary = run_job(_config(tiny_llama), _requests(tmp_path / "in.jsonl"), out, batch_size=5)
    assert (summary.ok, summary.failed) == (20, 4)
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in results] == [n for n in range(1, 25) if n not in (4, 8, 12, 16)]
    adhoc = next(r for r in results if r["id"] == "adhoc")
    assert len(adhoc["items"]) == 3 and {i["item_id"] for i in adhoc["items"]} <= {100, 258, 286, 288, 294}
    errors = {e["line"]: e["error"] for e in map(json.loads, (tmp_path / "out.jsonl.errors.jsonl").read_text().splitlines())}
    assert errors[4].startswith("invalid JSON")
    assert "user 999999 is not in ml-100k" in errors[8]
    assert "candidates is empty" in errors[12]
    assert "candidates must be 1..26 for labels A..Z, got 30" in errors[16]
    again = run_job(_config(tiny_llama), tmp_path / "in.jsonl", out, batch_size=5)
    assert (again.ok, again.failed, again.skipped) == (0, 0, 24)


def test_a_different_job_cannot_resume_into_the_output(tiny_llama: Path, tmp_path: Path) -> None:
    inp, out = _requests(tmp_path / "in.jsonl", 24), tmp_path / "out.jsonl"
    run_job(_config(tiny_llama), inp, out, batch_size=3)
    with pytest.raises(FedrecError, match=r"different batch_size; rerun with the same input, config and --batch-size"):
        run_job(_config(tiny_llama), inp, out, batch_size=2)
    with pytest.raises(FedrecError, match=r"does not exist"):
        run_job(_config(tiny_llama), tmp_path / "missing.jsonl", tmp_path / "o2.jsonl")


def _cli(tiny_llama: Path, inp: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "rerank", "-i", str(inp), "-o", str(out), "-c", str(TINY),
            "--batch-size", "2", "--set", f"llm.model={tiny_llama}", "--set", "rerank.fusion_weight=0.5",
            "--set", "retrieval.num_candidates=8"]


def test_resume_after_kill_is_byte_identical(tiny_llama: Path, tmp_path: Path) -> None:
    inp = _requests(tmp_path / "in.jsonl", 30)
    whole, killed = tmp_path / "whole.jsonl", tmp_path / "killed.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(_cli(tiny_llama, inp, whole), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr + done.stdout
    proc = subprocess.Popen(_cli(tiny_llama, inp, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = killed.with_name(killed.name + ".progress.json")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if progress.exists() and json.loads(progress.read_text() or "{}").get("chunks_done", 0) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the job finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads(progress.read_text())["complete"] is False
    with killed.open("a") as handle:
        handle.write('{"id": "torn')  # what a crash mid-write would leave
    resumed = subprocess.run(_cli(tiny_llama, inp, killed), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    assert "skipped (already done)" in resumed.stdout
    assert killed.read_bytes() == whole.read_bytes()
    assert (tmp_path / "killed.jsonl.errors.jsonl").read_bytes() == (tmp_path / "whole.jsonl.errors.jsonl").read_bytes()


def test_server_down_retries_then_fails_cleanly(tiny_llama: Path, tmp_path: Path) -> None:
    backend = OpenAIBackend("http://127.0.0.1:9/v1", tokenizer=str(tiny_llama), max_retries=2, backoff_s=0.01, timeout_s=2)
    with pytest.raises(LLMError, match=r"failed after 3 attempts .* is the server running at llm\.base_url"):
        backend.score_labels([[{"role": "user", "content": "hi"}]], ["A", "B"])
    cfg = _config(tiny_llama, "llm.backend=openai", "llm.base_url=http://127.0.0.1:9/v1", "llm.max_retries=1", "llm.timeout_s=2")
    out = tmp_path / "out.jsonl"
    with pytest.raises(LLMError):
        run_job(cfg, _requests(tmp_path / "in.jsonl", 24), out, batch_size=3)
    assert not out.exists() or out.read_text() == ""
    progress = json.loads((tmp_path / "out.jsonl.progress.json").read_text()) if (tmp_path / "out.jsonl.progress.json").exists() else {"chunks_done": 0}
    assert progress["chunks_done"] == 0


def test_missing_server_flags_are_named() -> None:
    text = '{"error":{"message":"You must set `--enable-prompt-embeds` to input `prompt_embeds`.","code":400}}'
    assert "start the server with --enable-prompt-embeds" in OpenAIBackend._explain("u", 400, text)
    text = '{"error":{"message":"Requested sample logprobs of 21, which is greater than max allowed: 20"}}'
    assert "--max-logprobs" in OpenAIBackend._explain("u", 400, text)


def _openai_lines(native: Path) -> list[str]:
    """The requests of a native input as OpenAI batch lines (custom_id from id); lines that are not JSON stay as they are."""
    lines = []
    for text in native.read_text().splitlines():
        try:
            row = json.loads(text)
        except json.JSONDecodeError:
            lines.append(text)
            continue
        lines.append(json.dumps({"custom_id": row.pop("id"), "method": "POST", "url": OPENAI_URL, "body": row}))
    return lines


def _openai(custom_id: object = "x", body: object = None, **fields: object) -> str:
    line = {"custom_id": custom_id, "method": "POST", "url": OPENAI_URL, "body": {"user_id": 1, "k": 2} if body is None else body}
    return json.dumps({key: value for key, value in {**line, **fields}.items() if value is not ...})


def test_openai_batch_lines_round_trip(tiny_llama: Path, tmp_path: Path) -> None:
    native = _requests(tmp_path / "native.jsonl", 20)
    batch = tmp_path / "batch.jsonl"
    batch.write_text("\n".join(_openai_lines(native)) + "\n")
    native_out, batch_out = tmp_path / "native-out.jsonl", tmp_path / "batch-out.jsonl"
    run_job(_config(tiny_llama), native, native_out, batch_size=5)
    summary = run_job(_config(tiny_llama), batch, batch_out, batch_size=5)
    assert (summary.ok, summary.failed) == (16, 4)
    expected = [json.loads(line) for line in native_out.read_text().splitlines()]
    got = [json.loads(line) for line in batch_out.read_text().splitlines()]
    assert [r["response"]["body"] for r in got] == expected
    assert all(set(r) == {"id", "custom_id", "response", "error"} and r["error"] is None and r["response"]["status_code"] == 200
               and r["custom_id"] == r["response"]["body"]["id"] for r in got)
    ids = [r["id"] for r in got] + [r["response"]["request_id"] for r in got]
    assert len(set(ids)) == 32 and all(i.startswith(("batch_req_", "req_")) for i in ids)
    native_errors = {e["line"]: e["error"] for e in map(json.loads, (tmp_path / "native-out.jsonl.errors.jsonl").read_text().splitlines())}
    batch_errors = {e["error"]["line"]: e for e in map(json.loads, (tmp_path / "batch-out.jsonl.errors.jsonl").read_text().splitlines())}
    assert sorted(batch_errors) == sorted(native_errors) == [4, 8, 12, 16]
    for line, message in native_errors.items():
        row = batch_errors[line]
        assert set(row) == {"id", "custom_id", "response", "error"} and row["response"] is None
        assert row["error"]["message"] in (message, "body" + message.removeprefix("row"))
    assert (batch_errors[4]["custom_id"], batch_errors[4]["error"]["code"]) == (None, "invalid_json")
    assert (batch_errors[8]["custom_id"], batch_errors[8]["error"]["code"]) == ("ghost", "invalid_request")
    assert json.loads((tmp_path / "batch-out.jsonl.progress.json").read_text())["format"] == "openai"


def test_bad_openai_rows_are_recorded_and_the_job_goes_on(tiny_llama: Path, tmp_path: Path) -> None:
    bad = [
        (_openai(custom_id=...), "invalid_batch_line", None, 'custom_id is missing; give every line a unique string id'),
        (_openai(custom_id=7), "invalid_batch_line", None, 'custom_id must be a string, got int 7; quote it'),
        (_openai("w", url="/v1/recommend"), "unsupported_url", "w", 'url must be "/v1/fedrec/rerank" for a fedrec request, got \'/v1/recommend\''),
        (_openai("u", url=...), "invalid_batch_line", "u", 'url is missing; add "url": "/v1/fedrec/rerank"'),
        (_openai("chat", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}, url="/v1/chat/completions"),
         "unsupported_url", "chat", "chat-completions request (url '/v1/chat/completions', body keys ['messages', 'model']), but "
         "fedrec reranks recommendation requests"),
        (_openai("chat2", {"messages": []}), "unsupported_url", "chat2", "run chat-completions batches with `vllm run-batch`"),
        (_openai("get", method="GET"), "invalid_batch_line", "get", 'method must be "POST", got \'GET\''),
        (_openai("list", [1, 2]), "invalid_batch_line", "list", "body must be a JSON object holding a fedrec request (user_id or "
         "history, candidates, k), got list"),
        (_openai("text", '{"user_id": 1}'), "invalid_batch_line", "text", "got str; put the object itself in body"),
        (_openai("k0", {"user_id": 1, "k": 0}), "invalid_request", "k0", "body: k must be >= 1, got 0"),
        (_openai("kb", {"user_id": 1, "k": True}), "invalid_request", "kb", "body.k: Input should be a valid integer"),
        (_openai("own", {"id": "mine", "user_id": 1}), "invalid_request", "own", "body.id: the custom_id is the id"),
        (_openai("gpt", {"model": "gpt-4o", "user_id": 1}), "invalid_request", "gpt", "body.model: this job reranks with llm.model"),
        (_openai("more", extra=1), "invalid_batch_line", "more", "unknown key(s) ['extra'] in an OpenAI batch line"),
        (_openai("a"), "duplicate_custom_id", "a", "custom_id 'a' is also on line 1; custom_ids must be unique"),
        (json.dumps({"user_id": 1}), "invalid_batch_line", None, "the line is a native fedrec request, but this job reads OpenAI "
         "batch lines"),
        ("[1]", "invalid_json", None, "expected a JSON object, got list"),
        (_openai("ghost", {"user_id": 999999}), "invalid_request", "ghost", "user 999999 is not in ml-100k"),
    ]
    good_last = _openai("z", {"history": [1, 50], "candidates": [100, 258, 286], "k": 2, "model": str(tiny_llama)})
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join([_openai("a"), *[line for line, *_ in bad], good_last]) + "\n")
    out = tmp_path / "out.jsonl"
    summary = run_job(_config(tiny_llama), inp, out, batch_size=4)
    assert (summary.ok, summary.failed) == (2, len(bad))
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["custom_id"], len(r["response"]["body"]["items"])) for r in results] == [("a", 2), ("z", 2)]
    errors = [json.loads(line) for line in (tmp_path / "out.jsonl.errors.jsonl").read_text().splitlines()]
    assert [e["error"]["line"] for e in errors] == list(range(2, 2 + len(bad)))
    for row, (_, code, custom_id, needle) in zip(errors, bad, strict=True):
        assert (row["error"]["code"], row["custom_id"], row["response"]) == (code, custom_id, None), row
        assert needle in row["error"]["message"], (needle, row["error"]["message"])
    forced = run_job(_config(tiny_llama), inp, tmp_path / "forced.jsonl", batch_size=4, fmt="native")
    first = json.loads((tmp_path / "forced.jsonl.errors.jsonl").read_text().splitlines()[0])
    assert (forced.ok, first["line"]) == (1, 1) and "the keys of an OpenAI batch line, but this job reads native" in first["error"]
    assert "pass --format openai" in first["error"]
