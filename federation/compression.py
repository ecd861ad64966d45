"""Compressed uploads: a client encodes its delta into a few small named arrays; the server decodes them before validation.

Each array of the delta is sent in one structural form, then its numbers in one numeric form:

- structure: as is (`key`); the item table as the rows the client's own histories touched
  (`key@rows` int32 indices + `key@values`, `federation.upload_rows=touched`); or a matrix as
  rank-r factors from its truncated SVD (`key@u` `(n, r)` and `key@v` `(r, d)`,
  `federation.upload_rank`, in the spirit of CoLR) when that is smaller;
- numbers: fp32; bf16 (`…@bf16`, the top 16 bits, rounded to nearest even); int8 with fp32
  scales per row or column (`…@q8` + `…@scale`); or one bit each, the scaled sign of 1-bit SGD
  (`…@sign` packed bits + `…@scale`, the mean magnitude per row or column, + `…@shape`).
  `federation.upload_bits` picks the tower's, `federation.soft_prompt_bits` the soft prompt and
  projector's.

With `federation.error_feedback`, what a client's upload dropped is kept on the client and added
to its next delta, so the dropped part is delayed rather than lost. Encoded arrays are plain
numpy arrays of fixed dtypes, so they travel through Flower's ArrayRecord bit for bit. The
decoder trusts nothing: every name, dtype, shape, index and scale is checked, and a reply that
fails a check is rejected with the reason, before anything is averaged.
"""

from __future__ import annotations

import numpy as np

from federation.core import State
from pipeline.config import FederationConfig
from retrieval.tower import ITEM_TABLE_KEYS

SEP = "@"
STRUCTURES = ("rows", "values", "u", "v")
NUMERIC = ("bf16", "q8", "sign", "scale", "shape")
MAX_NUMBERS = 1 << 30
"""Most numbers one decoded array may hold (a declared shape beyond it is refused before any allocation)."""
SOFT_PREFIX = "soft/"


class CompressionError(ValueError):
    """A compressed update that cannot be decoded into the global state's shapes."""


def to_bf16(x: np.ndarray) -> np.ndarray:
    """fp32 → bf16 bit patterns as uint16, rounded to nearest even (what `torch.bfloat16` does)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))
    return (rounded >> 16).astype(np.uint16)


def from_bf16(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) → fp32."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _scale_axis(shape: tuple[int, ...]) -> int | None:
    """The axis int8 scales run along: one scale per row of a wide matrix, per column of a tall one, one for a vector."""
    if len(shape) != 2:
        return None
    return 0 if shape[0] <= shape[1] else 1


def _reduce(x: np.ndarray, fn) -> np.ndarray:  # noqa: ANN001 - np.max / np.mean
    """`fn(|x|)` over each row (wide matrix), column (tall matrix) or the whole array, kept broadcastable."""
    axis = _scale_axis(x.shape)
    if not x.size:
        return np.zeros(_scale_shape(x.shape), np.float32)
    return fn(np.abs(x), keepdims=True) if axis is None else fn(np.abs(x), axis=1 - axis, keepdims=True)


def _scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    axis = _scale_axis(shape)
    return (1,) * len(shape) if axis is None else tuple(n if a == axis else 1 for a, n in enumerate(shape))


def to_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """fp32 → (int8 codes, fp32 scales) with `x ≈ codes · scales`; a scale is max|x| / 127 over its row, column or array."""
    scale = (_reduce(x, np.max) / 127.0).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0)
    codes = np.clip(np.rint(x / safe), -127, 127).astype(np.int8)
    return codes, scale


def from_int8(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return (codes.astype(np.float32) * scale).astype(np.float32)


def to_sign(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """fp32 → (packed sign bits, fp32 scales) with `x ≈ ±scale`; a scale is mean|x| over its row, column or array."""
    return np.packbits(np.ascontiguousarray(x).reshape(-1) >= 0), _reduce(x, np.mean).astype(np.float32)


def from_sign(bits: np.ndarray, scale: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    count = int(np.prod(shape, dtype=np.int64))
    signs = np.unpackbits(bits, count=count).reshape(shape).astype(np.float32) * 2 - 1
    return (signs * scale).astype(np.float32)


def low_rank(x: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """The best rank-`rank` factors `(u, v)` of matrix `x` (truncated SVD, singular values folded into u)."""
    left, sing, right = np.linalg.svd(x.astype(np.float64), full_matrices=False)
    return (left[:, :rank] * sing[:rank]).astype(np.float32), right[:rank].astype(np.float32)


def _numeric(name: str, leaf: np.ndarray, bits: int) -> State:
    if bits == 16:
        return {f"{name}{SEP}bf16": to_bf16(leaf)}
    if bits == 8:
        codes, scale = to_int8(leaf)
        return {f"{name}{SEP}q8": codes, f"{name}{SEP}scale": scale}
    if bits == 1:
        signs, scale = to_sign(leaf)
        return {f"{name}{SEP}sign": signs, f"{name}{SEP}scale": scale, f"{name}{SEP}shape": np.asarray(leaf.shape, np.int64).reshape(-1)}
    return {name: np.ascontiguousarray(leaf, dtype=np.float32)}


def encode(delta: State, cfg: FederationConfig, *, touched: np.ndarray | None = None) -> State:
    """`delta` as the configured upload. `touched`: the item ids in the client's histories (for `upload_rows=touched`)."""
    out: State = {}
    for key, value in delta.items():
        if SEP in key:
            raise CompressionError(f"array name {key!r} contains {SEP!r}, which compressed uploads reserve")
        bits = cfg.soft_prompt_bits if key.startswith(SOFT_PREFIX) else cfg.upload_bits
        if key in ITEM_TABLE_KEYS and cfg.upload_rows == "touched":
            if touched is None:
                raise ValueError("federation.upload_rows=touched needs the item ids the client's histories touched")
            rows = np.unique(np.asarray(touched, dtype=np.int64))
            rows = rows[(rows >= 0) & (rows < value.shape[0])].astype(np.int32)
            out[f"{key}{SEP}rows"] = rows
            leaves = {f"{key}{SEP}values": value[rows]}
        elif cfg.upload_rank is not None and value.ndim == 2 and cfg.upload_rank * sum(value.shape) < value.size:
            u, v = low_rank(value, cfg.upload_rank)
            leaves = {f"{key}{SEP}u": u, f"{key}{SEP}v": v}
        else:
            leaves = {key: value}
        for name, leaf in leaves.items():
            out.update(_numeric(name, leaf, bits))
    return out


def _take(sent: State, name: str, used: set[str]) -> np.ndarray | None:
    """The fp32 leaf `name` in whichever numeric form it was sent (None when absent)."""
    forms = [n for n in (name, f"{name}{SEP}bf16", f"{name}{SEP}q8", f"{name}{SEP}sign") if n in sent]
    if len(forms) > 1:
        raise CompressionError(f"{name}: sent in more than one form ({forms})")
    if not forms:
        return None
    form = forms[0]
    used.add(form)
    value = np.asarray(sent[form])
    if form == name:
        if value.dtype != np.float32:
            raise CompressionError(f"{name}: dtype {value.dtype}, expected float32")
        return value
    if form.endswith("bf16"):
        if value.dtype != np.uint16:
            raise CompressionError(f"{form}: dtype {value.dtype}, expected uint16 (bf16 bits)")
        return from_bf16(value)
    scale_name = f"{name}{SEP}scale"
    if scale_name not in sent:
        raise CompressionError(f"{form}: codes without their {scale_name}")
    used.add(scale_name)
    scale = np.asarray(sent[scale_name])
    if scale.dtype != np.float32:
        raise CompressionError(f"{scale_name}: dtype {scale.dtype}, expected float32")
    if not np.isfinite(scale).all() or (scale < 0).any():
        raise CompressionError(f"{scale_name}: scales must be finite and non-negative")
    if form.endswith("q8"):
        if value.dtype != np.int8:
            raise CompressionError(f"{form}: dtype {value.dtype}, expected int8")
        shape = value.shape
    else:
        shape = _declared_shape(sent, name, used)
        if value.dtype != np.uint8 or value.shape != ((int(np.prod(shape, dtype=np.int64)) + 7) // 8,):
            raise CompressionError(f"{form}: expected {(int(np.prod(shape, dtype=np.int64)) + 7) // 8} packed uint8 bytes for shape {shape}, "
                                   f"got {value.dtype} {value.shape}")
    if scale.shape != _scale_shape(shape):
        raise CompressionError(f"{scale_name}: shape {scale.shape}, expected {_scale_shape(shape)} for an array of shape {shape}")
    return from_int8(value, scale) if form.endswith("q8") else from_sign(value, scale, shape)


def _declared_shape(sent: State, name: str, used: set[str]) -> tuple[int, ...]:
    shape_name = f"{name}{SEP}shape"
    if shape_name not in sent:
        raise CompressionError(f"{name}{SEP}sign: sign bits without their {shape_name}")
    used.add(shape_name)
    declared = np.asarray(sent[shape_name])
    if declared.dtype != np.int64 or declared.ndim != 1 or declared.size > 8 or (declared < 0).any():
        raise CompressionError(f"{shape_name}: expected at most 8 non-negative int64 dimensions, got {declared.dtype} {declared.tolist()}")
    if int(np.prod(declared.astype(object))) > MAX_NUMBERS:
        raise CompressionError(f"{shape_name}: {declared.tolist()} holds more than {MAX_NUMBERS:,} numbers")
    return tuple(int(n) for n in declared)


def _expect(name: str, value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if value.shape != shape:
        raise CompressionError(f"{name}: shape {value.shape}, expected {shape}")
    return value


def decode(sent: State, reference: State) -> State:
    """The full delta an upload encodes, in `reference`'s names and shapes; CompressionError says what is wrong."""
    known = set(reference)
    for name in sent:
        base, *suffixes = name.split(SEP)
        if base not in known:
            raise CompressionError(f"{name}: no array {base!r} in the global state")
        if len(suffixes) > 2 or any(s not in STRUCTURES + NUMERIC for s in suffixes):
            raise CompressionError(f"{name}: unknown encoding {SEP.join(suffixes)!r}")
    used: set[str] = set()
    out: State = {}
    for key, ref in reference.items():
        shape = tuple(ref.shape)
        whole = _take(sent, key, used)
        rows_name = f"{key}{SEP}rows"
        values, u, v = (_take(sent, f"{key}{SEP}{part}", used) for part in ("values", "u", "v"))
        forms = [f for f, present in (("whole", whole is not None), ("rows", rows_name in sent or values is not None),
                                      ("low-rank", u is not None or v is not None)) if present]
        if len(forms) != 1:
            raise CompressionError(f"{key}: sent as {forms or 'nothing'}; expected exactly one of whole, rows or low-rank")
        if whole is not None:
            out[key] = _expect(key, whole, shape)
        elif forms == ["rows"]:
            out[key] = _rows(key, sent, values, shape, used)
        else:
            if u is None or v is None or u.ndim != 2 or v.ndim != 2 or len(shape) != 2:
                raise CompressionError(f"{key}: low-rank needs both factors {key}{SEP}u (n, r) and {key}{SEP}v (r, d) of a matrix")
            rank = u.shape[1]
            _expect(f"{key}{SEP}u", u, (shape[0], rank))
            _expect(f"{key}{SEP}v", v, (rank, shape[1]))
            if not 1 <= rank <= min(shape):
                raise CompressionError(f"{key}: rank {rank} outside 1..{min(shape)}")
            out[key] = (u.astype(np.float64) @ v.astype(np.float64)).astype(np.float32)
    unused = sorted(set(sent) - used)
    if unused:
        raise CompressionError(f"arrays {unused[:3]} belong to no decoded array")
    return out


def _rows(key: str, sent: State, values: np.ndarray | None, shape: tuple[int, ...], used: set[str]) -> np.ndarray:
    rows_name = f"{key}{SEP}rows"
    if rows_name not in sent or values is None:
        raise CompressionError(f"{key}: row updates need both {rows_name} and {key}{SEP}values")
    used.add(rows_name)
    rows = np.asarray(sent[rows_name])
    if rows.dtype not in (np.int32, np.int64) or rows.ndim != 1:
        raise CompressionError(f"{rows_name}: expected a 1-d int32 array of row indices, got {rows.dtype} {rows.shape}")
    if len(shape) != 2:
        raise CompressionError(f"{key}: row updates need a matrix, the global array has shape {shape}")
    if rows.size and (rows.min() < 0 or rows.max() >= shape[0]):
        raise CompressionError(f"{rows_name}: indices outside 0..{shape[0] - 1}")
    if np.unique(rows).size != rows.size:
        raise CompressionError(f"{rows_name}: duplicated row indices")
    _expect(f"{key}{SEP}values", values, (rows.size, shape[1]))
    full = np.zeros(shape, np.float32)
    full[rows] = values
    return full


def compress(delta: State, cfg: FederationConfig, *, touched: np.ndarray | None = None, carried: State | None = None,
             ) -> tuple[State, State]:
    """Encode `delta` (plus the error `carried` over from earlier rounds) → (the upload, the error to carry on).

    Without error feedback the returned error is empty.
    """
    target = {k: (v + carried[k]).astype(np.float32) if carried and k in carried else v for k, v in delta.items()}
    sent = encode(target, cfg, touched=touched)
    if not cfg.error_feedback:
        return sent, {}
    decoded = decode(sent, target)
    return sent, {k: (target[k] - decoded[k]).astype(np.float32) for k in target}
