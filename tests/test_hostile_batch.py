"""The batch job under hostile input and damaged outputs: every bad line is an error row, and a
rerun never reports success over an output that is missing, cut short, edited or shared."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, write

import pipeline.batch as batch
from pipeline.batch import BatchReranker, run_job
from pipeline.config import load_config
from pipeline.errors import FedrecError
from pipeline.llm.base import LLMError

TINY = REPO / "configs" / "tiny.yaml"
SETTINGS = ["rerank.fusion_weight=0.5", "retrieval.num_candidates=8"]


def _config(tiny_llama: Path, *extra: str):
    return load_config(TINY, [f"llm.model={tiny_llama}", *SETTINGS, *extra])


def _requests(path: Path, n: int = 4) -> Path:
    return write(path, "".join(json.dumps({"id": f"r{i}", "user_id": i + 1, "k": 3}) + "\n" for i in range(n)))


def _side(out: Path, suffix: str) -> Path:
    return out.with_name(out.name + suffix)


def _cli(tiny_llama: Path, inp: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pipeline.cli", "rerank", "-i", str(inp), "-o", str(out), "-c", str(TINY),
               "--batch-size", "2", "--set", f"llm.model={tiny_llama}", *[a for s in SETTINGS for a in ("--set", s)], *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("FEDREC_DEBUG", None)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def _refused(done: subprocess.CompletedProcess, *needles: str) -> None:
    """The CLI exited non-zero with one plain message (wrapped lines joined) and no traceback."""
    said = " ".join((done.stdout + done.stderr).split())
    assert done.returncode != 0, said
    assert "Traceback" not in done.stderr, done.stderr
    for needle in needles:
        assert needle in said, said


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the job gets as far as loading the model."""
    def refuse(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        raise AssertionError("the job loaded the model before checking its outputs")

    monkeypatch.setattr(BatchReranker, "__init__", refuse)


def _hostile_lines() -> list[tuple[str, str]]:
    """(line, expected error) pairs, one per way a line can be bad."""
    return [
        ("[" * 300_000, "nested too deeply"),
        ('{"id": ' * 100_000, "nested too deeply"),
        ('{"id": "big", "history": [1], "pad": "' + "x" * batch.MAX_LINE_BYTES + '"}', "more than the 1 MiB limit"),
        (json.dumps({"history": [3, 3, 3, 4], "candidates": [3, 3, 3, 4]}), "candidates: has duplicate item ids [3]; list each item once"),
        (json.dumps({"history": [1], "candidates": [5, "5", 6]}), "candidates: has duplicate item ids [5, '5']"),
        (json.dumps({"user_id": 1, "k": True}), "k: Input should be a valid integer"),
        (json.dumps({"user_id": 1, "k": 2.0}), "k: Input should be a valid integer"),
        (json.dumps({"user_id": 1, "k": 0}), "k must be >= 1, got 0"),
        (json.dumps({"history": [True]}), "history.0: must be an integer or a string, got bool True"),
        ('{"id": ' + "9" * 5000 + ', "user_id": 1}', "a number has more than 4,300 digits; write long ids as strings"),
        (json.dumps({"history": ["x" * 100_000]}), "history: has 1 item id(s) not in ml-100k: ['xxxxxx"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"id": "a\\ud800", "user_id": 1}', "id: has a lone surrogate '\\ud800' at character 2; ids must be valid Unicode"),
        ('{"user_id": NaN}', "user_id: must be an integer or a string, got float nan"),
    ]


def test_every_hostile_line_is_an_error_row_and_the_job_goes_on(tiny_llama: Path, tmp_path: Path) -> None:
    hostile = _hostile_lines()
    good = [json.dumps({"id": f"ok{i}", "user_id": i + 1, "k": 2}) for i in range(3)]
    lines = [good[0], *[line for line, _ in hostile], good[1], good[2]]
    inp = tmp_path / "in.jsonl"
    body = "\n".join(lines).encode() + b"\n" + b'{"id": "caf\xe9", "user_id": 1}\n'  # Latin-1, not UTF-8
    inp.write_bytes(body)
    out = tmp_path / "out.jsonl"
    summary = run_job(_config(tiny_llama), inp, out, batch_size=4)
    assert (summary.ok, summary.failed) == (3, len(hostile) + 1)
    assert [r["id"] for r in map(json.loads, out.read_text().splitlines())] == ["ok0", "ok1", "ok2"]
    errors = {e["line"]: e for e in map(json.loads, _side(out, ".errors.jsonl").read_text().splitlines())}
    assert sorted(errors) == [*range(2, 2 + len(hostile)), len(lines) + 1]
    for number, (_, expected) in enumerate(hostile, start=2):
        assert expected in errors[number]["error"], (number, errors[number]["error"])
        assert len(errors[number]["error"]) <= 1000 and len(errors[number]["input"]) <= 500
    big = errors[4]["error"]
    assert big.startswith(f"line 4 is {len(hostile[2][0].encode()):,} bytes")
    latin = errors[len(lines) + 1]
    assert latin["error"].startswith(f"line {len(lines) + 1} is not valid UTF-8 at byte 12 (invalid continuation byte)")
    assert latin["input"] == '{"id": "caf\ufffd", "user_id": 1}'
    again = run_job(_config(tiny_llama), inp, out, batch_size=4)
    assert (again.ok, again.failed, again.skipped) == (0, 0, len(lines) + 1)


def test_string_item_ids(tiny_llama: Path, tmp_path: Path) -> None:
    names = ["item-a", "item-b", "item-c", "item-d", "item-e", "item-f"]
    events = "".join(f"u{u},{names[(u + j) % 6]},{100 * j}\n" for u in range(1, 6) for j in range(4))
    inter = write(tmp_path / "events.csv", "user_id,item_id,timestamp\n" + events)
    items = write(tmp_path / "items.csv", "item_id,title,genres\n" + "".join(f"{n},Film {n[-1].upper()},Drama\n" for n in names))
    cfg = _config(tiny_llama, "data.name=custom", f"data.path={inter}", "data.format=interactions", f"data.items_path={items}",
                  "data.min_user_interactions=3", "data.min_item_interactions=1", "retrieval.num_candidates=3",
                  "partition.num_clients=2", f"output_dir={tmp_path / 'runs'}")
    inp = write(tmp_path / "in.jsonl", json.dumps({"id": "s", "history": ["item-a", "item-b"], "candidates": ["item-c", "item-d", "item-f"]})
                + "\n" + json.dumps({"id": "u", "user_id": "u1", "k": 2}) + "\n")
    out = tmp_path / "out.jsonl"
    summary = run_job(cfg, inp, out, batch_size=2, run=None)
    assert (summary.ok, summary.failed) == (2, 0), _side(out, ".errors.jsonl").read_text()
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(i["item_id"] for i in rows["s"]["items"]) == ["item-c", "item-d", "item-f"]
    assert len(rows["u"]["items"]) == 2 and all(i["item_id"] in names for i in rows["u"]["items"])


def _interrupted(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A job stopped by the backend after its first chunk of two rows: (input, output)."""
    inp, out = _requests(tmp_path / "in.jsonl", 4), tmp_path / "out.jsonl"
    calls = []
    process = BatchReranker.process

    def second_call_fails(self, lines):  # noqa: ANN001, ANN202
        calls.append(len(lines))
        if len(calls) == 2:
            raise LLMError("server went away")
        return process(self, lines)

    with monkeypatch.context() as patch:
        patch.setattr(BatchReranker, "process", second_call_fails)
        with pytest.raises(LLMError):
            run_job(_config(tiny_llama), inp, out, batch_size=2)
    progress = json.loads(_side(out, ".progress.json").read_text())
    assert (progress["chunks_done"], progress["complete"], progress["output_bytes"]) == (1, False, out.stat().st_size)
    assert len(out.read_text().splitlines()) == 2
    return inp, out


def test_deleted_output_is_refused_mid_job_and_after_it(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inp, out = _interrupted(tiny_llama, tmp_path, monkeypatch)
    kept = out.read_bytes()
    out.unlink()
    with pytest.raises(FedrecError, match=r"--output .*out\.jsonl is missing, but .*progress\.json records \d+ bytes .*restore the file, or delete"):
        run_job(_config(tiny_llama), inp, out, batch_size=2)
    assert not out.exists()
    out.write_bytes(kept)
    summary = run_job(_config(tiny_llama), inp, out, batch_size=2)
    assert (summary.ok, summary.skipped) == (2, 2)
    out.unlink()
    with pytest.raises(FedrecError, match=r"is missing, but"):
        run_job(_config(tiny_llama), inp, out, batch_size=2)
    assert json.loads(_side(out, ".progress.json").read_text())["complete"] is True


def test_cut_or_edited_output_is_refused_and_never_padded(tiny_llama: Path, tmp_path: Path) -> None:
    inp, out = _requests(tmp_path / "in.jsonl", 4), tmp_path / "out.jsonl"
    run_job(_config(tiny_llama), inp, out, batch_size=2)
    whole = out.read_bytes()
    out.write_bytes(whole[:100])
    with pytest.raises(FedrecError, match=rf"--output .* is 100 bytes, but .* records {len(whole):,} bytes .*cut short"):
        run_job(_config(tiny_llama), inp, out, batch_size=2)
    assert out.read_bytes() == whole[:100]
    edited = whole.replace(b'"r0"', b'"R0"')
    out.write_bytes(edited + b'{"id": "torn')
    with pytest.raises(FedrecError, match=r"no longer holds what the job wrote: its first .* bytes hash to sha256"):
        run_job(_config(tiny_llama), inp, out, batch_size=2)
    assert out.read_bytes() == edited + b'{"id": "torn'
    out.write_bytes(whole + b'{"id": "torn')
    summary = run_job(_config(tiny_llama), inp, out, batch_size=2)
    assert summary.skipped == 4 and out.read_bytes() == whole  # the torn tail is cut, nothing else changes


def test_unreadable_or_old_progress_file_is_refused(tiny_llama: Path, tmp_path: Path) -> None:
    inp, out = _requests(tmp_path / "in.jsonl", 2), tmp_path / "out.jsonl"
    run_job(_config(tiny_llama), inp, out, batch_size=2)
    progress = _side(out, ".progress.json")
    saved = json.loads(progress.read_text())
    progress.write_text("{")
    with pytest.raises(FedrecError, match=r"progress\.json is not a progress file fedrec can read .* to start the job over"):
        run_job(_config(tiny_llama), inp, out, batch_size=2)
    progress.write_text(json.dumps({k: v for k, v in saved.items() if not k.endswith("_sha256") or k == "input_sha256"}))
    with pytest.raises(FedrecError, match=r"records no checksums"):
        run_job(_config(tiny_llama), inp, out, batch_size=2)


def test_a_second_job_on_the_same_output_fails_at_once(tiny_llama: Path, tmp_path: Path, no_model: None) -> None:
    inp, out = _requests(tmp_path / "in.jsonl", 2), tmp_path / "out.jsonl"
    with _side(out, ".lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(FedrecError, match=r"another job holds .*out\.jsonl\.lock and is writing .*out\.jsonl; wait for it"):
            run_job(_config(tiny_llama), inp, out, batch_size=2)
        _refused(_cli(tiny_llama, inp, out), "another job holds", "wait for it to finish, or choose another --output")
    assert not out.exists() and not _side(out, ".progress.json").exists()


def test_output_paths_are_checked_before_the_model_loads(tiny_llama: Path, tmp_path: Path, no_model: None) -> None:
    inp = _requests(tmp_path / "in.jsonl", 2)
    cfg = _config(tiny_llama)
    (tmp_path / "folder").mkdir()
    with pytest.raises(FedrecError, match=r"--output .*folder is a folder; give a file path"):
        run_job(cfg, inp, tmp_path / "folder")
    with pytest.raises(FedrecError, match=r"--errors .*errs\.jsonl is a folder"):
        (tmp_path / "errs.jsonl").mkdir()
        run_job(cfg, inp, tmp_path / "a.jsonl", errors_path=tmp_path / "errs.jsonl")
    with pytest.raises(FedrecError, match=r"cannot create the folder for --errors .*: .*in\.jsonl is a file, not a folder"):
        run_job(cfg, inp, tmp_path / "b.jsonl", errors_path=inp / "errors.jsonl")
    with pytest.raises(FedrecError, match=r"--errors .*c\.jsonl is the same file as --output"):
        run_job(cfg, inp, tmp_path / "c.jsonl", errors_path=tmp_path / "c.jsonl")
    with pytest.raises(FedrecError, match=r"--output .*in\.jsonl is the same file as --input"):
        run_job(cfg, inp, inp)
    write(tmp_path / "d.jsonl.errors.jsonl", '{"line": 1}\n')
    with pytest.raises(FedrecError, match=r"d\.jsonl\.errors\.jsonl exists but has no progress file .* choose another --errors"):
        run_job(cfg, inp, tmp_path / "d.jsonl")
    assert not list(tmp_path.glob("[abc].jsonl*"))
    _refused(_cli(tiny_llama, inp, tmp_path / "e.jsonl", "--errors", str(inp / "errors.jsonl")), "is a file, not a folder")


def test_errors_in_a_new_folder(tiny_llama: Path, tmp_path: Path) -> None:
    inp, out = _requests(tmp_path / "in.jsonl", 3), tmp_path / "out.jsonl"
    with inp.open("a") as handle:
        handle.write("{not json\n")
    errors = tmp_path / "new" / "deeper" / "errors.jsonl"
    summary = run_job(_config(tiny_llama), inp, out, errors_path=errors, batch_size=2)
    assert (summary.ok, summary.failed) == (3, 1)
    assert json.loads(errors.read_text())["line"] == 4
    progress = json.loads(_side(out, ".progress.json").read_text())
    assert progress["complete"] and progress["errors"] == str(errors.resolve()) and progress["errors_bytes"] == errors.stat().st_size
    kept = errors.read_bytes()
    errors.write_bytes(kept[:5])
    with pytest.raises(FedrecError, match=rf"--errors .*errors\.jsonl is 5 bytes, but .* records {len(kept):,} bytes"):
        run_job(_config(tiny_llama), inp, out, errors_path=errors, batch_size=2)
    errors.unlink()
    with pytest.raises(FedrecError, match=r"--errors .*errors\.jsonl is missing, but"):
        run_job(_config(tiny_llama), inp, out, errors_path=errors, batch_size=2)
    errors.write_bytes(kept)
    assert run_job(_config(tiny_llama), inp, out, errors_path=errors, batch_size=2).skipped == 4
    with pytest.raises(FedrecError, match=r"different errors; rerun with the same input, config and --batch-size \(and --errors"):
        run_job(_config(tiny_llama), inp, out, batch_size=2)


def test_cut_output_is_refused_through_the_cli(tiny_llama: Path, tmp_path: Path) -> None:
    inp, out = _requests(tmp_path / "in.jsonl", 2), tmp_path / "out.jsonl"
    done = _cli(tiny_llama, inp, out)
    assert done.returncode == 0, done.stdout + done.stderr
    out.write_bytes(out.read_bytes()[:100])
    _refused(_cli(tiny_llama, inp, out), "is 100 bytes, but", "restore the file, or delete")
    assert out.stat().st_size == 100
    out.unlink()
    _refused(_cli(tiny_llama, inp, out), "is missing, but")
    assert not out.exists()


def test_backend_failure_in_a_row_still_stops_the_job(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def down(self, row):  # noqa: ANN001, ANN202
        raise LLMError("the server is down")

    monkeypatch.setattr(BatchReranker, "_request", down)
    out = tmp_path / "out.jsonl"
    with pytest.raises(LLMError, match="the server is down"):
        run_job(_config(tiny_llama), _requests(tmp_path / "in.jsonl", 2), out, batch_size=2)
    assert out.read_text() == "" and json.loads(_side(out, ".progress.json").read_text())["chunks_done"] == 0


def test_a_row_that_breaks_its_batch_fails_alone(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    init = BatchReranker.__init__

    def flaky_init(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        init(self, *args, **kwargs)
        real, poison = self.reranker.rerank_batch, self.rec.dataset.catalog.index_of(1)

        def rerank_batch(requests):  # noqa: ANN001, ANN202
            if any(poison in r.history for r in requests):
                raise RuntimeError("prompt does not fit")
            return real(requests)

        self.reranker.rerank_batch = rerank_batch

    monkeypatch.setattr(BatchReranker, "__init__", flaky_init)
    inp = write(tmp_path / "in.jsonl", "".join(json.dumps({"id": i, "history": h, "candidates": [100, 258, 286]}) + "\n"
                                              for i, h in enumerate([[50], [1, 50], [181]])))
    out = tmp_path / "out.jsonl"
    summary = run_job(_config(tiny_llama), inp, out, batch_size=3)
    assert (summary.ok, summary.failed) == (2, 1)
    assert [r["id"] for r in map(json.loads, out.read_text().splitlines())] == [0, 2]
    error = json.loads(_side(out, ".errors.jsonl").read_text())
    assert error["line"] == 2 and error["error"] == "reranking failed: RuntimeError: prompt does not fit"


def test_the_ray_entry_point_reports_unreadable_lines(tiny_llama: Path) -> None:
    import numpy as np

    worker = BatchReranker(_config(tiny_llama), batch_size=2)
    lines = [(1, '{"user_id": 1, "k": 2}'), (2, batch.Unreadable("line 2 is not valid UTF-8 at byte 1 (invalid start byte); save the input as UTF-8", "\ufffd")),
             (3, '{"user_id": 1, "candidates": [7, 7]}'), (5, '{"id": "last", "history": [1], "k": 1}')]
    out = worker({"shard": np.array([7]), "lines": np.array([batch._encode_shard(lines)], dtype=object)})
    assert (out["shard"].tolist(), out["lines"].tolist(), out["ok"].tolist(), out["failed"].tolist()) == ([7], [4], [2], [2])
    results = [json.loads(line) for line in out["results"][0].splitlines()]
    assert [(r["line"], len(r["items"])) for r in results] == [(1, 2), (5, 1)] and results[1]["id"] == "last"
    errors = [json.loads(line) for line in out["errors"][0].splitlines()]
    assert errors[0]["line"] == 2 and errors[0]["error"].startswith("line 2 is not valid UTF-8") and errors[0]["input"] == "\ufffd"
    assert errors[1]["line"] == 3 and "duplicate item ids [7]" in errors[1]["error"]
