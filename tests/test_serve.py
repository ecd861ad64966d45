"""The demo's JSON API through FastAPI's test client: every endpoint, every bad input, a failing and a slow LLM."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.llm.base import LLMError  # noqa: E402
from pipeline.recommender import Recommender  # noqa: E402
from pipeline.serve import Demo, create_app  # noqa: E402


@pytest.fixture(scope="module")
def demo(demo_overrides: list[str]) -> Demo:
    return Demo(Recommender.from_config(load_config(REPO / "configs" / "tiny.yaml", demo_overrides)), timeout_s=60)


@pytest.fixture(scope="module")
def client(demo: Demo) -> TestClient:
    return TestClient(create_app(demo))


def test_status_names_model_backend_dataset_index_and_soft_prompt(client: TestClient, demo: Demo) -> None:
    status = client.get("/api/status").json()
    assert status["dataset"] == "ml-100k" and status["items"] == demo.rec.dataset.n_items == status["index_size"]
    assert status["model"] == demo.rec.cfg.llm.model and "transformers" in status["backend"]
    assert status["soft_prompt"]["loaded"] and status["soft_prompt"]["round"] == 1
    assert status["retrieval"].startswith("trained tower")


def test_page_static_files_and_schema(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and 'id="search"' in page.text and "/static/app.js" in page.text
    assert "async function recommend" in client.get("/static/app.js").text
    schema = client.get("/openapi.json").json()
    assert {"/api/recommend", "/api/items", "/api/status", "/api/users", "/api/run"} <= set(schema["paths"])
    assert "RecommendRequest" in schema["components"]["schemas"]


def test_search_and_users(client: TestClient) -> None:
    found = client.get("/api/items", params={"q": "toy story"}).json()
    assert found and all("toy story" in item["title"].lower() for item in found)
    assert client.get("/api/items", params={"q": "zzzz-no-such-title"}).json() == []
    users = client.get("/api/users", params={"limit": 5}).json()
    assert len(users) == 5 and all(u["history_length"] > 0 for u in users)


def test_recommend_for_an_existing_user(client: TestClient, demo: Demo) -> None:
    user = client.get("/api/users", params={"limit": 1}).json()[0]["user_id"]
    result = client.post("/api/recommend", json={"user_id": user, "k": 5}).json()
    candidates, ranked = result["candidates"], result["ranked"]
    assert result["profile"] and len(candidates) == demo.rec.cfg.retrieval.num_candidates and len(ranked) == 5
    assert [c["retrieval_rank"] for c in candidates] == list(range(1, len(candidates) + 1))
    by_id = {c["item_id"]: c for c in candidates}
    for r in ranked:
        assert r["item_id"] in by_id and by_id[r["item_id"]]["retrieval_rank"] == r["retrieval_rank"]
        assert r["moved"] == r["retrieval_rank"] - r["rank"] and 0 <= r["llm_probability"] <= 1
    assert set(result["timings_ms"]) == {"retrieve", "rerank", "explain"}
    explained = result["explanations"]
    assert [e["item_id"] for e in explained] == [r["item_id"] for r in ranked[:3]]
    assert result["explanation"] == "\n".join(e["sentence"] for e in explained)
    cat = demo.rec.dataset.catalog
    history = set(demo.rec.split.histories("test")[demo.rec.dataset.user_index(user)].tolist())
    for e, r in zip(explained, ranked, strict=False):
        assert e["space"] == "tower" and e["source"] == "template" and e["fallback"] is None
        assert (e["rank"], e["retrieval_rank"], e["moved"]) == (r["rank"], r["retrieval_rank"], r["moved"]) and e["movement"]
        pick = cat.index_of(e["item_id"])
        assert e["genres"] == list(cat.genres[pick]) and e["nearest"]
        for n in e["nearest"]:
            near = cat.index_of(n["item_id"])
            assert near in history and n["title"] in e["sentence"]
            assert n["shared_genres"] == [g for g in cat.genres[pick] if g in cat.genres[near]]


def test_recommend_for_an_ad_hoc_history_and_the_toggles(client: TestClient) -> None:
    liked = [item["item_id"] for q in ("toy story", "star wars", "fargo") for item in client.get("/api/items", params={"q": q}).json()[:1]]
    body = {"history": [{"item_id": i, "rating": 5} for i in liked], "k": 10, "explain": False}
    zero_shot = client.post("/api/recommend", json=body).json()
    assert zero_shot["explanation"] is None and zero_shot["explanations"] == [] and not zero_shot["soft_prompt"]
    assert not {c["item_id"] for c in zero_shot["candidates"]} & set(liked)
    assert [h["item_id"] for h in zero_shot["history"]] == liked
    trained = client.post("/api/recommend", json={**body, "soft_prompt": True}).json()
    assert trained["soft_prompt"] and trained["candidates"] == zero_shot["candidates"]
    assert not np.allclose([r["llm_probability"] for r in trained["ranked"]], [r["llm_probability"] for r in zero_shot["ranked"]])
    retrieval_order = client.post("/api/recommend", json={**body, "fusion_weight": 0.0}).json()
    assert retrieval_order["fusion_weight"] == 0.0 and all(r["moved"] == 0 for r in retrieval_order["ranked"])


def test_llm_explanations_of_the_tiny_model_fall_back_to_the_template_and_say_so(demo: Demo) -> None:
    cfg = demo.rec.cfg
    llm = demo.rec.with_cfg(cfg.model_copy(update={"rerank": cfg.rerank.model_copy(update={"explain_mode": "llm"})}))
    result = TestClient(create_app(Demo(llm, timeout_s=60))).post("/api/recommend", json={"user_id": 1, "k": 2}).json()
    explained = result["explanations"]
    assert len(explained) == 2 and all(e["source"] == "template" and "showing the template" in e["fallback"] for e in explained)
    assert all(n["title"] in e["sentence"] for e in explained for n in e["nearest"])


def test_explanations_without_a_run_use_the_text_space(demo: Demo) -> None:
    bare = TestClient(create_app(Demo(Recommender(demo.rec.cfg, demo.rec.dataset, run=None), timeout_s=60)))
    result = bare.post("/api/recommend", json={"user_id": 1, "k": 1}).json()
    assert [e["space"] for e in result["explanations"]] == ["text"] and "text-embedding space" in result["explanation"]


@pytest.mark.parametrize(("body", "status", "names"), [
    ({"user_id": "no-such-user"}, 404, "user_id"),
    ({"history": []}, 422, "history"),
    ({"history": [{"item_id": 999999}, {"item_id": "nope"}]}, 422, "999999"),
    ({"history": [{"item_id": 1}] * 501}, 422, "history"),
    ({"user_id": 1, "history": [{"item_id": 1}]}, 422, "exactly one"),
    ({}, 422, "exactly one"),
    ({"user_id": 1, "k": 0}, 422, "k:"),
    ({"user_id": 1, "fusion_weight": 2}, 422, "fusion_weight"),
    ({"user_id": 1, "colour": "red"}, 422, "colour"),
    ({"history": [{"item_id": 1, "rating": "great"}]}, 422, "history.0.rating"),
])
def test_bad_requests_name_the_field(client: TestClient, body: dict, status: int, names: str) -> None:
    response = client.post("/api/recommend", json=body)
    assert response.status_code == status, response.text
    assert names in response.json()["detail"]


def test_malformed_json_and_bad_query_parameters(client: TestClient) -> None:
    response = client.post("/api/recommend", content=b'{"user_id": 1,', headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and "JSON" in response.json()["detail"]
    assert "q:" in client.get("/api/items", params={"q": ""}).json()["detail"]
    assert "limit:" in client.get("/api/items", params={"q": "a", "limit": 500}).json()["detail"]


def test_run_panel_data(client: TestClient) -> None:
    run = client.get("/api/run").json()
    assert run["available"] and run["rounds"] == 1 and len(run["valid_ndcg10"]) == 1 and run["bytes_up"][0] > 0
    assert "N@10" in run["test"] and "by_client" not in run["test_rerank"]


def test_failing_slow_and_busy_backends_give_503(demo: Demo, client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = demo.rec.backend

    def down(*args: object, **kwargs: object) -> None:
        raise LLMError("connection refused by http://127.0.0.1:9/v1")

    monkeypatch.setattr(backend, "score_labels", down)
    response = client.post("/api/recommend", json={"user_id": 1, "explain": False})
    assert response.status_code == 503 and "connection refused" in response.json()["detail"]

    real = type(backend).score_labels

    def slow(*args: object, **kwargs: object):  # noqa: ANN202
        time.sleep(1.5)
        return real(backend, *args, **kwargs)

    monkeypatch.setattr(backend, "score_labels", slow)
    monkeypatch.setattr(demo, "timeout_s", 0.3)
    start = time.perf_counter()
    response = client.post("/api/recommend", json={"user_id": 1, "explain": False})
    assert response.status_code == 503 and "did not answer within" in response.json()["detail"]
    assert time.perf_counter() - start < 1.4
    time.sleep(1.5)  # let the abandoned work finish before the next test

    monkeypatch.setattr(demo, "_admitted", demo.max_queue)
    response = client.post("/api/recommend", json={"user_id": 1})
    assert response.status_code == 503 and "queued" in response.json()["detail"]


def test_soft_prompt_without_a_run_is_a_clear_409(demo: Demo, tmp_path: Path) -> None:
    bare = Demo(Recommender(demo.rec.cfg, demo.rec.dataset, run=None))
    client = TestClient(create_app(bare))
    assert not client.get("/api/status").json()["soft_prompt"]["loaded"]
    response = client.post("/api/recommend", json={"user_id": 1, "soft_prompt": True, "explain": False})
    assert response.status_code == 409 and "soft_prompt" in response.json()["detail"]
    assert client.get("/api/run").json()["available"] is False


def test_serve_command_rejects_a_folder_that_is_not_a_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import sys

    from pipeline.cli import main

    monkeypatch.setattr(sys, "argv", ["fedrec", "serve", "--config", str(REPO / "configs" / "tiny.yaml"), "--run", str(tmp_path)])
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 2 and "run.json is missing" in capsys.readouterr().out
