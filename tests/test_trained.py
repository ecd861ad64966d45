"""The trained run is the product: train → run folder → evaluate through FAISS gives the training metrics, and
recommend / serve / batch / LangChain return what that evaluation ranks; bad run folders are refused with the reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from pipeline.config import load_config
from pipeline.recommender import Recommender

TINY = REPO / "configs" / "tiny.yaml"
TRAIN = ["federation.rounds=2", "tower.dim=16", "tower.max_len=20", "tower.layers=1", "eval.max_users=30"]


def _rec(out: Path, *overrides: str, run: object = "auto") -> Recommender:
    return Recommender.from_config(load_config(TINY, [*TRAIN, f"output_dir={out}", *overrides]), run=run)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    from federation.runner import train

    out = tmp_path_factory.mktemp("runs")
    results = train(_rec(out))
    return out, results


def test_run_folder_holds_state_embeddings_indices_results_and_card(trained: tuple[Path, dict]) -> None:
    from pipeline.trained import run_dir

    out, results = trained
    folder = run_dir(_rec(out))
    for name in ("best.npz", "item_embeddings.npy", "results.json", "MODEL_CARD.md", "run.json", "checkpoint.npz"):
        assert (folder / name).is_file(), name
    assert sorted(p.name for p in (folder / "index").iterdir()) == [f"client-{i:05d}.faiss" for i in range(4)]
    manifest = json.loads((folder / "run.json").read_text())
    assert manifest["complete"] and manifest["best_round"] == results["best_round"]
    assert set(manifest["fingerprint"]["sections"]) >= {"serving", "data", "partition", "tower", "federation"}
    card = (folder / "MODEL_CARD.md").read_text()
    assert "ml-100k" in card and f"{results['test']['R@10']:.4f}" in card and "ε = ∞" in card
    embeddings = np.load(folder / "item_embeddings.npy")
    rec = _rec(out)
    assert embeddings.shape == (rec.dataset.n_items, 16)
    assert np.allclose(rec.trained.tower.item_matrix(), embeddings)


def test_evaluate_through_faiss_equals_the_training_metrics(trained: tuple[Path, dict]) -> None:
    from pipeline.evaluate import evaluate_recommender

    out, results = trained
    rec = _rec(out, "eval.splits=[test]", "eval.baselines=[popularity]")
    assert rec.trained is not None and "trained tower" in rec.retrieval_source
    report = evaluate_recommender(rec)
    tower = next(r for r in report["rows"] if r["model"].startswith("tower"))
    for key, value in results["test"].items():
        assert round(tower[key], 4) == round(value, 4), key
    popularity = next(r for r in report["rows"] if r["model"] == "popularity")
    assert tower["R@10"] != popularity["R@10"] or tower["N@10"] != popularity["N@10"]


def test_recommend_returns_the_evaluation_ranking_from_the_clients_faiss_index(trained: tuple[Path, dict]) -> None:
    out, _ = trained
    rec = _rec(out)
    scores = rec.score_users(np.arange(5), "test")
    histories = rec.split.histories("test")
    for user in range(5):
        row = scores[user].copy()
        row[histories[user]] = -np.inf
        expected = [rec.dataset.catalog.item_ids[i] for i in np.argsort(-row, kind="stable")[:10]]
        got = [r.item_id for r in rec.recommend(rec.dataset.user_ids[user], k=10)]
        assert got == [e.item() for e in expected]
    # the query is the tower's, searched in the user's own client index (not zero-shot text)
    tower = rec.trained.tower
    query = tower.encode([histories[0]])
    _, ids = rec.trained.index(int(rec.client_of[0])).search(query, 10, exclude=[histories[0]])
    assert [rec.dataset.catalog.item_ids[i] for i in ids[0]] == [r.item_id for r in rec.recommend(rec.dataset.user_ids[0], k=10)]
    # the FAISS scores are the tower's exact inner products (an independent matmul on the same weights)
    exact = tower.encode(histories[:5]) @ rec.trained.item_embeddings.T
    finite = np.isfinite(scores)
    assert np.allclose(scores[finite], exact[finite], atol=1e-4) and (~finite).sum() == sum(len(set(h)) for h in histories[:5])
    text = _rec(out, run=None).recommend(rec.dataset.user_ids[0], k=10)
    assert [r.item_id for r in text] != [r.item_id for r in rec.recommend(rec.dataset.user_ids[0], k=10)]


def test_serve_and_langchain_use_the_run(trained: tuple[Path, dict]) -> None:
    from fastapi.testclient import TestClient
    from langchain_core.callbacks import CallbackManagerForRetrieverRun

    from pipeline.serve import Demo, create_app
    from retrieval.langchain import ItemRetriever

    out, _ = trained
    rec = _rec(out)
    client = TestClient(create_app(Demo(rec)))
    status = client.get("/api/status").json()
    assert status["retrieval"].startswith("trained tower")
    user = rec.dataset.user_ids[3].item()
    expected = [r.item_id for r in rec.recommend(user, k=20)]
    history = rec.split.histories("test")[3]
    langchain = ItemRetriever(retriever=rec.retriever, item_texts=rec.item_texts, item_ids=list(rec.dataset.catalog.item_ids), k=20,
                              history=tuple(history.tolist()))
    docs = langchain._get_relevant_documents("anything", run_manager=CallbackManagerForRetrieverRun.get_noop_manager())
    assert [d.metadata["item_id"] for d in docs] == expected
    bare = TestClient(create_app(Demo(_rec(out / "nowhere"))))
    assert bare.get("/api/status").json()["retrieval"].startswith("zero-shot text retrieval")


def test_bad_run_folders_are_refused_with_the_reason(trained: tuple[Path, dict], tmp_path: Path) -> None:
    from pipeline.trained import RunError, load_trained, run_dir

    out, _ = trained
    rec = _rec(out)
    folder = run_dir(rec)
    with pytest.raises(RunError, match="does not exist"):
        load_trained(tmp_path / "missing", rec)
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    (copy / "run.json").unlink()
    with pytest.raises(RunError, match="run.json is missing"):
        load_trained(copy, rec)
    shutil.copy(folder / "run.json", copy / "run.json")
    best = (copy / "best.npz").read_bytes()
    (copy / "best.npz").write_bytes(best[: len(best) // 2])
    with pytest.raises(RunError, match=r"best.npz does not match the digest"):
        load_trained(copy, rec)
    (copy / "best.npz").write_bytes(best)
    (copy / "run.json").write_text("{not json")
    with pytest.raises(RunError, match="corrupt"):
        load_trained(copy, rec)
    shutil.copy(folder / "run.json", copy / "run.json")
    with pytest.raises(RunError, match=r"another configuration: tower: run has .*'dim': 16"):
        load_trained(copy, _rec(out, "tower.dim=32", run=None))
    foreign = json.loads((folder / "run.json").read_text())
    foreign["fingerprint"]["sections"]["serving"]["dataset"] = "ml-latest-small"
    (copy / "run.json").write_text(json.dumps(foreign))
    with pytest.raises(RunError, match="dataset: run has 'ml-latest-small', this config has 'ml-100k'"):
        load_trained(copy, rec)


def test_a_stale_index_is_rebuilt_from_the_run_embeddings(trained: tuple[Path, dict], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from pipeline.trained import load_trained, run_dir

    out, _ = trained
    rec = _rec(out, run=None)
    copy = tmp_path / "run"
    shutil.copytree(run_dir(rec), copy)
    from retrieval import ItemIndex

    ItemIndex.build(np.random.default_rng(0).normal(size=(rec.dataset.n_items, 16)).astype(np.float32), meta={"embeddings": "other"}).save(
        copy / "index" / "client-00001.faiss")
    run = load_trained(copy, rec)
    index = run.index(1)
    assert "rebuilding" in caplog.text
    scores, ids = index.search(run.item_embeddings[:2], 3)
    exact = run.item_embeddings[:2] @ run.item_embeddings.T
    assert np.allclose(scores, np.sort(exact, axis=1)[:, ::-1][:, :3], atol=1e-4)


def test_a_run_without_run_json_is_not_served_and_no_run_falls_back_to_text(trained: tuple[Path, dict], tmp_path: Path) -> None:
    from pipeline.trained import find_run, run_dir

    out, _ = trained
    rec = _rec(out)
    assert find_run(rec) == run_dir(rec)
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    (run_dir(_rec(copy)) / "run.json").unlink()
    fallback = _rec(copy)
    assert fallback.trained is None and fallback.retrieval_source.startswith("zero-shot text retrieval")
    assert fallback.recommend(fallback.dataset.user_ids[0], k=3)


def test_cli_evaluate_and_recommend_with_run(trained: tuple[Path, dict]) -> None:
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.trained import run_dir

    out, results = trained
    folder = run_dir(_rec(out))
    sets = [a for o in [*TRAIN, f"output_dir={out}", "eval.splits=[test]", "eval.baselines=[popularity]"] for a in ("--set", o)]
    runner = CliRunner()
    done = runner.invoke(app, ["evaluate", "-c", str(TINY), *sets, "--run", str(folder)], catch_exceptions=False)
    assert done.exit_code == 0, done.output
    assert "trained tower" in done.output and f"{results['test']['R@10']:.4f}".lstrip("0") in done.output
    done = runner.invoke(app, ["recommend", "-u", "1", "-c", str(TINY), *sets, "--run", str(out / "nope")])
    assert done.exit_code != 0 and "does not exist" in str(done.exception)


def test_soft_prompt_settings_name_their_own_run_folder(tmp_path: Path) -> None:
    """Two runs that differ only in their soft prompt (personal tokens, tokens, users per round) must not share a folder:
    one would resume, serve or overwrite the other's arrays. Stopping rules still continue the same folder."""
    from pipeline.trained import run_dir

    soft = "soft_prompt.enabled=true"
    folders = {run_dir(_rec(tmp_path, soft, *extra, run=None)) for extra in
               ([], ["soft_prompt.personal_tokens=2"], ["soft_prompt.tokens=4"], ["soft_prompt.users=1"])}
    assert len(folders) == 4
    assert run_dir(_rec(tmp_path, soft, "federation.rounds=7", "federation.patience=2", run=None)) == run_dir(_rec(tmp_path, soft, run=None))
    assert run_dir(_rec(tmp_path, run=None)) == run_dir(_rec(tmp_path, "soft_prompt.tokens=4", run=None)), \
        "a tower-only run does not depend on the unused soft-prompt settings"
