"""FAISS indices against numpy brute force, the embedder and its cache, retrievers, LangChain."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import ConfigError, IndexMismatchError
from retrieval import EmbeddingRetriever, ItemIndex, Query, TextEmbedder, brute_force


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize(("n", "dim", "k"), [(1, 3, 1), (97, 13, 5), (1031, 37, 20), (2003, 384, 50)])
def test_flat_index_matches_numpy(n: int, dim: int, k: int) -> None:
    rng = np.random.default_rng(n)
    vectors, queries = _unit(rng, n, dim), _unit(rng, 23, dim)
    index = ItemIndex.build(vectors, "Flat")
    scores, ids = index.search(queries, min(k, n))
    ref_scores, ref_ids = brute_force(vectors, queries, min(k, n))
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
    # Ids may only differ where scores tie within float error.
    mismatch = ids != ref_ids
    assert np.allclose(scores[mismatch], ref_scores[mismatch], atol=1e-5)


def test_history_is_excluded_and_rows_are_filled() -> None:
    rng = np.random.default_rng(0)
    vectors, queries = _unit(rng, 211, 16), _unit(rng, 4, 16)
    index = ItemIndex.build(vectors)
    _, top = brute_force(vectors, queries, 40)
    exclude = [top[0, :30], [], top[2, :1], np.arange(200)]
    scores, ids = index.search(queries, 10, exclude=exclude)
    for row, banned in enumerate(exclude):
        assert not set(ids[row].tolist()) & set(np.asarray(banned).tolist())
    allowed = np.setdiff1d(np.arange(211), exclude[0])
    assert ids[0].tolist() == allowed[np.argsort(-(vectors[allowed] @ queries[0]), kind="stable")][:10].tolist()
    assert (ids[3] >= 0).sum() == 10 and set(ids[3].tolist()) <= set(range(200, 211))


def test_too_few_items_pads_with_minus_one() -> None:
    index = ItemIndex.build(_unit(np.random.default_rng(1), 3, 8))
    scores, ids = index.search(_unit(np.random.default_rng(2), 1, 8), 5, exclude=[[0]])
    assert ids[0, 2:].tolist() == [-1, -1, -1] and np.isneginf(scores[0, 2:]).all()


@pytest.mark.parametrize(
    ("factory", "nprobe", "floor"),
    [("HNSW32", 1, 0.95), ("IVF32,Flat", 32, 0.999), ("IVF32,Flat", 8, 0.5), ("IVF16,PQ8", 16, 0.3)],
)
def test_approximate_indices_recall_against_flat(factory: str, nprobe: int, floor: float) -> None:
    """IVF probing every list is exact; partial probing and PQ trade recall for speed."""
    rng = np.random.default_rng(7)
    vectors, queries = _unit(rng, 3001, 32), _unit(rng, 50, 32)
    _, exact = ItemIndex.build(vectors).search(queries, 10)
    _, approx = ItemIndex.build(vectors, factory, nprobe=nprobe).search(queries, 10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx.tolist(), exact.tolist(), strict=True)])
    assert recall >= floor, f"{factory} recall@10 vs Flat {recall:.3f}"


def test_save_load_round_trip(tmp_path: Path) -> None:
    vectors = _unit(np.random.default_rng(3), 50, 12)
    index = ItemIndex.build(vectors, "HNSW32", meta={"key": "abc"})
    path = index.save(tmp_path / "i.faiss")
    loaded = ItemIndex.load(path, expected_dim=12, expected_meta={"key": "abc"})
    q = vectors[:3]
    assert np.array_equal(index.search(q, 5)[1], loaded.search(q, 5)[1])
    assert loaded.factory == "HNSW32" and [p.name for p in tmp_path.iterdir()] == ["i.faiss"]


def test_index_for_another_dimension_is_refused(tmp_path: Path) -> None:
    path = ItemIndex.build(_unit(np.random.default_rng(3), 20, 12)).save(tmp_path / "i.faiss")
    with pytest.raises(IndexMismatchError, match=r"built for 12-dim vectors but the embedder gives 384-dim; rebuild"):
        ItemIndex.load(path, expected_dim=384)
    index = ItemIndex.load(path)
    with pytest.raises(IndexMismatchError, match=r"query vectors have dimension 8 but the index was built for dimension 12"):
        index.search(np.zeros((1, 8), dtype=np.float32), 3)
    with pytest.raises(IndexMismatchError, match=r"built with key=None, expected 'x'"):
        ItemIndex.load(path, expected_meta={"key": "x"})


def test_bad_index_inputs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"index\.factory='Flt' is not a valid FAISS factory string"):
        ItemIndex.build(np.zeros((4, 8), dtype=np.float32), "Flt")
    with pytest.raises(ConfigError, match=r"needs at least 256 vectors to train 256 lists, got 40"):
        ItemIndex.build(_unit(np.random.default_rng(0), 40, 8), "IVF256,Flat")
    with pytest.raises(ValueError, match=r"empty catalogue"):
        ItemIndex.build(np.zeros((0, 8), dtype=np.float32))
    with pytest.raises(ValueError, match=r"NaN or infinite"):
        ItemIndex.build(np.full((2, 2), np.nan, dtype=np.float32))
    with pytest.raises(FileNotFoundError, match=r"fedrec index build"):
        ItemIndex.load(tmp_path / "missing.faiss")
    (tmp_path / "junk.faiss").write_bytes(b"not an index")
    with pytest.raises(ValueError, match=r"is not a fedrec index file"):
        ItemIndex.load(tmp_path / "junk.faiss")


def test_packaged_minilm_embeds_and_caches(embedder: TextEmbedder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cached = TextEmbedder(cache_dir=tmp_path)
    texts = ["Toy Story (1995). Genres: Animation", "Heat (1995). Genres: Crime", "Amélie (2001) — ünïcödé"]
    first = cached.encode(texts)
    assert first.shape == (3, 384) and first.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    assert first[0] @ first[1] < 0.99
    assert len(list(tmp_path.glob("*.npy"))) == 1

    def boom(*args, **kwargs):
        raise AssertionError("cache miss: the model was called")

    monkeypatch.setattr(cached, "_encode", boom)
    np.testing.assert_array_equal(cached.encode(texts), first)
    assert cached.cache_key(texts) != cached.cache_key(texts[:2])
    assert cached.cache_key(texts) != TextEmbedder(normalize=False).cache_key(texts)


def test_missing_embedding_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(OSError, match=r"embedder\.model=.* could not be loaded .* local model directory"):
        TextEmbedder(str(tmp_path / "no-model")).encode(["x"])


@pytest.fixture(scope="module")
def toy_retriever():
    rng = np.random.default_rng(5)
    items = _unit(rng, 60, 16)
    profile_vec = _unit(rng, 1, 16)

    def embed(texts: list[str]) -> np.ndarray:
        return np.repeat(profile_vec, len(texts), axis=0)

    return items, profile_vec, embed


@pytest.mark.parametrize("mode", ["history", "profile", "hybrid"])
def test_retriever_modes_match_manual_scores(toy_retriever, mode: str) -> None:
    items, profile_vec, embed = toy_retriever
    retriever = EmbeddingRetriever(ItemIndex.build(items), items, embed, mode=mode, history_weight=0.5, recency_decay=0.5)
    history = [3, 7, 11]
    found = retriever.retrieve(Query(history, "a profile"), 10)
    w = np.array([0.25, 0.5, 1.0])
    pooled = w @ items[history] / w.sum()
    pooled /= np.linalg.norm(pooled)
    query = {"history": pooled, "profile": profile_vec[0], "hybrid": 0.5 * pooled + 0.5 * profile_vec[0]}[mode]
    query = query / np.linalg.norm(query)
    scores = items @ query
    scores[history] = -np.inf
    assert [c.item for c in found] == np.argsort(-scores, kind="stable")[:10].tolist()
    np.testing.assert_allclose([c.score for c in found], np.sort(scores)[::-1][:10], atol=1e-5)


def test_retriever_input_errors(toy_retriever) -> None:
    items, _, embed = toy_retriever
    index = ItemIndex.build(items)
    with pytest.raises(ValueError, match=r"needs an embedder"):
        EmbeddingRetriever(index, items, None, mode="profile")
    with pytest.raises(ValueError, match=r"needs a profile; query 0 has none"):
        EmbeddingRetriever(index, items, embed, mode="profile").retrieve(Query((1,)), 3)
    with pytest.raises(ValueError, match=r"item_vectors has shape \(10, 16\) but the index holds \(60, 16\)"):
        EmbeddingRetriever(index, items[:10], embed)


def test_empty_history_uses_the_profile(toy_retriever) -> None:
    items, profile_vec, embed = toy_retriever
    retriever = EmbeddingRetriever(ItemIndex.build(items), items, embed, mode="hybrid")
    found = retriever.retrieve(Query((), "p"), 5)
    assert [c.item for c in found] == np.argsort(-(items @ profile_vec[0]), kind="stable")[:5].tolist()


def test_langchain_retriever_returns_item_documents(toy_retriever) -> None:
    from langchain_core.retrievers import BaseRetriever

    from retrieval.langchain import ItemRetriever

    items, _, embed = toy_retriever
    inner = EmbeddingRetriever(ItemIndex.build(items), items, embed, mode="hybrid")
    lc = ItemRetriever(retriever=inner, item_texts=[f"item {i}" for i in range(60)], item_ids=[1000 + i for i in range(60)], k=4, history=[1, 2])
    assert isinstance(lc, BaseRetriever)
    docs = lc.invoke("likes slow cinema")
    assert len(docs) == 4
    expected = inner.retrieve(Query((1, 2), "likes slow cinema"), 4)
    assert [d.metadata["item_index"] for d in docs] == [c.item for c in expected]
    assert docs[0].page_content == f"item {expected[0].item}" and docs[0].metadata["item_id"] == 1000 + expected[0].item
    assert docs[0].metadata["score"] == pytest.approx(expected[0].score)
