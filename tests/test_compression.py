"""Compressed uploads: each codec against an independent reference, exact ArrayRecord round trips, error feedback,
hostile encodings rejected before averaging, and a federated run that sends fewer bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO

from federation.compression import CompressionError, compress, decode, encode, from_bf16, to_bf16, to_int8, to_sign
from federation.flower_apps import from_record, to_record
from pipeline.config import FederationConfig, load_config
from pipeline.recommender import Recommender

TINY = REPO / "configs" / "tiny.yaml"
ITEMS = "tower/residual.weight"


def _delta(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {ITEMS: rng.normal(size=(50, 8)).astype(np.float32), "tower/proj.weight": rng.normal(size=(8, 24)).astype(np.float32),
            "tower/norm.bias": rng.normal(size=(8,)).astype(np.float32), "soft/prompt": rng.normal(size=(4, 16)).astype(np.float32)}


def _fed(**kw) -> FederationConfig:
    return FederationConfig(**kw)


def _wire(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from flwr.common.serde import array_record_from_proto, array_record_to_proto

    return from_record(array_record_from_proto(array_record_to_proto(to_record(arrays))))


CODECS = [dict(upload_bits=16), dict(upload_bits=8), dict(upload_bits=1), dict(upload_rank=2), dict(upload_rows="touched"),
          dict(upload_rows="touched", upload_bits=1, soft_prompt_bits=1),
          dict(upload_rank=2, upload_bits=8, upload_rows="touched", soft_prompt_bits=16), dict(soft_prompt_bits=8)]


@pytest.mark.parametrize("codec", CODECS, ids=[",".join(f"{k}={v}" for k, v in c.items()) for c in CODECS])
def test_every_codec_round_trips_exactly_through_flowers_array_record(codec: dict) -> None:
    delta, cfg = _delta(), _fed(**codec)
    sent = encode(delta, cfg, touched=np.array([3, 1, 7, 7, 49]))
    back = _wire(sent)
    assert {k: (v.dtype, v.shape, v.tobytes()) for k, v in back.items()} == {k: (v.dtype, v.shape, v.tobytes()) for k, v in sent.items()}
    direct, wired = decode(sent, delta), decode(back, delta)
    assert all(direct[k].tobytes() == wired[k].tobytes() and direct[k].shape == delta[k].shape for k in delta)
    assert sum(v.nbytes for v in sent.values()) < sum(v.nbytes for v in delta.values())


def test_bf16_matches_torch_and_int8_is_within_half_a_step() -> None:
    x = np.random.default_rng(1).normal(scale=3, size=(40, 9)).astype(np.float32)
    x[0, 0], x[1, 1] = 1.00390625, -1.01171875  # ties between bf16 neighbours: rounded to even
    reference = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    assert np.array_equal(from_bf16(to_bf16(x)), reference)
    codes, scale = to_int8(x)
    assert codes.dtype == np.int8 and scale.shape == (1, 9)  # a tall matrix: one scale per column
    step = np.max(np.abs(x), axis=0, keepdims=True) / 127
    assert np.all(np.abs(codes * scale - x) <= step / 2 + 1e-6)
    assert to_int8(x.T)[1].shape == (9, 1) and to_int8(x[0])[1].shape == (1,)


def test_one_bit_is_the_sign_times_the_mean_magnitude() -> None:
    x = np.random.default_rng(2).normal(size=(30, 7)).astype(np.float32)
    out = decode(encode({ITEMS: x}, _fed(upload_bits=1)), {ITEMS: x})[ITEMS]
    assert np.allclose(out, np.where(x >= 0, 1, -1) * np.abs(x).mean(axis=0, keepdims=True), atol=1e-7)
    bits, _ = to_sign(x)
    assert bits.dtype == np.uint8 and bits.nbytes == (30 * 7 + 7) // 8


def test_low_rank_is_the_best_rank_r_approximation() -> None:
    x = _delta()[ITEMS]
    out = decode(encode({ITEMS: x}, _fed(upload_rank=3)), {ITEMS: x})[ITEMS]
    singular = np.linalg.svd(x.astype(np.float64), compute_uv=False)
    assert np.linalg.norm(out - x) == pytest.approx(np.sqrt(np.sum(singular[3:] ** 2)), rel=1e-5)  # Eckart–Young
    assert np.linalg.matrix_rank(out, tol=1e-4) == 3
    small = {"tower/norm.weight": np.ones((2, 3), np.float32)}  # rank 3 factors of a 2×3 matrix would be larger: sent whole
    assert set(encode(small, _fed(upload_rank=3))) == {"tower/norm.weight"}


def test_touched_rows_send_only_those_rows() -> None:
    delta = _delta()
    sent = encode(delta, _fed(upload_rows="touched"), touched=np.array([5, 2, 2, 9]))
    assert sent[f"{ITEMS}@rows"].tolist() == [2, 5, 9] and sent[f"{ITEMS}@values"].shape == (3, 8)
    out = decode(sent, delta)[ITEMS]
    assert np.array_equal(out[[2, 5, 9]], delta[ITEMS][[2, 5, 9]]) and not out[np.setdiff1d(np.arange(50), [2, 5, 9])].any()


def test_error_feedback_delays_what_was_dropped_but_loses_nothing() -> None:
    """Σ sent = Σ deltas − the carried error, exactly, whatever the codec drops each round."""
    cfg, carried, total_sent = _fed(upload_rank=1, upload_bits=8), None, None
    deltas = [_delta(seed) for seed in range(5)]
    for delta in deltas:
        sent, carried = compress(delta, cfg, carried=carried)
        got = decode(sent, delta)
        total_sent = got if total_sent is None else {k: total_sent[k] + got[k] for k in got}
    for k in deltas[0]:
        assert np.allclose(total_sent[k] + carried[k], sum(d[k] for d in deltas), atol=1e-4)
    assert compress(deltas[0], _fed(upload_bits=8, error_feedback=False))[1] == {}


def _hostile(case: str) -> dict[str, np.ndarray]:
    delta = _delta()
    sent = encode(delta, _fed(upload_rows="touched", upload_bits=8), touched=np.array([1, 4, 6]))
    if case == "wrong shape":
        sent["tower/proj.weight@q8"] = sent["tower/proj.weight@q8"][:, :5].copy()
    elif case == "out-of-range index":
        sent[f"{ITEMS}@rows"] = np.array([1, 4, 50], np.int32)
    elif case == "negative index":
        sent[f"{ITEMS}@rows"] = np.array([-1, 4, 6], np.int32)
    elif case == "duplicated index":
        sent[f"{ITEMS}@rows"] = np.array([1, 4, 4], np.int32)
    elif case == "NaN scale":
        sent["tower/norm.bias@scale"] = np.array([np.nan], np.float32)
    elif case == "negative scale":
        sent["tower/proj.weight@scale"] = -sent["tower/proj.weight@scale"] - 1
    elif case == "codes without scale":
        del sent["tower/norm.bias@scale"]
    elif case == "two forms":
        sent["tower/norm.bias"] = delta["tower/norm.bias"]
    elif case == "unknown encoding":
        sent["tower/norm.bias@zip"] = np.zeros(3, np.uint8)
    elif case == "unknown array":
        sent["tower/extra@q8"] = np.zeros(3, np.int8)
    elif case == "missing array":
        del sent["soft/prompt"]
    elif case == "float codes":
        sent["tower/norm.bias@q8"] = sent["tower/norm.bias@q8"].astype(np.float32)
    elif case == "float indices":
        sent[f"{ITEMS}@rows"] = sent[f"{ITEMS}@rows"].astype(np.float32)
    elif case.startswith("sign"):
        sent = encode(delta, _fed(upload_bits=1))
        if case == "sign bits cut":
            sent["tower/proj.weight@sign"] = sent["tower/proj.weight@sign"][:-1].copy()
        elif case == "sign shape bomb":
            sent["tower/proj.weight@shape"] = np.array([1 << 40, 1 << 40], np.int64)
        elif case == "sign shape wrong":
            sent["tower/proj.weight@shape"] = np.array([24, 8], np.int64)
        elif case == "sign without shape":
            del sent["tower/proj.weight@shape"]
    return _wire(sent)


HOSTILE = ["wrong shape", "out-of-range index", "negative index", "duplicated index", "NaN scale", "negative scale", "codes without scale",
           "two forms", "unknown encoding", "unknown array", "missing array", "float codes", "float indices",
           "sign bits cut", "sign shape bomb", "sign shape wrong", "sign without shape"]


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_compressed_update_is_refused_with_the_reason(case: str) -> None:
    with pytest.raises(CompressionError, match=r"\S"):
        decode(_hostile(case), _delta())


def _recommender(tmp_path: Path, *overrides: str) -> Recommender:
    cfg = load_config(TINY, ["federation.rounds=2", "tower.dim=16", "tower.max_len=10", "tower.layers=1",
                             "eval.max_users=30", f"output_dir={tmp_path}", *overrides])
    return Recommender.from_config(cfg)


def test_a_compressed_federated_run_sends_fewer_bytes_learns_and_resumes_exactly(tmp_path: Path) -> None:
    from federation.runner import train

    codec = ["federation.upload_rank=2", "federation.upload_bits=8", "federation.upload_rows=touched"]
    plain = train(_recommender(tmp_path / "plain", "federation.rounds=3"))
    whole = train(_recommender(tmp_path / "a", "federation.rounds=3", *codec))
    assert whole["bytes_up_per_client_round"] < plain["bytes_up_per_client_round"] / 4
    assert whole["bytes_down_per_client_round"] == plain["bytes_down_per_client_round"] == plain["state_bytes"]
    assert all(h["accepted"] == 4 for h in whole["history"]) and whole["history"][-1]["train_loss"] < whole["history"][0]["train_loss"]
    assert whole["history"][-1]["valid"] != plain["history"][-1]["valid"]  # the codec changed what was learned
    train(_recommender(tmp_path / "b", "federation.rounds=1", *codec))
    resumed = train(_recommender(tmp_path / "b", "federation.rounds=3", *codec), resume=True)  # the carried error is read back
    assert [h["valid"] for h in resumed["history"]] == [h["valid"] for h in whole["history"]] and resumed["test"] == whole["test"]


def test_hostile_compressed_replies_are_rejected_and_never_averaged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """Client 1 sends a duplicated row index each round: the run equals one in which client 1 never answered."""
    import federation.flower_apps as apps
    from federation.runner import train

    real_train, real_upload, current = apps.local_train, apps.upload, {}
    codec = ["federation.upload_rows=touched", "federation.upload_bits=8"]

    def local_train(state, data, cfg, *, seed, round_):
        current["partition"] = seed % 100_003
        if current["partition"] == 1 and current.get("silent"):
            raise RuntimeError("client 1 is down")
        return real_train(state, data, cfg, seed=seed, round_=round_)

    def upload(delta, data, cfg, *, round_):
        sent = real_upload(delta, data, cfg, round_=round_)
        if current["partition"] == 1:
            rows = sent[f"{ITEMS}@rows"] = sent[f"{ITEMS}@rows"].copy()
            rows[-1] = rows[0]
        return sent

    monkeypatch.setattr(apps, "local_train", local_train)
    monkeypatch.setattr(apps, "upload", upload)
    attacked = train(_recommender(tmp_path / "a", *codec))
    for report in attacked["history"]:
        assert report["accepted"] == 3 and any("duplicated row indices" in f["reason"] for f in report["failed"])
    assert "duplicated row indices" in caplog.text
    current["silent"] = True
    absent = train(_recommender(tmp_path / "b", *codec))
    assert [h["valid"] for h in attacked["history"]] == [h["valid"] for h in absent["history"]] and attacked["test"] == absent["test"]


@pytest.mark.parametrize("other", [dict(secagg=True), dict(dp_clip=1.0, dp_clip_on="client")])
def test_compression_refuses_what_needs_full_arrays(other: dict) -> None:
    with pytest.raises(ValueError, match=r"compressed uploads .* cannot be combined"):
        FederationConfig(upload_bits=8, **other)
    FederationConfig(upload_bits=8, dp_clip=1.0)  # server-side clipping decodes first
