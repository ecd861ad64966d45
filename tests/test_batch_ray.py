"""The batch job on Ray Data (a local two-CPU cluster): the local engine's files byte for byte, in both line formats,
resumable by shard after the driver is killed, and a failing backend that stops the job cleanly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO
from test_batch import OPENAI_URL, TINY, _config, _openai_lines, _requests

from pipeline.batch import run_job, run_ray
from pipeline.errors import FedrecError
from pipeline.llm.base import LLMError


def _ray():  # noqa: ANN202 - the ray module
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        message = f"Ray Data is not installed ({exc}); install the batch extra: pip install -e '.[batch]'"
        if os.environ.get("CI") in ("true", "1"):
            pytest.fail(message)
        pytest.skip(message)
    return ray


def test_ray_options_are_checked_before_any_work(tiny_llama: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pipeline.cli import app

    assert not _ray().is_initialized(), "runs before the cluster tests, so that run_ray would start Ray itself"
    inp = _requests(tmp_path / "in.jsonl", 20)
    with pytest.raises(FedrecError, match=r"--shard-size must be a positive multiple of --batch-size \(4\), got 10, .*use 8 or 12"):
        run_ray(_config(tiny_llama), inp, tmp_path / "out.jsonl", batch_size=4, shard_size=10)
    with pytest.raises(FedrecError, match=r"--format must be auto, native or openai, got 'csv'"):
        run_ray(_config(tiny_llama), inp, tmp_path / "out.jsonl", fmt="csv")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(FedrecError, match=rf"cannot reach the Ray cluster at {closed} .*ray start --head --port=6379"):
        run_ray(_config(tiny_llama), inp, tmp_path / "out.jsonl", address=closed)
    done = CliRunner().invoke(app, ["rerank", "-i", str(inp), "-o", str(tmp_path / "out.jsonl"), "--ray-address", "h:6379"])
    assert isinstance(done.exception, FedrecError) and "--ray-address applies only to --engine ray; add --engine ray, or drop it" in str(done.exception)
    assert not list(tmp_path.glob("out.jsonl*"))


@pytest.fixture(scope="module")
def ray_cluster(cache_dir: Path) -> str:
    """A local Ray cluster with 2 CPUs for this module; yields the address other drivers join it by."""
    ray = _ray()
    assert not ray.is_initialized(), "another test left Ray running"
    env = {"FEDREC_CACHE_DIR": str(cache_dir), "HF_HUB_OFFLINE": "1"}  # workers start before the per-test environment is set
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env}, logging_level="WARNING")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _side(out: Path, suffix: str) -> Path:
    return out.with_name(out.name + suffix)


def _native_input(path: Path, n: int) -> Path:
    """`n` requests with the bad rows of test_batch, and a last line that is not UTF-8."""
    _requests(path, n)
    with path.open("ab") as handle:
        handle.write(b'{"id": "caf\xe9", "user_id": 1}\n')
    return path


def _same_files(a: Path, b: Path) -> None:
    assert a.read_bytes() == b.read_bytes()
    assert _side(a, ".errors.jsonl").read_bytes() == _side(b, ".errors.jsonl").read_bytes()


def test_ray_writes_the_local_engines_files_bad_rows_included(tiny_llama: Path, tmp_path: Path, ray_cluster: str) -> None:
    inp, local, on_ray = _native_input(tmp_path / "in.jsonl", 20), tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    expected = run_job(_config(tiny_llama), inp, local, batch_size=2)
    summary = run_ray(_config(tiny_llama), inp, on_ray, batch_size=2, shard_size=4)
    assert (summary.ok, summary.failed, summary.skipped) == (expected.ok, expected.failed, 0) == (16, 5, 0)
    _same_files(on_ray, local)
    errors = {e["line"]: e["error"] for e in map(json.loads, _side(on_ray, ".errors.jsonl").read_text().splitlines())}
    assert errors[4].startswith("invalid JSON") and "user 999999 is not in ml-100k" in errors[8]
    assert "candidates is empty" in errors[12] and errors[21].startswith("line 21 is not valid UTF-8")
    progress = json.loads(_side(on_ray, ".progress.json").read_text())
    assert (progress["engine"], progress["complete"], progress["shards"], progress["ok"]) == ("ray", True, {}, 16)
    assert not _side(on_ray, ".shards").exists()
    again = run_ray(_config(tiny_llama), inp, on_ray, batch_size=2, shard_size=4)
    assert (again.ok, again.failed, again.skipped) == (0, 0, 21)
    with pytest.raises(FedrecError, match=r"different engine, shard_size; rerun with the same input, config and --batch-size \(and .*--engine"):
        run_job(_config(tiny_llama), inp, on_ray, batch_size=2)


def test_openai_lines_on_ray_match_the_local_engine(tiny_llama: Path, tmp_path: Path, ray_cluster: str) -> None:
    inp = tmp_path / "batch.jsonl"
    inp.write_text("".join(line + "\n" for line in _openai_lines(_requests(tmp_path / "native.jsonl", 20))))
    with inp.open("a") as handle:
        handle.write(json.dumps({"custom_id": "r0", "method": "POST", "url": OPENAI_URL, "body": {"user_id": 3}}) + "\n")
        handle.write(json.dumps({"custom_id": "c", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}}) + "\n")
    local, on_ray = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    expected = run_job(_config(tiny_llama), inp, local, batch_size=3)
    summary = run_ray(_config(tiny_llama), inp, on_ray, batch_size=3, shard_size=6)
    assert (summary.ok, summary.failed) == (expected.ok, expected.failed) == (16, 6)
    _same_files(on_ray, local)
    results = [json.loads(line) for line in on_ray.read_text().splitlines()]
    assert all(r["response"]["status_code"] == 200 and r["error"] is None and r["response"]["body"]["id"] == r["custom_id"]
               for r in results)
    codes = {e["error"]["line"]: e["error"]["code"] for e in map(json.loads, _side(on_ray, ".errors.jsonl").read_text().splitlines())}
    assert codes == {4: "invalid_json", 8: "invalid_request", 12: "invalid_request", 16: "invalid_request",
                     21: "duplicate_custom_id", 22: "unsupported_url"}


def _cli(tiny_llama: Path, inp: Path, out: Path, address: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "rerank", "-i", str(inp), "-o", str(out), "-c", str(TINY), "--engine", "ray",
            "--ray-address", address, "--batch-size", "2", "--shard-size", "2", "--set", f"llm.model={tiny_llama}",
            "--set", "rerank.fusion_weight=0.5", "--set", "retrieval.num_candidates=8"]


def test_killed_ray_job_resumes_byte_identical(tiny_llama: Path, tmp_path: Path, ray_cluster: str) -> None:
    inp = _native_input(tmp_path / "in.jsonl", 40)
    whole, killed = tmp_path / "whole.jsonl", tmp_path / "killed.jsonl"
    run_ray(_config(tiny_llama), inp, whole, batch_size=2, shard_size=2)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("FEDREC_DEBUG", None)
    log = tmp_path / "driver.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(_cli(tiny_llama, inp, killed, ray_cluster), env=env, stdout=sink, stderr=subprocess.STDOUT)
    progress = _side(killed, ".progress.json")
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if progress.exists() and json.loads(progress.read_text() or "{}").get("shards"):
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the job ended before it could be killed; make it longer:\n{log.read_text()[-3000:]}"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    state = json.loads(progress.read_text())
    assert state["complete"] is False and 1 <= len(state["shards"]) < 21
    assert not killed.exists(), "the output appeared before every shard was done"
    (_side(killed, ".shards") / ".000099.results.jsonl.x.tmp").write_text('{"torn')  # what a kill mid-write leaves
    resumed = run_ray(_config(tiny_llama), inp, killed, batch_size=2, shard_size=2)
    assert resumed.skipped >= 2 * len(state["shards"]) and resumed.ok + resumed.failed + resumed.skipped == 41
    _same_files(killed, whole)
    assert not _side(killed, ".shards").exists()


def test_backend_failure_on_a_worker_stops_the_job_cleanly(tiny_llama: Path, tmp_path: Path, ray_cluster: str) -> None:
    cfg = _config(tiny_llama, "llm.backend=openai", "llm.base_url=http://127.0.0.1:9/v1", "llm.max_retries=1", "llm.timeout_s=2")
    out = tmp_path / "out.jsonl"
    with pytest.raises(LLMError, match=r"failed after 2 attempts .* is the server running at llm\.base_url"):
        run_ray(cfg, _requests(tmp_path / "in.jsonl", 20), out, batch_size=2, shard_size=2)
    progress = json.loads(_side(out, ".progress.json").read_text())
    assert (progress["complete"], progress["shards"]) == (False, {}) and not out.exists()


def test_missing_ray_data_names_the_extra(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray.data", None)
    with pytest.raises(ImportError, match=r"--engine ray needs Ray Data .*pip install -e '\.\[batch\]'"):
        run_ray(_config(tiny_llama), _requests(tmp_path / "in.jsonl", 20), tmp_path / "out.jsonl")
