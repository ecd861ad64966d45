"""The `fedrec` command line, run through its real entry point on the tiny config."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from pipeline.cli import main

TINY = str(REPO / "configs" / "tiny.yaml")


def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["fedrec", *args])
    monkeypatch.setenv("COLUMNS", "160")
    with pytest.raises(SystemExit) as exit_info:
        main()
    out = capsys.readouterr()
    return int(exit_info.value.code or 0), out.out + out.err


def test_console_script_is_installed() -> None:
    exe = shutil.which("fedrec") or str(Path(sys.executable).parent / "fedrec")
    done = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for command in ("data", "index", "recommend", "evaluate", "demo"):
        assert command in done.stdout


def test_data_info(monkeypatch, capsys) -> None:
    code, out = run(monkeypatch, capsys, "data", "info", "-c", TINY)
    assert code == 0, out
    assert "943" in out and "1,349" in out and "packaged" in out


def test_recommend_prints_profile_and_top_k(monkeypatch, capsys) -> None:
    code, out = run(monkeypatch, capsys, "recommend", "--user", "1", "-c", TINY, "-k", "5")
    assert code == 0, out
    assert "text profile" in out and "User who has watched" in out
    assert "top 5 for user 1" in out
    assert sum(1 for line in out.splitlines() if line.strip().startswith(("│    1 │", "│    5 │"))) == 2


def test_unknown_user_is_one_clear_line(monkeypatch, capsys) -> None:
    code, out = run(monkeypatch, capsys, "recommend", "--user", "99999", "-c", TINY)
    assert code == 2
    assert "error: user '99999' is not in ml-100k" in out and "Traceback" not in out


def test_bad_override_and_bad_stage(monkeypatch, capsys) -> None:
    code, out = run(monkeypatch, capsys, "evaluate", "-c", TINY, "--set", "retrieval.qurey=x")
    assert code == 2 and "retrieval.qurey: unknown key" in out
    code, out = run(monkeypatch, capsys, "evaluate", "-c", TINY, "--stage", "generate")
    assert code == 2 and "--stage 'generate' is not available" in out
    code, out = run(monkeypatch, capsys, "recommend", "--user", "1", "-c", TINY, "--split", "train")
    assert code == 2 and "--split must be valid or test" in out


def test_evaluate_writes_table_and_json(monkeypatch, capsys, tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    # output_dir: a trained run in the checkout's runs/ (from `make demo`) would add its tower's rows
    code, out = run(monkeypatch, capsys, "evaluate", "-c", TINY, "--output", str(target), "--set", f"output_dir={tmp_path}")
    assert code == 0, out
    assert "popularity" in out and "text:hybrid" in out and "ties ranked in expectation" in out
    report = json.loads(target.read_text())
    assert report["users"] == 40 and report["tie_rule"].startswith("ties ranked in expectation")
    models = {(r["model"], r["split"]) for r in report["rows"]}
    assert models == {(m, s) for m in ("popularity", "random", "text:hybrid") for s in ("valid", "test")}
    text_row = next(r for r in report["rows"] if r["model"] == "text:hybrid" and r["split"] == "test")
    assert 0 <= text_row["R@10"] <= text_row["R@20"] == text_row["ceiling_R@20"] <= 1
    assert 0 < text_row["sampled_HR@10"] <= 1


def test_index_build_per_client_and_stale_index_is_rebuilt(monkeypatch, capsys, caplog, cache_dir: Path) -> None:
    code, out = run(monkeypatch, capsys, "index", "build", "-c", TINY, "--per-client")
    assert code == 0, out
    catalog = next(cache_dir.glob("indexes/*/catalog.faiss"))
    assert sorted(p.name for p in catalog.parent.glob("client-*.faiss")) == [f"client-{i}.faiss" for i in range(4)]
    from retrieval import ItemIndex

    ItemIndex.build(np.eye(8, dtype=np.float32)).save(catalog)  # an index for another dimension
    code, out = run(monkeypatch, capsys, "index", "build", "-c", TINY)
    assert code == 0, out
    assert "was built for 8-dim vectors" in caplog.text and ItemIndex.load(catalog).dim == 384


def test_data_prepare_is_atomic(monkeypatch, capsys, tmp_path: Path) -> None:
    target = tmp_path / "prepared"
    code, out = run(monkeypatch, capsys, "data", "prepare", "-c", TINY, "--output", str(target))
    assert code == 0, out
    assert sorted(p.name for p in target.iterdir()) == ["clients.json", "items.jsonl", "meta.json", "sequences.npz"]
    with np.load(target / "sequences.npz") as arrays:
        assert arrays["offsets"][-1] == len(arrays["items"]) == json.loads((target / "meta.json").read_text())["interactions"]
    assert len(json.loads((target / "clients.json").read_text())) == 4

    import pipeline.prepare

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pipeline.prepare.np, "savez_compressed", crash)
    fresh = tmp_path / "fresh"
    code, out = run(monkeypatch, capsys, "data", "prepare", "-c", TINY, "--output", str(fresh))
    assert code == 2 and "disk full" in out
    assert not fresh.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_demo_runs_end_to_end(monkeypatch, capsys, tmp_path: Path, tiny_llama: Path) -> None:
    args = ["demo", "-c", TINY, "--users", "2", "--rerank-users", "4", "--set", f"output_dir={tmp_path}", "--set", f"llm.model={tiny_llama}",
            "--set", "rerank.fusion_weight=0.5", "--set", "federation.rounds=1", "--set", "tower.dim=16", "--set", "tower.max_len=10",
            "--set", "tower.layers=1"]
    code, out = run(monkeypatch, capsys, *args)
    assert code == 0, out
    assert "federated training (tower): 4 clients" in out and "retrieval: trained tower" in out and "LLM ready" in out
    assert out.count("text profile") == 2 and out.count("(reranked)") == 2 and out.count("why these picks") == 1
    summary = out[out.rindex("test, full ranking"):]
    for row in ("popularity", "text:hybrid", "tower (run, round 1)", "tower order (same users)", "tower + zero-shot LLM verbalizer"):
        assert row in summary, row
    assert (tmp_path / "eval-ml-100k-retrieval.json").is_file()
    code, out = run(monkeypatch, capsys, *args)
    assert code == 0 and "trained run found" in out and "federated training" not in out


def test_demo_trains_the_reranker_and_reports_it(monkeypatch, capsys, tmp_path: Path, tiny_llama: Path) -> None:
    """What `make demo` runs (configs/ml-100k.yaml enables the soft prompt): the reranker trains with the tower, and the
    demo's recommendations and summary use the run's trained soft prompt."""
    args = ["demo", "-c", TINY, "--users", "1", "--rerank-users", "4", "--set", f"output_dir={tmp_path}", "--set", f"llm.model={tiny_llama}",
            "--set", "rerank.fusion_weight=0.5", "--set", "federation.rounds=1", "--set", "tower.dim=16", "--set", "tower.max_len=10",
            "--set", "tower.layers=1", "--set", "soft_prompt.enabled=true", "--set", "soft_prompt.tokens=2", "--set", "soft_prompt.users=1",
            "--set", "eval.rerank_max_users=3", "--set", "rerank.max_history_titles=3", "--set", "profile.max_tokens=48"]
    code, out = run(monkeypatch, capsys, *args)
    assert code == 0, out
    assert "federated training (tower + reranker soft prompt): 4 clients" in out
    summary = out[out.rindex("test, full ranking"):]
    assert "tower + trained LLM verbalizer" in summary and "reranked with the run's trained soft prompt (round 1)" in summary, summary
    assert "zero-shot" not in summary


def test_recommend_with_rerank_and_explanation(monkeypatch, capsys, tiny_llama: Path) -> None:
    code, out = run(monkeypatch, capsys, "recommend", "--user", "1", "-c", TINY, "-k", "4", "--rerank", "--explain",
                    "--set", f"llm.model={tiny_llama}", "--set", "rerank.fusion_weight=0.5")
    assert code == 0, out
    assert "(reranked)" in out and "LLM log-p" in out and "why these picks" in out


def test_evaluate_rerank_tunes_and_saves_the_fusion_weight(monkeypatch, capsys, tiny_llama: Path, tmp_path: Path) -> None:
    target = tmp_path / "rerank.json"
    args = ["-c", TINY, "--set", f"llm.model={tiny_llama}", "--set", "eval.max_users=12", "--set", "retrieval.num_candidates=8"]
    code, out = run(monkeypatch, capsys, "evaluate", *args, "--stage", "rerank", "--output", str(target))
    assert code == 0, out
    report = json.loads(target.read_text())
    weight = report["fusion_weight"]
    table = {float(k): v for k, v in report["fusion_table"].items()}
    assert weight in table and table[weight] >= table[0.0]
    rows = {(r["model"], r["split"]): r for r in report["rows"]}
    assert set(rows) == {(m, s) for m in ("retrieval top-8", "verbalizer", f"verbalizer+fusion {weight:g}") for s in ("valid", "test")}
    for split in ("valid", "test"):
        retrieval = rows[("retrieval top-8", split)]
        assert retrieval["R@20"] == retrieval["ceiling_R@8"]  # reranking 8 candidates cannot reach past them
    assert rows[(f"verbalizer+fusion {weight:g}", "valid")]["N@10"] >= rows[("retrieval top-8", "valid")]["N@10"] - 1e-12
    code, out = run(monkeypatch, capsys, "recommend", "--user", "1", *args, "--rerank")
    assert code == 0 and "no fusion weight tuned" not in out
