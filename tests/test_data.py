"""Loaders, the benchmark protocol and every bad-input path of pipeline.data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import MOVIES, RATINGS, small_config, write

from pipeline.data import clean_title, k_core, leave_one_out, load_dataset
from pipeline.data.sources import detect_format, packaged_ml100k, verify_files
from pipeline.errors import DataError


def _load(path: Path, fmt: str = "auto", tmp: Path | None = None, **data: object):
    cfg = small_config(path, fmt, **data)
    return load_dataset(cfg.data, tmp or path.parent / "cache")


def _expected_sequences() -> dict[int, list[int]]:
    """Independent reference: 3-core on users, ordered by (timestamp, item id)."""
    by_user: dict[int, list[tuple[int, int]]] = {}
    for u, i, _, t in RATINGS:
        by_user.setdefault(u, []).append((t, i))
    return {u: [i for _, i in sorted(rows)] for u, rows in by_user.items() if len(rows) >= 3}


@pytest.mark.parametrize("fixture", ["movielens_csv", "ml100k_dir", "movielens_dat", "recbole_dir"])
def test_every_loader_reads_the_same_toy_dataset(fixture: str, request: pytest.FixtureRequest) -> None:
    root = request.getfixturevalue(fixture)
    dataset = _load(root)
    expected = _expected_sequences()
    assert dataset.user_ids.tolist() == sorted(expected)
    items = dataset.catalog.item_ids.tolist()
    assert items == [10, 20, 30, 40, 50]  # item 60 was only rated by the dropped user
    got = {int(u): [items[i] for i in seq] for u, seq in zip(dataset.user_ids, dataset.sequences, strict=True)}
    assert got == expected
    assert dataset.n_interactions == sum(len(v) for v in expected.values())


def test_same_timestamp_is_ordered_by_item_id(movielens_csv: Path) -> None:
    dataset = _load(movielens_csv)
    user2 = dataset.sequences[dataset.user_index(2)]
    ids = dataset.catalog.item_ids[user2].tolist()
    assert ids == [10, 20, 50, 30]  # 20 and 50 share t=150


def test_rows_out_of_order_in_the_file_give_the_same_dataset(movielens_csv: Path, tmp_path: Path) -> None:
    shuffled = tmp_path / "shuffled"
    rows = list(RATINGS)
    np.random.default_rng(3).shuffle(rows)
    write(shuffled / "ratings.csv", "userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},{r},{t}\n" for u, i, r, t in rows))
    write(shuffled / "movies.csv", (movielens_csv / "movies.csv").read_text())
    a, b = _load(movielens_csv), _load(shuffled)
    assert all(np.array_equal(x, y) for x, y in zip(a.sequences, b.sequences, strict=True))


def test_item_text_has_clean_title_year_genres_and_tags(movielens_csv: Path) -> None:
    catalog = _load(movielens_csv).catalog
    text = catalog.text(catalog.index_of(10))
    assert text == "Toy Story (1995). Genres: Adventure, Animation, Children. Tags: pixar, fun"
    assert catalog.label(catalog.index_of(20)) == "The American President (1995)"
    assert catalog.label(catalog.index_of(30)).startswith("Amélie")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Toy Story (1995)", ("Toy Story", 1995)),
        ("American President, The (1995)", ("The American President", 1995)),
        ("City of Lost Children, The (Cité des enfants perdus, La) (1995)", ("The City of Lost Children (Cité des enfants perdus, La)", 1995)),
        ("Babylon 5", ("Babylon 5", None)),
        ("Stranger Things (2016-)", ("Stranger Things", 2016)),
        ("unknown", ("unknown", None)),
    ],
)
def test_clean_title(raw: str, expected: tuple[str, int | None]) -> None:
    assert clean_title(raw) == expected


def test_generic_interactions_csv_and_jsonl(tmp_path: Path) -> None:
    inter = write(tmp_path / "events.csv", "user_id,item_id,timestamp\n" + "".join(f"u{u},m{i},{t}\n" for u, i, _, t in RATINGS))
    items = write(tmp_path / "items.jsonl", "".join(
        f'{{"item_id": "m{i}", "title": "{t.split(" (")[0]}", "genres": {g.split("|")!r}, "year": 1999}}\n'.replace("'", '"')
        for i, t, g in MOVIES))
    dataset = _load(inter, "interactions", items_path=str(items))
    assert dataset.user_ids.tolist() == [f"u{u}" for u in sorted(_expected_sequences())]
    assert np.isnan(dataset.ratings[0]).all()
    assert dataset.catalog.label(dataset.catalog.index_of("m10")) == "Toy Story (1999)"
    jsonl = write(tmp_path / "events.jsonl", "".join(f'{{"user_id": {u}, "item_id": "m{i}", "rating": {r}, "timestamp": {t}}}\n' for u, i, r, t in RATINGS))
    assert _load(jsonl, "interactions", items_path=str(items)).n_interactions == dataset.n_interactions


def test_packaged_ml100k_matches_the_grouplens_files(data_dir: Path, tmp_path: Path) -> None:
    from pipeline.config import DataConfig

    packaged = packaged_ml100k()
    assert packaged is not None, "recbole is installed by `make setup`"
    a = load_dataset(DataConfig(name="ml-100k"), tmp_path)
    b = load_dataset(DataConfig(name="ml-100k", path=data_dir / "ml-100k"), tmp_path)
    assert a.source["origin"] == "packaged"
    assert (a.n_users, a.n_items, a.n_interactions) == (b.n_users, b.n_items, b.n_interactions)
    assert all(np.array_equal(x, y) for x, y in zip(a.sequences, b.sequences, strict=True))


def test_ml_latest_small_protocol_counts(data_dir: Path, tmp_path: Path) -> None:
    """docs/DESIGN.md: 5-core ml-latest-small has 610 users, 3,650 items, 90,274 interactions."""
    import pandas as pd

    from pipeline.config import DataConfig

    dataset = load_dataset(DataConfig(name="ml-latest-small", path=data_dir / "ml-latest-small"), tmp_path)
    # Independent k-core with plain pandas groupby, for the same counts.
    frame = pd.read_csv(data_dir / "ml-latest-small" / "ratings.csv")
    while True:
        keep = frame.groupby("userId")["movieId"].transform("size").ge(5) & frame.groupby("movieId")["userId"].transform("size").ge(5)
        if keep.all():
            break
        frame = frame[keep]
    assert (dataset.n_users, dataset.n_items, dataset.n_interactions) == (frame.userId.nunique(), frame.movieId.nunique(), len(frame))
    assert (dataset.n_users, dataset.n_items, dataset.n_interactions) == (610, 3650, 90274)
    split = dataset.split()
    last = frame.sort_values(["userId", "timestamp", "movieId"]).groupby("userId").tail(1)
    assert dataset.catalog.item_ids[split.targets("test")].tolist() == last["movieId"].tolist()


def test_env_data_dir_is_used_and_verified(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.config import DataConfig

    monkeypatch.setenv("FEDREC_DATA_DIR", str(data_dir))
    dataset = load_dataset(DataConfig(name="ml-latest-small"), tmp_path)
    assert dataset.source["origin"] == "env"


def test_k_core_repeats_until_stable() -> None:
    import pandas as pd

    # Round 1 drops user 4 (one row); item c then has one row and goes; then user 3 has one row and goes.
    rows = [(1, "a"), (1, "b"), (2, "a"), (2, "b"), (3, "a"), (3, "c"), (4, "c")]
    frame = pd.DataFrame(rows, columns=["user_id", "item_id"])
    out = k_core(frame, 2, 2)
    assert sorted(map(tuple, out.to_numpy().tolist())) == [(1, "a"), (1, "b"), (2, "a"), (2, "b")]


# --- bad input -------------------------------------------------------------------------------


def test_missing_directory_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"does not exist; point it at"):
        _load(tmp_path / "nope")


def test_missing_file_names_the_file(movielens_csv: Path) -> None:
    (movielens_csv / "movies.csv").unlink()
    with pytest.raises(DataError, match=r"movies\.csv is missing"):
        _load(movielens_csv, "movielens-csv")


def test_unrecognised_directory_lists_expected_files(tmp_path: Path) -> None:
    write(tmp_path / "d" / "notes.txt", "hi")
    with pytest.raises(DataError, match=r"expected u\.data .* ratings\.csv"):
        detect_format(tmp_path / "d")


def test_wrong_column_count_names_the_line(movielens_csv: Path) -> None:
    with (movielens_csv / "ratings.csv").open("a") as f:
        f.write("7,10,4.0,100,extra\n")
    with pytest.raises(DataError, match=r"ratings\.csv line 24: 5 columns, more than the 4 expected"):
        _load(movielens_csv)


def test_too_few_columns_names_the_line(ml100k_dir: Path) -> None:
    with (ml100k_dir / "u.data").open("a") as f:
        f.write("7\t10\n")
    with pytest.raises(DataError, match=r"u\.data line 23: 2 columns, fewer than the 4 expected"):
        _load(ml100k_dir)


def test_non_numeric_id_names_line_and_value(movielens_dat: Path) -> None:
    with (movielens_dat / "ratings.dat").open("a") as f:
        f.write("abc::10::4::100\n")
    with pytest.raises(DataError, match=r"ratings\.dat line 23: user_id must be an integer, got 'abc'"):
        _load(movielens_dat)


def test_non_numeric_timestamp(movielens_csv: Path) -> None:
    with (movielens_csv / "ratings.csv").open("a") as f:
        f.write("1,50,4.0,yesterday\n")
    with pytest.raises(DataError, match=r"line 24: timestamp must be a finite number, got 'yesterday'"):
        _load(movielens_csv)


def test_negative_timestamp(movielens_csv: Path) -> None:
    with (movielens_csv / "ratings.csv").open("a") as f:
        f.write("1,50,4.0,-5\n")
    with pytest.raises(DataError, match=r"line 24: timestamp must be seconds \(or milliseconds\) since 1970, 0\.\.253402300799999, got '-5'"):
        _load(movielens_csv)


def test_duplicate_rows_are_an_error_with_both_lines(movielens_csv: Path) -> None:
    with (movielens_csv / "ratings.csv").open("a") as f:
        f.write("1,20,3.0,900\n")
    with pytest.raises(DataError, match=r"line 24: user 1 and item 20 repeat line 3 .* data\.duplicates=keep_first"):
        _load(movielens_csv)
    assert _load(movielens_csv, duplicates="keep_first").n_interactions == len(RATINGS) - 2


def test_empty_catalogue(movielens_csv: Path) -> None:
    write(movielens_csv / "movies.csv", "movieId,title,genres\n")
    with pytest.raises(DataError, match=r"movies\.csv has a header but no rows"):
        _load(movielens_csv)


def test_empty_file(ml100k_dir: Path) -> None:
    write(ml100k_dir / "u.data", "")
    with pytest.raises(DataError, match=r"u\.data is empty"):
        _load(ml100k_dir)


def test_items_missing_from_catalogue(movielens_csv: Path) -> None:
    with (movielens_csv / "ratings.csv").open("a") as f:
        f.write("1,999,3.0,900\n")
    with pytest.raises(DataError, match=r"1 item ids .* missing from the catalogue .* data\.missing_items=drop"):
        _load(movielens_csv)
    assert 999 not in _load(movielens_csv, missing_items="drop").catalog.item_ids


def test_duplicate_catalogue_entry(movielens_csv: Path) -> None:
    with (movielens_csv / "movies.csv").open("a") as f:
        f.write("10,Toy Story again (1995),Comedy\n")
    with pytest.raises(DataError, match=r"item 10 is listed twice"):
        _load(movielens_csv)


def test_nothing_survives_the_core_filter(movielens_csv: Path) -> None:
    with pytest.raises(DataError, match=r"no interactions survive the 50/1-core .* lower data\.min_user_interactions"):
        _load(movielens_csv, min_user_interactions=50)


def test_users_with_fewer_than_three_interactions() -> None:
    with pytest.raises(DataError, match=r"user index 1 has 2 interactions; leave-one-out needs at least 3"):
        leave_one_out([np.array([1, 2, 3]), np.array([1, 2])])


def test_corrupt_file_fails_its_checksum(data_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "ml-latest-small"
    root.mkdir()
    for name in ("ratings.csv", "movies.csv"):
        (root / name).write_bytes((data_dir / "ml-latest-small" / name).read_bytes())
    with (root / "ratings.csv").open("a") as f:
        f.write("1,1,5.0,1\n")
    with pytest.raises(DataError, match=r"does not match the SHA-256 of ml-latest-small .* data\.name=custom"):
        verify_files("ml-latest-small", root)


def test_no_download_and_no_copy_says_where_it_looked(tmp_path: Path) -> None:
    from pipeline.config import DataConfig

    with pytest.raises(DataError, match=r"dataset ml-1m not found \(looked in: .*\); set data\.path"):
        load_dataset(DataConfig(name="ml-1m", download=False), tmp_path)


def test_download_failure_is_clear_and_leaves_nothing(tmp_path: Path) -> None:
    from pipeline.data.sources import download

    with pytest.raises(DataError, match=r"could not download .* set data\.path or FEDREC_DATA_DIR"):
        download("ml-100k", tmp_path, base_url="http://127.0.0.1:9")
    assert list(tmp_path.iterdir()) == []


def test_download_verifies_the_digest(tmp_path: Path) -> None:
    """A served archive whose bytes differ from the published digest is refused and removed."""
    import http.server
    import threading
    import zipfile

    served = tmp_path / "served"
    served.mkdir()
    with zipfile.ZipFile(served / "ml-100k.zip", "w") as zf:
        zf.writestr("ml-100k/u.data", "1\t1\t5\t1\n")
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(served), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        from pipeline.data.sources import download

        target = tmp_path / "cache"
        with pytest.raises(DataError, match=r"has sha256 .* expected 50d2a982.*Nothing was kept"):
            download("ml-100k", target, base_url=f"http://127.0.0.1:{server.server_port}")
        assert not any(target.iterdir())
    finally:
        server.shutdown()
