"""Federated training through Flower's Message API: in-process grid, payload round trip, resume, failures, DP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from federation.flower_apps import from_record, to_record
from pipeline.config import load_config
from pipeline.recommender import Recommender

TINY = REPO / "configs" / "tiny.yaml"


def _recommender(tmp_path: Path, *overrides: str, run: Path | str | None = "auto") -> Recommender:
    cfg = load_config(TINY, ["federation.rounds=2", "tower.dim=16", "tower.max_len=10", "tower.layers=1",
                             "eval.max_users=30", f"output_dir={tmp_path}", *overrides])
    return Recommender.from_config(cfg, run=run)


def test_array_record_round_trip_is_bit_exact() -> None:
    rng = np.random.default_rng(0)
    state = {"tower/a": rng.normal(size=(7, 3)).astype(np.float32), "tower/b": rng.normal(size=5), "tower/c": np.arange(4, dtype=np.int64),
             "tower/d": np.array([3.5], dtype=np.float32), "tower/e": np.asfortranarray(rng.normal(size=(3, 2)).astype(np.float32))}
    from flwr.common.serde import array_record_from_proto, array_record_to_proto

    record = to_record(state)
    back = from_record(array_record_from_proto(array_record_to_proto(record)))
    assert list(back) == list(state)
    for k in state:
        assert back[k].dtype == state[k].dtype and back[k].shape == state[k].shape
        assert back[k].tobytes() == np.ascontiguousarray(state[k]).tobytes()
    with pytest.raises(ValueError, match=r"0-d"):
        to_record({"x": np.array(1.0)})


def test_federated_training_in_process_learns_and_accounts_bytes(tmp_path: Path) -> None:
    from federation.runner import train

    rec = _recommender(tmp_path)
    results = train(rec)
    assert results["rounds"] == 2 and len(results["history"]) == 2
    first, last = results["history"]
    assert first["accepted"] == 4 and first["rejected"] == [] and first["applied"] and first["update_norm_median"] > 0
    assert last["train_loss"] < first["train_loss"]
    state_bytes = results["state_bytes"]
    assert first["bytes_down"] == 4 * state_bytes and first["bytes_up"] == 4 * state_bytes
    assert (rec.cfg.output_dir / next(p.name for p in tmp_path.iterdir() if p.name.startswith("train-")) / "results.json").is_file()


def test_resume_gives_the_same_result_as_an_uninterrupted_run(tmp_path: Path) -> None:
    from federation.runner import train

    whole = train(_recommender(tmp_path / "a", "federation.rounds=3"))
    train(_recommender(tmp_path / "b", "federation.rounds=1"))
    resumed = train(_recommender(tmp_path / "b", "federation.rounds=3"), resume=True)
    assert [h["valid"] for h in resumed["history"]] == [h["valid"] for h in whole["history"]]
    assert resumed["test"] == whole["test"]
    with pytest.raises(Exception, match=r"no checkpoint"):
        train(_recommender(tmp_path / "c"), resume=True)


def test_failing_and_invalid_clients_do_not_stop_the_round(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    import federation.flower_apps as apps
    from federation.runner import train

    real = apps.local_train

    def flaky(state, data, cfg, *, seed, round_):
        partition = seed % 100_003
        if partition == 1:
            raise RuntimeError("client 1 lost power")
        delta, n, metrics = real(state, data, cfg, seed=seed, round_=round_)
        if partition == 2:
            key = next(iter(delta))
            delta[key] = np.full_like(delta[key], np.nan)
        return delta, n, metrics

    monkeypatch.setattr(apps, "local_train", flaky)
    results = train(_recommender(tmp_path, "federation.rounds=1", "federation.min_clients=2"))
    (report,) = results["history"]
    assert report["applied"] and report["accepted"] == 2 and len(report["failed"]) == 1
    assert report["rejected"] == [{"client": 2, "reason": report["rejected"][0]["reason"]}]
    assert "NaN" in report["rejected"][0]["reason"] and "lost power" in report["failed"][0]["reason"]
    assert "rejected client 2" in caplog.text


def test_central_dp_reports_epsilon(tmp_path: Path) -> None:
    from federation.runner import train

    results = train(_recommender(tmp_path, "federation.dp_clip=1.0", "federation.dp_noise_multiplier=1.0"))
    eps = [h["epsilon"] for h in results["history"]]
    assert 0 < eps[0] < eps[1] == results["epsilon"]
    json.dumps(results)


@pytest.mark.slow
def test_secagg_equals_fedavg_within_quantisation_error(tmp_path: Path) -> None:
    """One SecAgg+ round against plain FedAvg of the same client deltas (same seeds, same data)."""
    from federation.runner import train
    from federation.task import initial_state, local_train
    from pipeline.data import partition_users

    rec = _recommender(tmp_path, "federation.rounds=1", "federation.secagg=true")
    secure = train(rec)
    assert secure["history"][0]["secure_aggregation"] == "SecAgg+"
    from federation.checkpoint import load
    from federation.task import Recipe
    from pipeline.trained import run_dir

    secure_state = load(run_dir(rec) / "checkpoint.npz").state
    recipe = Recipe.of(rec.cfg)
    cfg = recipe.federation
    start = initial_state(rec.item_vectors, recipe)
    clients = partition_users(rec.dataset, rec.split.train(), rec.cfg.partition)
    from federation.core import add
    from federation.task import ClientData

    results = [local_train(start, ClientData(rec.item_vectors, [rec.split.train()[u] for u in c]), recipe, seed=1 * 100_003 + i)
               for i, c in enumerate(clients)]
    weights = np.array([r[1] for r in results], np.float64) / sum(r[1] for r in results)
    plain = add(start, {k: sum(w * r[0][k].astype(np.float64) for w, r in zip(weights, results, strict=True)).astype(np.float32) for k in start})
    max_weight = max(r[1] for r in results)
    bound = 2 * cfg.secagg_clipping_range / cfg.secagg_quantization_range * max_weight / min(r[1] for r in results) * 2
    worst = max(float(np.abs(secure_state[k] - plain[k]).max()) for k in plain)
    biggest = max(float(np.abs(r[0][k]).max()) for r in results for k in plain)
    assert worst <= bound and worst < 0.01 * biggest


def test_secagg_refuses_what_it_cannot_do() -> None:
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=r"secagg=true hides single updates"):
        load_config(TINY, ["federation.secagg=true", "federation.dp_clip=1.0"])


@pytest.mark.slow
def test_simulation_engine_matches_the_in_process_grid(tmp_path: Path) -> None:
    """The same rounds on Flower's Simulation Engine (Ray) give the same model as the in-process grid, also when clients
    are sampled (the Simulation Engine's node ids are random, so sampling goes by the partition each node holds)."""
    from federation.runner import train

    sampled = ["federation.rounds=2", "federation.clients_per_round=2", "federation.patience=null"]
    inproc = train(_recommender(tmp_path / "a", *sampled))
    simulated = train(_recommender(tmp_path / "b", *sampled, "federation.engine=simulation"))
    assert simulated["engine"] == "simulation"
    assert [h["accepted"] for h in simulated["history"]] == [h["accepted"] for h in inproc["history"]] == [2, 2]
    assert [h["valid"] for h in simulated["history"]] == [h["valid"] for h in inproc["history"]]
    for key in ("R@10", "N@10"):
        assert simulated["test"][key] == pytest.approx(inproc["test"][key], abs=1e-9)


def test_fedrec_train_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import sys

    from pipeline.cli import main

    args = ["fedrec", "train", "-c", str(TINY), "--set", "federation.rounds=1", "--set", "tower.dim=16",
            "--set", "tower.max_len=10", "--set", "tower.layers=1", "--set", "eval.max_users=20",
            "--set", f"output_dir={tmp_path}", "--engine", "inprocess"]
    monkeypatch.setattr(sys, "argv", args)
    monkeypatch.setenv("COLUMNS", "160")
    with pytest.raises(SystemExit) as done:
        main()
    out = capsys.readouterr().out
    assert done.value.code in (0, None), out
    assert "federated training: 4 clients, 1 rounds (inprocess)" in out and "test (best round 1" in out
    monkeypatch.setattr(sys, "argv", [*args, "--engine", "deployment"])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 2 and "flwr run federation/deploy" in capsys.readouterr().out


def test_soft_prompt_and_projector_travel_with_the_tower(tmp_path: Path, tiny_llama: Path) -> None:
    """With federation.soft_prompt, clients also train the soft prompt and item-token projector through the frozen LLM."""
    from federation.checkpoint import load
    from federation.runner import run_dir, train

    serving = [f"llm.model={tiny_llama}", "llm.dtype=float32", "retrieval.num_candidates=6", "eval.max_users=12",
               "rerank.max_history_titles=3", "profile.max_tokens=48"]
    rec = _recommender(tmp_path, "federation.rounds=1", "soft_prompt.enabled=true", "soft_prompt.tokens=4",
                       "soft_prompt.template=rerank.v4", "soft_prompt.max_history_titles=2", *serving)
    results = train(rec)
    state = load(run_dir(rec) / "checkpoint.npz").state
    soft = {k for k in state if k.startswith("soft/")}
    assert soft == {"soft/prompt", "soft/projector.weight", "soft/projector.bias", "soft/user_projector.weight", "soft/user_projector.bias"}
    assert state["soft/prompt"].shape == (4, rec.backend.hidden_size)
    assert results["history"][0]["accepted"] == 4
    assert results["history"][0]["bytes_up"] == 4 * results["state_bytes"]
    assert 0.0 < results["history"][0]["soft_prompt_loss"] < 10.0, "the clients' mean soft-prompt loss reaches the round report"
    assert set(results["test_rerank"]) >= {"R@5", "N@10", "MRR"}
    assert sum(c["users"] for c in results["test_rerank"]["by_client"]) == 12
    # a config with another default prompt serves the run in the prompt its soft prompt was trained with
    later = _recommender(tmp_path, "federation.rounds=1", "soft_prompt.enabled=true", "soft_prompt.tokens=4", *serving, run=run_dir(rec))
    assert later.cfg.soft_prompt.template == "rerank.v6"
    builder = later.trained.reranker(later).builder
    assert (builder.cfg.template, builder.cfg.max_history_titles) == ("rerank.v4", 2)


@pytest.mark.slow
def test_the_reranked_test_check_after_training_is_budgeted(tmp_path: Path, tiny_llama: Path) -> None:
    """eval.rerank_max_users bounds the LLM pass that ends a soft-prompt run (the first N evaluated users); 0 skips it."""
    from federation.runner import train

    common = ["federation.rounds=1", "soft_prompt.enabled=true", "soft_prompt.tokens=2", f"llm.model={tiny_llama}", "llm.dtype=float32",
              "retrieval.num_candidates=6", "eval.max_users=12", "rerank.max_history_titles=3", "profile.max_tokens=48"]
    few = train(_recommender(tmp_path / "few", *common, "eval.rerank_max_users=5"))
    assert sum(c["users"] for c in few["test_rerank"]["by_client"]) == 5
    assert few["eval_users"] == 12, "the tower's own evaluation keeps every evaluated user"
    assert "test_rerank" not in train(_recommender(tmp_path / "none", *common, "eval.rerank_max_users=0"))


@pytest.mark.slow
def test_personal_tokens_stay_on_the_client(tmp_path: Path, tiny_llama: Path) -> None:
    """Personal tokens are trained next to the shared soft prompt, saved in each client's own folder, never uploaded,
    and used when that client's users are reranked; a repeated round starts from the same personal state."""
    from federation.checkpoint import load
    from federation.runner import personal_tokens, private_store, run_dir, train

    rec = _recommender(tmp_path, "soft_prompt.enabled=true", "soft_prompt.tokens=2", "soft_prompt.personal_tokens=3", "federation.rounds=3",
                       f"llm.model={tiny_llama}", "llm.dtype=float32", "retrieval.num_candidates=6", "eval.max_users=12",
                       "rerank.max_history_titles=3", "profile.max_tokens=48")
    results = train(rec)
    state = load(run_dir(rec) / "checkpoint.npz").state
    assert not any("personal" in k for k in state)
    assert all(h["bytes_up"] == 4 * results["state_bytes"] for h in results["history"])
    saved = [private_store(rec, p).latest()["personal/tokens"] for p in range(4)]
    assert all(t.shape == (3, rec.backend.hidden_size) for t in saved)
    assert not np.allclose(saved[0], saved[1])
    assert sorted(p.name for p in private_store(rec, 0).folder.iterdir()) == [f"personal-r0000{r}.npz" for r in (1, 2, 3)], "every round is kept"
    np.testing.assert_array_equal(private_store(rec, 0).load_before(2)["personal/tokens"],
                                  np.load(private_store(rec, 0).folder / "personal-r00001.npz")["personal/tokens"])
    # the kept round's tokens go with the kept shared state, not the newest ones
    for round_ in (1, 2):
        np.testing.assert_array_equal(personal_tokens(rec, round_)(0)["personal/tokens"],
                                      np.load(private_store(rec, 0).folder / f"personal-r{round_:05d}.npz")["personal/tokens"])
    by_client = results["test_rerank"]["by_client"]
    assert len(by_client) >= 2 and {c["client"] for c in by_client} <= {0, 1, 2, 3} and sum(c["users"] for c in by_client) == 12
    assert all(0.0 <= c["N@10"] <= 1.0 for c in by_client)


def test_personal_tokens_need_the_soft_prompt(tmp_path: Path) -> None:
    with pytest.raises(Exception, match=r"personal_tokens > 0 needs soft_prompt.enabled=true"):
        load_config(TINY, ["soft_prompt.personal_tokens=2"])


def test_replies_from_unsampled_nodes_and_repeats_are_never_averaged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A node that was not asked this round, and a second reply from one that was, are logged as failures; the state
    equals that of the same round without them."""
    from federation.checkpoint import load
    from federation.inprocess import InProcessGrid, _wire
    from federation.runner import train
    from pipeline.trained import run_dir

    honest = train(_recommender(tmp_path / "honest", "federation.rounds=1", "federation.clients_per_round=2"))
    real = InProcessGrid.send_and_receive

    def forged(self, messages, *, timeout=None):  # noqa: ANN001, ANN202
        from flwr.app import Message

        messages = list(messages)
        replies = list(real(self, messages, timeout=timeout))
        if messages[0].metadata.message_type != "train":  # the server asking which partition each node holds
            return replies
        asked = {m.metadata.dst_node_id for m in messages}
        outsider = next(n for n in self.node_ids if n not in asked)  # trains and answers without being asked
        uninvited = Message(messages[0].content, dst_node_id=outsider, message_type="train", group_id=messages[0].metadata.group_id)
        return [*replies, *real(self, [uninvited]), _wire(replies[0])]

    monkeypatch.setattr(InProcessGrid, "send_and_receive", forged)
    rec = _recommender(tmp_path / "forged", "federation.rounds=1", "federation.clients_per_round=2")
    attacked = train(rec)
    (report,) = attacked["history"]
    assert report["accepted"] == 2 and sorted(f["reason"] for f in report["failed"]) == ["a second reply", "not sampled this round"]
    ours = load(run_dir(rec) / "checkpoint.npz").state
    theirs = load(run_dir(_recommender(tmp_path / "honest", "federation.rounds=1", "federation.clients_per_round=2")) / "checkpoint.npz").state
    assert all(np.array_equal(ours[k], theirs[k]) for k in ours)
    assert honest["history"][0]["valid"] == report["valid"]


def test_a_client_overstating_its_examples_is_weighted_down(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Client 0 reports 10× its windows. With federation.max_weight_ratio its weight is bounded and logged, and the state
    moves less far from the honest round than it does when the claim is believed."""
    import federation.flower_apps as apps
    from federation.checkpoint import load
    from federation.runner import train
    from pipeline.trained import run_dir

    def state(folder: Path, *extra: str) -> tuple[dict, dict]:
        rec = _recommender(folder, "federation.rounds=1", *extra)
        results = train(rec)
        return load(run_dir(rec) / "checkpoint.npz").state, results["history"][0]

    honest, _ = state(tmp_path / "honest")
    real = apps.local_train

    def boastful(state_, data, cfg, *, seed, round_):  # noqa: ANN001, ANN202
        delta, n, metrics = real(state_, data, cfg, seed=seed, round_=round_)
        return delta, n * 10 if seed % 100_003 == 0 else n, metrics

    monkeypatch.setattr(apps, "local_train", boastful)
    believed, _ = state(tmp_path / "believed")
    bounded, report = state(tmp_path / "bounded", "federation.max_weight_ratio=1.5")
    assert [c["client"] for c in report["capped"]] == [0] and report["capped"][0]["reported"] > report["capped"][0]["weight"]

    def distance(a: dict) -> float:
        return float(np.sqrt(sum(np.sum((a[k].astype(np.float64) - honest[k]) ** 2) for k in honest)))

    assert distance(bounded) < distance(believed)


# One wrapper in the fast suite; the other three (about 50 s each) run with the slow tests.
@pytest.mark.parametrize("extra", [
    pytest.param([], id="server-fixed"),
    pytest.param(["federation.dp_adaptive=true", "federation.dp_target_quantile=0.5"], id="server-adaptive", marks=pytest.mark.slow),
    pytest.param(["federation.dp_clip_on=client"], id="client-fixed", marks=pytest.mark.slow),
    pytest.param(["federation.dp_clip_on=client", "federation.dp_adaptive=true"], id="client-adaptive", marks=pytest.mark.slow),
])
def test_central_dp_runs_resume_exactly(tmp_path: Path, extra: list[str]) -> None:
    """Flower's DP wrappers (server- or client-side clipping, the latter through Flower's clipping mods) with seeded noise:
    3 rounds straight equal 1 round + resume; adaptive clipping moves its norm and the norm is restored on resume."""
    from federation.runner import train

    dp = ["federation.dp_clip=0.5", "federation.dp_noise_multiplier=0.3", *extra]
    whole = train(_recommender(tmp_path / "a", "federation.rounds=3", *dp))
    train(_recommender(tmp_path / "b", "federation.rounds=1", *dp))
    resumed = train(_recommender(tmp_path / "b", "federation.rounds=3", *dp), resume=True)
    assert [h["valid"] for h in resumed["history"]] == [h["valid"] for h in whole["history"]]
    assert resumed["test"] == whole["test"] and resumed["epsilon"] == whole["epsilon"]
    norms_seen = [h["update_norm_median"] for h in whole["history"]]
    if extra == ["federation.dp_clip_on=client"]:
        assert max(norms_seen) <= 0.5 + 1e-4  # clipped before it left the client
    elif not extra:
        assert min(norms_seen) > 0.5  # the server sees raw updates and clips them itself
    if "federation.dp_adaptive=true" in extra:
        norms = [h["dp_clipping_norm"] for h in whole["history"]]
        assert norms == [h["dp_clipping_norm"] for h in resumed["history"]] and len(set(norms)) == 3


def test_adaptive_clipping_with_too_few_clients_says_why(tmp_path: Path) -> None:
    from federation.runner import train
    from pipeline.errors import FedrecError

    rec = _recommender(tmp_path, "federation.rounds=1", "federation.dp_clip=0.5", "federation.dp_noise_multiplier=2.0", "federation.dp_adaptive=true")
    with pytest.raises(FedrecError, match=r"dp_adaptive with 4 clients per round and dp_noise_multiplier=2.0: .*sample more clients"):
        train(rec)
