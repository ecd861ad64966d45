"""Hostile input against every entry point (CLI, Python API, server, training, data files): each case gets a
message that names the input and the fix, never a traceback, never a 500, never success over nothing learned."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, write

from pipeline.config import load_config
from pipeline.errors import ConfigError, DataError, FedrecError, RequestError
from pipeline.recommender import Recommender

TINY = REPO / "configs" / "tiny.yaml"
SMALL_TOWER = ["tower.dim=16", "tower.max_len=10", "tower.layers=1"]


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    env.pop("FEDREC_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env, capture_output=True, text=True, timeout=timeout)


def _refused(done: subprocess.CompletedProcess, *needles: str) -> str:
    """The command failed with a one-line message holding every needle, and no traceback."""
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "Traceback" not in output, output
    flat = " ".join(output.split())
    for needle in needles:
        assert needle in flat, flat
    return flat


# --- string ids ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def string_ids(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> tuple[Path, list[str]]:
    """A generic interactions dataset whose user and item ids are strings (two look like numbers, one is long),
    and the `--set` overrides that read it with the tiny LLM and a trained one-round tower run."""
    from federation.runner import train

    root = tmp_path_factory.mktemp("string-ids")
    rng = random.Random(0)
    items = [f"item-{c}" for c in "abcdefghijklmnopqrstuvwxyz"] + ["007", "Le Film, première partie", "x" * 300]
    write(root / "items.csv", "item_id,title,genres\n" + "".join(f'"{i}","Title of {i[:20]}",{"Drama|Comedy" if n % 2 else "Action"}\n'
                                                          for n, i in enumerate(items)))
    rows, stamp = [], 0
    for user in range(30):
        for item in rng.sample(items, 10):
            stamp += 1
            rows.append(f'u-{user},"{item}",{rng.randint(1, 5)},{stamp}\n')
    write(root / "inter.csv", "user_id,item_id,rating,timestamp\n" + "".join(rows))
    overrides = ["data.name=custom", "data.format=interactions", f"data.path={root / 'inter.csv'}", f"data.items_path={root / 'items.csv'}",
                 "data.min_item_interactions=1", "partition.num_clients=2", f"output_dir={root / 'runs'}", f"llm.model={tiny_llama}",
                 "llm.dtype=float32", "rerank.fusion_weight=0.5", "retrieval.num_candidates=6", "eval.max_users=10", *SMALL_TOWER]
    train(Recommender.from_config(load_config(TINY, [*overrides, "federation.rounds=1"])))
    return root, overrides


def test_string_ids_work_through_the_python_api(string_ids: tuple[Path, list[str]]) -> None:
    _, overrides = string_ids
    rec = Recommender.from_config(load_config(TINY, overrides))
    assert rec.trained is not None, "the tower run must serve these ids"
    plain = rec.recommend("u-3", 5)
    reranked = rec.recommend("u-3", 5, rerank=True)
    for results in (plain, reranked):
        assert len(results) == 5 and all(type(r.item_id) is str for r in results)
        assert all(rec.dataset.catalog.index_of(r.item_id) is not None for r in results)
    request = rec.request(history=["item-a", "007", "x" * 300], candidates=["item-b", "Le Film, première partie", "item-c"])
    assert [rec.dataset.catalog.item_id(c.item) for c in request.candidates] == ["item-b", "Le Film, première partie", "item-c"]
    ranked = rec.reranker().rerank(request)
    assert {rec.dataset.catalog.item_id(x.item) for x in ranked} == {"item-b", "Le Film, première partie", "item-c"}


def test_string_ids_work_through_the_cli_and_langchain(string_ids: tuple[Path, list[str]]) -> None:
    root, overrides = string_ids
    sets = [a for o in overrides for a in ("--set", o)]
    done = _cli("recommend", "-u", "u-3", "-k", "3", "--rerank", "-c", str(TINY), *sets)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "item-" in done.stdout or "007" in done.stdout
    from retrieval.langchain import ItemRetriever

    rec = Recommender.from_config(load_config(TINY, overrides))
    user = rec.dataset.user_index("u-3")
    retriever = ItemRetriever(retriever=rec.retriever, item_texts=rec.item_texts, item_ids=list(rec.dataset.catalog.item_ids), k=5,
                              history=tuple(rec.split.histories("test")[user].tolist()))
    docs = retriever.invoke("anything")
    assert [d.metadata["item_id"] for d in docs] == [r.item_id for r in rec.recommend("u-3", 5)]
    assert all(type(d.metadata["item_id"]) is str for d in docs)


def test_string_ids_work_through_the_server(string_ids: tuple[Path, list[str]]) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from pipeline.serve import Demo, create_app

    _, overrides = string_ids
    client = TestClient(create_app(Demo(Recommender.from_config(load_config(TINY, overrides)))))
    for body in ({"user_id": "u-3", "k": 3, "explain": False},
                 {"history": [{"item_id": "item-a"}, {"item_id": "007", "rating": 4}], "k": 3, "explain": False}):
        answer = client.post("/api/recommend", json=body)
        assert answer.status_code == 200, answer.text
        assert all(isinstance(r["item_id"], str) for r in answer.json()["ranked"])
    assert client.post("/api/recommend", json={"user_id": 3}).status_code == 404  # the int 3 is not the string "u-3"


# --- one request object, checked once ---------------------------------------------------------------

@pytest.fixture(scope="module")
def rec(tiny_llama: Path) -> Recommender:
    return Recommender.from_config(load_config(TINY, [f"llm.model={tiny_llama}", "retrieval.num_candidates=8"]), run=None)


@pytest.mark.parametrize(("kwargs", "field", "message"), [
    ({"history": [1, 2], "candidates": [3, 3, 3, 4]}, "candidates", "duplicate item ids [3]; list each item once"),
    ({"history": [1, 2], "candidates": []}, "candidates", "is empty"),
    ({"history": []}, "history", "is empty"),
    ({"history": [1, "9" * 5000]}, "history", "not in ml-100k"),
    ({"history": [1, True]}, "history", "not in ml-100k"),
    ({"history": [1, [2]]}, "history", "not in ml-100k"),
    ({"history": [1, 2], "ratings": [4.0, float("inf")]}, "ratings", "finite"),
    ({"history": [1, 2], "ratings": [4.0]}, "ratings", "one per item"),
    ({"user_id": 1, "history": [1]}, "user_id", "exactly one of"),
    ({"history": [1], "candidates": list(range(1, 31))}, "candidates", "candidates must be 1..26"),
])
def test_bad_requests_name_the_field(rec: Recommender, kwargs: dict, field: str, message: str) -> None:
    with pytest.raises(RequestError) as raised:
        rec.request(**kwargs)
    assert raised.value.field == field and message in str(raised.value)


# --- the CLI -------------------------------------------------------------------------------------------

def test_markup_in_values_prints_verbatim() -> None:
    _refused(_cli("recommend", "-c", str(TINY), "-u", "[/red]"), "user '[/red]' is not in ml-100k")
    _refused(_cli("config", "show", "-c", str(TINY), "--set", "data[v2]=3"), "data[v2]: unknown key")


def test_help_texts_print_in_full() -> None:
    """Every option's help text appears in `--help` word for word (brackets and braces included)."""
    import typer.main

    from pipeline.cli import app

    group = typer.main.get_command(app)
    commands = {name: cmd for name, cmd in group.commands.items() if not hasattr(cmd, "commands")}
    assert "rerank" in commands and "train" in commands
    for name, command in commands.items():
        done = _cli(name, "--help")
        assert done.returncode == 0, done.stderr
        shown = " ".join(done.stdout.replace("│", " ").split())
        for param in command.params:
            if getattr(param, "help", None):
                assert " ".join(param.help.split()) in shown, (name, param.help)


def test_unreachable_llm_server_is_one_message(tiny_llama: Path) -> None:
    done = _cli("recommend", "-c", str(TINY), "-u", "1", "--rerank", "--set", "llm.backend=openai", "--set", f"llm.model={tiny_llama}",
                "--set", "llm.base_url=http://127.0.0.1:9/v1", "--set", "llm.max_retries=0", "--set", "llm.timeout_s=2")
    _refused(done, "failed after 1 attempts", "llm.base_url")


# --- configuration and training ------------------------------------------------------------------------

@pytest.mark.parametrize("override", ["tower.lr=inf", "tower.lr=nan", "federation.server_lr=-inf", "tower.dropout=1e400",
                                      "retrieval.history_weight=nan", "tower.lr=1e30"])
def test_non_finite_or_absurd_numbers_are_refused(override: str) -> None:
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(TINY, [override])


def _trained_cfg(out: Path, *extra: str):
    return load_config(TINY, [f"output_dir={out}", "federation.rounds=2", "eval.max_users=10", *SMALL_TOWER, *extra])


def test_a_run_whose_rounds_all_fail_is_an_error(tmp_path: Path) -> None:
    from federation.runner import train
    from pipeline.trained import run_dir

    rec = Recommender.from_config(_trained_cfg(tmp_path, "federation.max_update_norm=1e-9", "federation.patience=1"))
    with pytest.raises(FedrecError, match=r"no client update was accepted in \d+ round\(s\).*norm"):
        train(rec)
    assert not (run_dir(rec) / "run.json").exists(), "a run that learned nothing must not be served"


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from federation.runner import train

    out = tmp_path_factory.mktemp("ckpt")
    train(Recommender.from_config(_trained_cfg(out, "federation.rounds=1")))
    return out


@pytest.mark.parametrize("damage", ["empty", "truncated", "bit-flipped", "not a zip"])
def test_a_damaged_checkpoint_is_one_message(checkpointed: Path, tmp_path: Path, damage: str) -> None:
    import shutil

    from federation.runner import train
    from pipeline.trained import run_dir

    out = tmp_path / "runs"
    shutil.copytree(checkpointed, out)
    rec = Recommender.from_config(_trained_cfg(out, "federation.rounds=1"))
    ckpt = run_dir(rec) / "checkpoint.npz"
    data = ckpt.read_bytes()
    damaged = {"empty": b"", "truncated": data[: len(data) // 3], "not a zip": b"hello" * 100,
               "bit-flipped": data[:200] + bytes([data[200] ^ 0xFF]) + data[201:]}[damage]
    ckpt.write_bytes(damaged)
    if damage == "bit-flipped":
        try:  # a flip inside array data is not detectable by the zip format; one in its header is
            from federation import checkpoint

            checkpoint.load(ckpt)
            pytest.skip("this flip landed in array data, which the checkpoint format does not checksum")
        except FedrecError:
            pass
    with pytest.raises(FedrecError, match=r"checkpoint .*checkpoint\.npz is unreadable .*--restart"):
        train(rec, resume=True)
    if damage == "empty":  # the CLI path: click used to print a bare "Aborted." for the EOFError
        sets = [a for o in [f"output_dir={out}", "federation.rounds=1", "eval.max_users=10", *SMALL_TOWER] for a in ("--set", o)]
        _refused(_cli("train", "-c", str(TINY), *sets, "--resume"), "checkpoint.npz is unreadable", "--restart")


def test_a_checkpoint_of_another_tower_shape_is_refused(checkpointed: Path, tmp_path: Path) -> None:
    import shutil

    from federation.runner import train
    from pipeline.trained import run_dir

    small = run_dir(Recommender.from_config(_trained_cfg(checkpointed, "federation.rounds=1")))
    rec = Recommender.from_config(_trained_cfg(tmp_path, "federation.rounds=1", "tower.dim=32"))
    run_dir(rec).mkdir(parents=True)
    shutil.copy(small / "checkpoint.npz", run_dir(rec) / "checkpoint.npz")
    with pytest.raises(FedrecError, match=r"written for another model shape \(.*\(\d+, 16\) vs \(\d+, 32\).*--restart"):
        train(rec, resume=True)


# --- the server ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(demo_overrides: list[str]):  # noqa: ANN201 - TestClient
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from pipeline.serve import Demo, create_app

    return TestClient(create_app(Demo(Recommender.from_config(load_config(TINY, demo_overrides)))))


@pytest.mark.parametrize("body", [
    '{"user_id": 1, "fusion_weight": NaN}', '{"user_id": 1, "fusion_weight": Infinity}',
    '{"history": [{"item_id": 1, "rating": NaN}]}', '{"history": [{"item_id": 1, "rating": -Infinity}]}',
    '{"user_id": true}', '{"history": [{"item_id": 1.5}]}', '{"user_id": 1, "k": true}', '{"user_id": 1, "k": 1e400}',
    '[' * 100_000, '{"user_id": "' + "9" * 5000 + '"}',
])
def test_hostile_json_gets_a_4xx_with_a_reason(client, body: str) -> None:  # noqa: ANN001
    answer = client.post("/api/recommend", content=body, headers={"content-type": "application/json"})
    assert 400 <= answer.status_code < 500, answer.text
    detail = answer.json()["detail"]
    assert isinstance(detail, str) and detail and len(answer.content) < 10_000


def test_a_huge_body_is_refused_unread(client) -> None:  # noqa: ANN001
    body = json.dumps({"history": [{"item_id": 1}] * 500_000})
    answer = client.post("/api/recommend", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 413 and "limit" in answer.json()["detail"] and len(answer.content) < 1_000

    def chunks():  # no content-length: the limit holds while streaming
        for _ in range(100):
            yield b" " * 100_000

    answer = client.post("/api/recommend", content=chunks(), headers={"content-type": "application/json"})
    assert answer.status_code == 413, answer.text


def test_a_run_with_broken_results_is_reported_not_a_500(demo_overrides: list[str], tmp_path: Path) -> None:
    import shutil

    from fastapi.testclient import TestClient

    from pipeline.io import file_digest
    from pipeline.serve import Demo, create_app
    from pipeline.trained import find_run

    source = find_run(Recommender.from_config(load_config(TINY, demo_overrides)))
    folder = tmp_path / source.name
    shutil.copytree(source, folder)
    for broken in ("{}", "[1, 2]", "{not json"):
        (folder / "results.json").write_text(broken)
        manifest = json.loads((folder / "run.json").read_text())  # a consistent manifest: only the content is wrong
        manifest["files"]["results.json"] = file_digest(folder / "results.json")
        (folder / "run.json").write_text(json.dumps(manifest))
        client = TestClient(create_app(Demo(Recommender.from_config(load_config(TINY, demo_overrides), run=folder))))
        status = client.get("/api/status")
        assert status.status_code == 200, status.text
        run = client.get("/api/run")
        assert run.status_code == 200 and run.json()["available"] is False and "results.json" in run.json()["reason"]
        answer = client.post("/api/recommend", json={"user_id": 1, "k": 3, "explain": False})
        assert answer.status_code == 200, answer.text


# --- data files ----------------------------------------------------------------------------------------------

def _generic(tmp_path: Path, inter: str, items: str = "item_id,title\na,Alpha\nb,Beta\nc,Gamma\n", suffix: str = ".csv") -> Path:
    from pipeline.data import load_dataset

    write(tmp_path / f"inter{suffix}", inter)
    write(tmp_path / "items.csv", items)
    cfg = load_config(None, ["data.name=custom", "data.format=interactions", f"data.path={tmp_path / f'inter{suffix}'}",
                             f"data.items_path={tmp_path / 'items.csv'}", "data.min_user_interactions=3", "data.min_item_interactions=1"])
    return load_dataset(cfg.data, tmp_path / "cache")


GOOD = "user_id,item_id,rating,timestamp\nu,a,4,1\nu,b,3,2\nu,c,5,3\n"


@pytest.mark.parametrize(("bad_row", "message"), [
    ("v,a,inf,4", "line 5: rating must be a finite number, got 'inf'"),
    ("v,a,nan,4", "line 5: rating must be a finite number, got 'nan'"),
    ("v,a,4,1e30", "line 5: timestamp must be seconds (or milliseconds) since 1970"),
    ("v,a,4,-Infinity", "line 5: timestamp must be a finite number"),
    ("v,a,1e308,4", "line 5: rating must be within ±1e+06, got '1e308'"),
])
def test_non_finite_ratings_and_absurd_timestamps_name_the_line(tmp_path: Path, bad_row: str, message: str) -> None:
    with pytest.raises(DataError) as raised:
        _generic(tmp_path, GOOD + bad_row + "\n")
    assert message in str(raised.value)


def test_non_utf8_files_name_the_file_and_line(tmp_path: Path) -> None:
    from pipeline.data import load_dataset

    for name, suffix in (("inter.csv", ".csv"), ("inter.jsonl", ".jsonl")):
        text = GOOD if suffix == ".csv" else "".join(json.dumps({"user_id": "u", "item_id": i}) + "\n" for i in "abc")
        folder = tmp_path / name
        (folder).mkdir()
        _generic(folder, text, suffix=suffix)  # fine as UTF-8
        raw = (folder / name).read_bytes()
        (folder / name).write_bytes(raw.replace(b"b", b"\xff", 1) if suffix == ".jsonl" else raw + b"u,\xe9t\xe9,4,9\n")
        cfg = load_config(None, ["data.name=custom", "data.format=interactions", f"data.path={folder / name}",
                                 f"data.items_path={folder / 'items.csv'}", "data.min_item_interactions=1"])
        with pytest.raises(DataError, match=rf"{name} line \d+, byte \d+: not valid utf-8"):
            load_dataset(cfg.data, folder / "cache2")


def test_special_tokens_in_item_text_do_not_reach_the_embedder(embedder) -> None:  # noqa: ANN001
    hostile, plain = embedder.encode(["Heat [SEP] [CLS] (1995)", "Heat   (1995)"], description="test")
    assert float(hostile @ plain) > 0.9999
    assert float(embedder.encode(["Heat [SEP] [CLS] (1995)"])[0] @ embedder.encode(["Heat (1995) Comedy"])[0]) < 0.9999


def test_output_paths_are_checked_before_work(tmp_path: Path) -> None:
    blocker = write(tmp_path / "a-file", "x")
    _refused(_cli("evaluate", "-c", str(TINY), "--output", str(tmp_path)), f"--output {tmp_path} is a folder")
    _refused(_cli("evaluate", "-c", str(TINY), "--output", str(blocker / "r.json")), "a-file is a file, not a folder")
    _refused(_cli("train", "-c", str(TINY), "--set", f"output_dir={blocker}"), f"output_dir {blocker} is a file, not a folder")
    _refused(_cli("data", "info", "-c", str(TINY), "--set", f"cache_dir={blocker / 'c'}"), "a-file is a file, not a folder")
    _refused(_cli("recommend", "-u", "1", "-c", str(TINY), "--set", f"cache_dir={blocker}"), f"cache_dir {blocker} is a file")


# --- a second probe: new cases of the same classes --------------------------------------------------

def test_hostile_config_files_and_values(tmp_path: Path) -> None:
    bomb = ["anchors:", '  x0: &x0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    bomb += [f"  x{i}: &x{i} [{', '.join([f'*x{i - 1}'] * 9)}]" for i in range(1, 9)] + ["data: {name: *x8}"]
    cases = {
        write(tmp_path / "bomb.yaml", "\n".join(bomb) + "\n"): "expands to more than 100,000 values",
        tmp_path: "is a folder; pass a YAML file",
    }
    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    cases[tmp_path / "binary.yaml"] = "is not UTF-8 text"
    for path, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_config(path)
    for override, message in [("data.path=a\x01b", "is not valid YAML (unacceptable character"),
                              ("rerank.fusion_grid=[2.0, -1]", "fusion_grid.0: Input should be less than or equal to 1"),
                              ("rerank.fusion_grid=[]", "fusion_grid: List should have at least 1 item"),
                              ("eval.seed=-1", "eval.seed: Input should be greater than or equal to 0"),
                              ("tower.dim=100000000000", "tower.dim: Input should be less than or equal to 4096"),
                              ("eval.ks=[1000000000000]", "eval.ks.0: Input should be less than or equal to 10000")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(TINY, [override])
    _refused(_cli("config", "show", "-c", str(tmp_path / "bomb.yaml")), "expands to more than 100,000 values")


def test_hostile_cli_numbers() -> None:
    done = _cli("recommend", "-c", str(TINY), "-u", "1", "-k", "99999999999999999999")
    assert done.returncode == 2 and "Traceback" not in done.stderr and "-k" in done.stderr
    _refused(_cli("serve", "-c", str(TINY), "--timeout", "nan"), "--timeout must be a finite number of seconds, got nan")


def test_catalogue_years_and_nested_genres(tmp_path: Path) -> None:
    from pipeline.data import load_dataset

    items = "item_id,title,year\na,Alpha,99999999999999999999999\nb,Beta,²\nc,Gamma,1991\n"
    data = _generic(tmp_path / "years", GOOD, items)
    assert data.catalog.years == [None, None, 1991]  # unknown years are unknown, not a crash
    folder = tmp_path / "genres"
    write(folder / "inter.csv", GOOD)
    write(folder / "items.jsonl", "".join(json.dumps({"item_id": i, "title": i.upper(), "genres": g}) + "\n"
                                          for i, g in (("a", ["Drama"]), ("b", ["Drama", ["nested"]]), ("c", []))))
    cfg = load_config(None, ["data.name=custom", "data.format=interactions", f"data.path={folder / 'inter.csv'}",
                             f"data.items_path={folder / 'items.jsonl'}", "data.min_user_interactions=3", "data.min_item_interactions=1"])
    with pytest.raises(DataError, match=r"items\.jsonl line 2: genres must be a list of names"):
        load_dataset(cfg.data, folder / "cache")


def test_ids_longer_than_any_limit_reach_the_server(string_ids: tuple[Path, list[str]]) -> None:
    from fastapi.testclient import TestClient

    from pipeline.serve import Demo, create_app

    _, overrides = string_ids
    client = TestClient(create_app(Demo(Recommender.from_config(load_config(TINY, overrides)))))
    answer = client.post("/api/recommend", json={"history": [{"item_id": "x" * 300}], "k": 2, "explain": False})
    assert answer.status_code == 200, answer.text
    assert client.post("/api/recommend", json={"user_id": "１"}).status_code == 404  # a full-width digit is not user 1


def _rewrite_checkpoint(path: Path, meta: dict | None = None, poison: bool = False) -> None:
    with np.load(path) as payload:
        arrays = {k: payload[k] for k in payload.files}
    saved = json.loads(arrays["meta"].tobytes())
    saved.update(meta or {})
    arrays["meta"] = np.frombuffer(json.dumps(saved).encode(), dtype=np.uint8)
    if poison:
        arrays = {k: (np.full_like(v, np.nan) if k.startswith("state/") else v) for k, v in arrays.items()}
    with path.open("wb") as handle:
        np.savez(handle, **arrays)


@pytest.mark.parametrize(("edit", "message"), [
    ({"round": -5}, "round: Input should be greater than or equal to 0"),
    ({"round": "3"}, "round: Input should be a valid integer"),
    ({"round": 2.5}, "round: Input should be a valid integer"),
    ({"history": "not a list"}, "history: Input should be a valid list"),
    ({"history": [{"round": "x"}]}, "the history reports rounds ['x']"),
    ({"round": 10**9}, "round is 1000000000 but the history reports rounds [1]"),
    ({"poison": True}, "holds NaN or infinite values in"),
])
def test_edited_checkpoint_meta_and_weights_are_refused(checkpointed: Path, tmp_path: Path, edit: dict, message: str) -> None:
    import shutil

    from federation.runner import train
    from pipeline.trained import run_dir

    out = tmp_path / "runs"
    shutil.copytree(checkpointed, out)
    rec = Recommender.from_config(_trained_cfg(out, "federation.rounds=3"))
    poison = edit.pop("poison", False)
    _rewrite_checkpoint(run_dir(rec) / "checkpoint.npz", edit, poison=poison)
    with pytest.raises(FedrecError, match=re.escape(message)):
        train(rec, resume=True)


def test_a_run_with_non_finite_weights_is_refused(checkpointed: Path, tmp_path: Path) -> None:
    import shutil

    from pipeline.io import file_digest
    from pipeline.trained import RunError, load_trained, run_dir

    rec = Recommender.from_config(_trained_cfg(checkpointed, "federation.rounds=1"), run=None)
    folder = tmp_path / "run"
    shutil.copytree(run_dir(rec), folder)
    with np.load(folder / "best.npz") as saved:
        arrays = {k: np.full_like(v, np.nan) if np.issubdtype(v.dtype, np.floating) else v for k, v in saved.items()}
    with (folder / "best.npz").open("wb") as handle:
        np.savez(handle, **arrays)
    manifest = json.loads((folder / "run.json").read_text())
    manifest["files"]["best.npz"] = file_digest(folder / "best.npz")
    (folder / "run.json").write_text(json.dumps(manifest))
    with pytest.raises(RunError, match=r"best\.npz holds NaN or infinite values"):
        load_trained(folder, rec)


def test_a_dp_run_resumed_without_its_accountant_is_refused(tmp_path: Path) -> None:
    from federation.runner import train
    from pipeline.trained import run_dir

    dp = ["federation.dp_clip=1.0", "federation.dp_noise_multiplier=1.0"]
    rec = Recommender.from_config(_trained_cfg(tmp_path, "federation.rounds=1", *dp))
    first = train(rec)
    assert first["epsilon"] == min(first["epsilon_rdp"], first["epsilon_pld"]) > 0
    _rewrite_checkpoint(run_dir(rec) / "checkpoint.npz", {"accountant": None})
    with pytest.raises(FedrecError, match=r"privacy accounting None but this config needs PrivacyAccountant"):
        train(Recommender.from_config(_trained_cfg(tmp_path, "federation.rounds=2", *dp)), resume=True)
