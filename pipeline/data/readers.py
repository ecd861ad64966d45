"""Parsers for the interaction and catalogue formats fedrec reads.

Each reader returns a `RawData`: an interactions frame (user_id, item_id, rating, timestamp,
line) and an items frame (item_id, title, year, genres, tags). Every problem is reported with
the file, the line and the fix, never as a traceback from inside pandas.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import DataError

ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western",
)
MAX_RATING = 1e6
"""Largest rating magnitude accepted (any real scale fits; 1e308 would turn the profile's mean into inf)."""
MAX_TIMESTAMP = 253_402_300_799_999
"""Latest accepted timestamp: the end of year 9999 in milliseconds (seconds are far below it)."""
_YEAR = re.compile(r"\s*\((\d{4})(?:[-–]\d{0,4})?\)\s*$")
_ARTICLE = re.compile(r"^(?P<body>.+), (?P<art>The|A|An|Les|La|Le|L'|Il|El|Das|Die|Der|Los|Las|Det|Den)$")


@dataclass
class RawData:
    """Interactions and catalogue as read from disk, before any filtering."""

    interactions: pd.DataFrame
    items: pd.DataFrame
    files: dict[str, str] = field(default_factory=dict)


def clean_title(title: str) -> tuple[str, int | None]:
    """Split a MovieLens title into a readable title and its year.

    `"American President, The (1995)"` becomes `("The American President", 1995)`.
    """
    title = title.strip()
    year = None
    match = _YEAR.search(title)
    if match:
        year = int(match.group(1))
        title = title[: match.start()].strip()
    main, paren, rest = title.partition(" (")
    article = _ARTICLE.match(main)
    if article:
        art = article.group("art")
        main = f"{art}{'' if art.endswith(chr(39)) else ' '}{article.group('body')}"
    return (main + paren + rest).strip() or "(untitled)", year


def _line_of(frame: pd.DataFrame, position: int, header_lines: int) -> int:
    """Line number in the source file of row `position` (read_table records them; else rows are contiguous)."""
    lines = frame.attrs.get("lines")
    return int(lines[position]) if lines is not None else int(position) + 1 + header_lines


def decode(path: Path, encoding: str = "utf-8") -> str:
    """The text of `path`; a byte that is not `encoding` is reported with its line and column."""
    data = path.read_bytes()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(f"{path} line {line}, byte {column}: not valid {encoding} ({exc.reason}); re-save the file as {encoding}") from None


def read_table(path: Path, sep: str, columns: list[str], *, header: bool, encoding: str = "utf-8") -> pd.DataFrame:
    """Read a delimited file as strings, checking it has exactly `columns`.

    `::` separators (MovieLens 1M/10M) are rewritten to tabs first so the fast C parser runs.
    """
    if not path.is_file():
        raise DataError(f"{path} is missing; check data.path or let fedrec download the dataset")
    try:
        text = decode(path, encoding)
    except DataError:
        if encoding != "utf-8":
            raise
        text = path.read_bytes().decode("latin-1")  # older MovieLens files are Latin-1
    if not text.strip():
        raise DataError(f"{path} is empty; it must hold {', '.join(columns)} rows")
    if sep == "::":
        text, sep = text.replace("::", "\t"), "\t"
    quoting = csv.QUOTE_MINIMAL if sep == "," else csv.QUOTE_NONE
    lines = pd.Series(text.splitlines())
    numbers = np.flatnonzero(lines.str.strip().to_numpy() != "") + 1
    lines = lines.iloc[numbers - 1]
    counts = lines.str.count(re.escape(sep)).to_numpy() + 1
    if quoting == csv.QUOTE_MINIMAL:
        quoted = lines.str.contains('"', regex=False).to_numpy()
        counts[quoted] = [len(next(csv.reader([line], delimiter=sep))) for line in lines[quoted]]
    wrong = counts != len(columns)
    if wrong.any():
        row = int(np.argmax(wrong))
        if header and row == 0:
            raise DataError(
                f"{path} has {counts[0]} columns, expected {len(columns)} ({', '.join(columns)}); "
                "check the file format (data.format) and separator"
            )
        relation = "fewer than" if counts[row] < len(columns) else "more than"
        raise DataError(
            f"{path} line {numbers[row]}: {counts[row]} columns, {relation} the {len(columns)} expected "
            f"({', '.join(columns)}); fix or remove that row"
        )
    try:
        frame = pd.read_csv(
            io.StringIO(text), sep=sep, header=0 if header else None, dtype=str,
            keep_default_na=False, quoting=quoting, engine="c", skip_blank_lines=True,
        )
    except pd.errors.ParserError as exc:
        raise DataError(f"{path} could not be parsed as {len(columns)}-column text: {exc}") from None
    frame.columns = columns
    frame.attrs["lines"] = numbers[int(header):]
    if frame.empty:
        raise DataError(f"{path} has a header but no rows")
    return frame


def to_number(frame: pd.DataFrame, column: str, path: Path, header_lines: int, *, integer: bool,
              bounds: tuple[float, float] | None = None, meaning: str = "") -> pd.Series:
    """Convert a string column to numbers; the first bad value is reported with its line.

    With `bounds`, a value outside `[low, high]` is reported too, as `column must be {meaning}`.
    """
    values = pd.to_numeric(frame[column].str.strip(), errors="coerce")
    as_float = values.to_numpy(dtype=float, na_value=np.nan)
    bad = ~np.isfinite(as_float)  # missing, text, inf and nan alike
    if integer:
        bad |= (np.nan_to_num(as_float) % 1 != 0) | (np.abs(np.nan_to_num(as_float)) > 2**53)
    if bad.any():
        row = int(np.argmax(bad))
        kind = "an integer" if integer else "a finite number"
        raise DataError(
            f"{path} line {_line_of(frame, row, header_lines)}: {column} must be {kind}, "
            f"got {frame[column].iloc[row]!r}; fix or remove that row"
        )
    if bounds is not None:
        outside = (as_float < bounds[0]) | (as_float > bounds[1])
        if outside.any():
            row = int(np.argmax(outside))
            raise DataError(f"{path} line {_line_of(frame, row, header_lines)}: {column} must be {meaning}, "
                            f"got {frame[column].iloc[row]!r}; fix or remove that row")
    return values.astype("int64") if integer else values.astype("float64")


def _interactions(frame: pd.DataFrame, path: Path, header_lines: int, *, numeric_ids: bool) -> pd.DataFrame:
    lines = frame.attrs.get("lines")
    out = pd.DataFrame({"line": lines if lines is not None else np.arange(len(frame)) + 1 + header_lines})
    for column in ("user_id", "item_id"):
        if numeric_ids:
            out[column] = to_number(frame, column, path, header_lines, integer=True).to_numpy()
        else:
            out[column] = frame[column].str.strip().to_numpy()
            empty = (out[column] == "").to_numpy()
            if empty.any():
                raise DataError(f"{path} line {out['line'].iloc[int(np.argmax(empty))]}: {column} is empty; fill it in or remove the row")
    if "rating" in frame:
        out["rating"] = to_number(frame, "rating", path, header_lines, integer=False, bounds=(-MAX_RATING, MAX_RATING),
                                  meaning=f"within ±{MAX_RATING:g}").to_numpy()
    else:
        out["rating"] = np.nan
    if "timestamp" in frame:
        stamps = to_number(frame, "timestamp", path, header_lines, integer=False, bounds=(0, MAX_TIMESTAMP),
                           meaning=f"seconds (or milliseconds) since 1970, 0..{MAX_TIMESTAMP}")
        out["timestamp"] = np.floor(stamps.to_numpy()).astype("int64")
    else:
        out["timestamp"] = out["line"].to_numpy(dtype="int64")
    return out[["user_id", "item_id", "rating", "timestamp", "line"]]


def _items(ids: pd.Series, raw_titles: list[str], genres: list[tuple[str, ...]], years: list[int | None] | None = None) -> pd.DataFrame:
    titles, parsed_years = zip(*(clean_title(t) for t in raw_titles), strict=True) if raw_titles else ((), ())
    if years is not None:
        parsed_years = tuple(y if y is not None else p for y, p in zip(years, parsed_years, strict=True))
    return pd.DataFrame({
        "item_id": ids.to_numpy(),
        "title": list(titles),
        "year": pd.array(list(parsed_years), dtype="Int64"),
        "genres": genres,
        "tags": [()] * len(ids),
    })


def _years(values: pd.Series) -> list[int | None]:
    """A catalogue's year column: a year 1..9999 in ASCII digits, else unknown (None): catalogues write `unknown`, `²`
    or 20-digit noise there, and the year is only display text."""
    return [int(t) if re.fullmatch(r"[0-9]{1,4}", t := str(v).strip()) and int(t) > 0 else None for v in values]


def _names(values: pd.Series, column: str, sep: str, path: Path, header_lines: int) -> list[tuple[str, ...]]:
    """Genres or tags: a `sep`-separated string, or (JSON) a list of strings or numbers."""
    out = []
    for row, value in enumerate(values):
        if isinstance(value, list):
            if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
                raise DataError(f"{path} line {row + 1 + header_lines}: {column} must be a list of names (strings), "
                                f"got {str(value)[:60]}; flatten it")
            out.append(tuple(n for n in (str(v).strip() for v in value) if n))
        else:
            out.append(_split_genres(str(value), sep))
    return out


def _split_genres(text: str, sep: str) -> tuple[str, ...]:
    return tuple(g for g in (part.strip() for part in text.split(sep)) if g and g != "(no genres listed)")


def _check_catalogue(items: pd.DataFrame, path: Path) -> pd.DataFrame:
    if items.empty:
        raise DataError(f"{path} lists no items; the catalogue must hold at least one item")
    dup = items["item_id"].duplicated().to_numpy()
    if dup.any():
        raise DataError(
            f"{path}: item {items['item_id'].tolist()[int(np.argmax(dup))]!r} is listed twice; "
            "keep one row per item id"
        )
    return items


def read_ml100k(root: Path) -> RawData:
    """MovieLens 100K: tab-separated `u.data` and pipe-separated latin-1 `u.item`."""
    data_path, item_path = root / "u.data", root / "u.item"
    frame = read_table(data_path, "\t", ["user_id", "item_id", "rating", "timestamp"], header=False)
    inter = _interactions(frame, data_path, 0, numeric_ids=True)
    columns = ["item_id", "title", "release", "video", "url", *[f"g{i}" for i in range(len(ML100K_GENRES))]]
    items = read_table(item_path, "|", columns, header=False, encoding="latin-1")
    ids = to_number(items, "item_id", item_path, 0, integer=True)
    flags = items[[f"g{i}" for i in range(len(ML100K_GENRES))]].to_numpy() == "1"
    genres = [tuple(g for g, on in zip(ML100K_GENRES, row, strict=True) if on and g != "unknown") for row in flags]
    catalogue = _items(ids, items["title"].tolist(), genres)
    return RawData(inter, _check_catalogue(catalogue, item_path), {"interactions": str(data_path), "items": str(item_path)})


def _read_movielens(root: Path, ext: str, sep: str, *, header: bool, use_tags: bool) -> RawData:
    ratings_path, movies_path, tags_path = (root / f"{name}.{ext}" for name in ("ratings", "movies", "tags"))
    skip = int(header)
    frame = read_table(ratings_path, sep, ["user_id", "item_id", "rating", "timestamp"], header=header)
    inter = _interactions(frame, ratings_path, skip, numeric_ids=True)
    movies = read_table(movies_path, sep, ["item_id", "title", "genres"], header=header)
    ids = to_number(movies, "item_id", movies_path, skip, integer=True)
    catalogue = _items(ids, movies["title"].tolist(), [_split_genres(g, "|") for g in movies["genres"]])
    files = {"interactions": str(ratings_path), "items": str(movies_path)}
    if use_tags and tags_path.is_file():
        tags = read_table(tags_path, sep, ["user_id", "item_id", "tag", "timestamp"], header=header)
        tags["item_id"] = to_number(tags, "item_id", tags_path, skip, integer=True)
        catalogue["tags"] = _tags_by_item(catalogue["item_id"], tags)
        files["tags"] = str(tags_path)
    return RawData(inter, _check_catalogue(catalogue, movies_path), files)


def read_movielens_csv(root: Path, *, use_tags: bool = True) -> RawData:
    """MovieLens latest-small / 25M / 32M: `ratings.csv`, `movies.csv` and optional `tags.csv`."""
    return _read_movielens(root, "csv", ",", header=True, use_tags=use_tags)


def read_movielens_dat(root: Path, *, use_tags: bool = True) -> RawData:
    """MovieLens 1M / 10M: `ratings.dat`, `movies.dat` (and `tags.dat`) with `::` separators."""
    return _read_movielens(root, "dat", "::", header=False, use_tags=use_tags)


def _tags_by_item(item_ids: pd.Series, tags: pd.DataFrame) -> list[tuple[str, ...]]:
    """Tags per item, most frequent first (ties alphabetical), case-folded and deduplicated."""
    tags = tags.assign(tag=tags["tag"].str.strip().str.lower())
    tags = tags[tags["tag"] != ""]
    counts = tags.groupby(["item_id", "tag"]).size().reset_index(name="n")
    counts = counts.sort_values(["item_id", "n", "tag"], ascending=[True, False, True])
    grouped = counts.groupby("item_id")["tag"].apply(tuple).to_dict()
    return [grouped.get(i, ()) for i in item_ids]


def _atomic_header(path: Path) -> list[tuple[str, str]]:
    first = path.open(encoding="utf-8", errors="replace").readline().rstrip("\n")
    fields = []
    for part in first.split("\t"):
        name, sep, kind = part.partition(":")
        if not sep:
            raise DataError(
                f"{path} line 1: header field {part!r} lacks a type; RecBole atomic headers look like "
                "'user_id:token\\titem_id:token\\ttimestamp:float'"
            )
        fields.append((name, kind))
    return fields


def _single(root: Path, suffix: str) -> Path:
    found = sorted(root.glob(f"*{suffix}"))
    if len(found) != 1:
        raise DataError(f"{root} must hold exactly one *{suffix} file for the RecBole format, found {len(found)}")
    return found[0]


def read_recbole(root: Path) -> RawData:
    """RecBole atomic files: `<name>.inter` and `<name>.item`, tab-separated with typed headers."""
    inter_path, item_path = _single(root, ".inter"), _single(root, ".item")
    header = _atomic_header(inter_path)
    names = [n for n, _ in header]
    for required in ("user_id", "item_id"):
        if required not in names:
            raise DataError(f"{inter_path} line 1: no {required} field; RecBole .inter files need user_id and item_id")
    frame = read_table(inter_path, "\t", names, header=True)
    numeric = all(frame[c].str.fullmatch(r"[0-9]+").all() for c in ("user_id", "item_id"))
    inter = _interactions(frame[[c for c in names if c in ("user_id", "item_id", "rating", "timestamp")]], inter_path, 1, numeric_ids=numeric)
    item_header = _atomic_header(item_path)
    item_names = [n for n, _ in item_header]
    items = read_table(item_path, "\t", item_names, header=True)
    title_col = next((n for n in item_names if "title" in n or n == "name"), None)
    if title_col is None:
        raise DataError(f"{item_path} line 1: no title field (e.g. movie_title:token_seq); add one so items have text")
    genre_col = next((n for n in item_names if n in ("class", "genre", "genres", "categories")), None)
    year_col = next((n for n in item_names if "year" in n), None)
    ids = to_number(items, "item_id", item_path, 1, integer=True) if numeric else items["item_id"].str.strip()
    genres = [_split_genres(g, " ") for g in items[genre_col]] if genre_col else [()] * len(items)
    years = None
    if year_col:
        years = _years(items[year_col])
    catalogue = _items(ids, items[title_col].tolist(), genres, years)
    return RawData(inter, _check_catalogue(catalogue, item_path), {"interactions": str(inter_path), "items": str(item_path)})


def _read_records(path: Path) -> pd.DataFrame:
    """A CSV (with header) or JSON-lines file as a string frame."""
    if not path.is_file():
        raise DataError(f"{path} is missing; check data.path / data.items_path")
    if path.suffix in (".jsonl", ".ndjson", ".json"):
        rows = []
        for number, line in enumerate(decode(path).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as exc:
                reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
                raise DataError(f"{path} line {number}: invalid JSON ({reason}); fix or remove that line") from None
            if not isinstance(record, dict):
                raise DataError(f"{path} line {number}: expected a JSON object, got {type(record).__name__}")
            rows.append({k: v if isinstance(v, list) else ("" if v is None else str(v)) for k, v in record.items()})
        if not rows:
            raise DataError(f"{path} is empty")
        return pd.DataFrame(rows).fillna("")
    try:
        return pd.read_csv(io.StringIO(decode(path)), dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} is empty") from None
    except pd.errors.ParserError as exc:
        raise DataError(f"{path} could not be parsed as CSV: {exc}") from None


def read_interactions(path: Path, items_path: Path) -> RawData:
    """Generic interactions (CSV or JSONL: user_id, item_id[, rating][, timestamp]) plus a catalogue."""
    frame = _read_records(path)
    for required in ("user_id", "item_id"):
        if required not in frame:
            raise DataError(f"{path}: no {required} column; columns found: {', '.join(frame.columns)}")
    header_lines = 0 if path.suffix in (".jsonl", ".ndjson", ".json") else 1
    for optional in ("rating", "timestamp"):
        if optional in frame and (frame[optional] == "").all():
            frame = frame.drop(columns=optional)
    inter = _interactions(frame[[c for c in ("user_id", "item_id", "rating", "timestamp") if c in frame]], path, header_lines, numeric_ids=False)
    items = _read_records(items_path)
    for required in ("item_id", "title"):
        if required not in items:
            raise DataError(f"{items_path}: no {required} column; columns found: {', '.join(items.columns)}")
    header_lines = 0 if items_path.suffix in (".jsonl", ".ndjson", ".json") else 1
    genres = _names(items.get("genres", pd.Series([""] * len(items))), "genres", "|", items_path, header_lines)
    years = _years(items["year"]) if "year" in items else None
    catalogue = _items(items["item_id"].astype(str).str.strip(), items["title"].astype(str).tolist(), genres, years)
    if "tags" in items:
        catalogue["tags"] = _names(items["tags"], "tags", "|", items_path, header_lines)
    return RawData(inter, _check_catalogue(catalogue, items_path), {"interactions": str(path), "items": str(items_path)})
