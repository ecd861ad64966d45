"""The federated task as plain functions (no Flower): local training and one server round.

`local_train` runs on a client over its own histories and returns only the delta of the shared
arrays. `review_round` validates a round's updates before the Flower strategy aggregates them.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from federation.core import (
    PrivacyAccountant,
    State,
    l2_norm,
    subtract,
    validate_update,
)
from pipeline.config import FederationConfig, FedrecConfig, SoftPromptConfig
from retrieval.config import TowerConfig
from retrieval.tower import RetrievalTower, TowerTrainer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    """The config sections a client needs to train locally (sent with every round's message)."""

    tower: TowerConfig
    soft_prompt: SoftPromptConfig
    federation: FederationConfig

    @classmethod
    def of(cls, cfg: FedrecConfig) -> Recipe:
        return cls(cfg.tower, cfg.soft_prompt, cfg.federation)

    def to_json(self) -> str:
        return json.dumps({"tower": self.tower.model_dump(mode="json"), "soft_prompt": self.soft_prompt.model_dump(mode="json"),
                           "federation": self.federation.model_dump(mode="json")})

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        raw = json.loads(text)
        return cls(TowerConfig.model_validate(raw["tower"]), SoftPromptConfig.model_validate(raw["soft_prompt"]),
                   FederationConfig.model_validate(raw["federation"]))


def initial_state(text_vectors: np.ndarray, recipe: Recipe, *, llm_hidden: int | None = None) -> State:
    """The untrained global state: the tower (starting from the text geometry) and, with
    `soft_prompt.enabled`, the soft prompt and item-token projector for an LLM of width `llm_hidden`."""
    seed = recipe.federation.seed
    state = RetrievalTower.create(text_vectors, recipe.tower, seed=seed).state_arrays()
    if recipe.soft_prompt.enabled:
        if llm_hidden is None:
            raise ValueError("soft_prompt.enabled needs the LLM's hidden size")
        from pipeline.llm.softprompt import SoftPrompt

        state.update(SoftPrompt(recipe.soft_prompt.tokens, llm_hidden, recipe.tower.dim, seed=seed,
                                user_token=recipe.soft_prompt.user_token).state_arrays())
    return state


@dataclass
class LLMTask:
    """What a client needs to train the soft prompt: the frozen LLM, a prompt builder with item (and user) slots,
    and `profile(i, p)`: the text profile of the client's user i from the first p items of its history."""

    backend: Any
    builder: Any
    profile: Callable[[int, int], str]
    n_candidates: int = 20


@dataclass(frozen=True)
class PrivateStore:
    """Arrays that never leave the client (personal tokens), one file per round in a client-side folder.

    A round reads the newest file written before it, so a round repeated after a crash (resume)
    starts from exactly the state the first attempt saw.
    """

    folder: Path
    stem: str = "personal"
    """What the arrays are (file names `<stem>-r<round>.npz`): personal tokens, or the upload error carried over (`feedback`)."""
    keep_all: bool = False
    """Keep every round's file (personal tokens, a few KB each: the kept round's tokens go with the kept shared state);
    otherwise only the newest earlier one survives a save (the carried upload error is as large as an update)."""

    def _files(self) -> dict[int, Path]:
        found = (re.fullmatch(rf"{self.stem}-r(\d+)\.npz", p.name) for p in self.folder.glob(f"{self.stem}-r*.npz"))
        return {int(m.group(1)): self.folder / m.group(0) for m in found if m}

    def load_before(self, round_: int) -> State:
        earlier = [r for r in self._files() if r < round_]
        if not earlier:
            return {}
        with np.load(self._files()[max(earlier)]) as saved:
            return {k: saved[k] for k in saved.files}

    def latest(self) -> State:
        """The newest saved arrays (empty before the first round)."""
        files = self._files()
        return self.load_before(max(files) + 1) if files else {}

    def save(self, round_: int, arrays: State) -> None:
        from pipeline.io import atomic_path

        with atomic_path(self.folder / f"{self.stem}-r{round_:05d}.npz") as tmp, open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
        if self.keep_all:
            return
        files = self._files()
        earlier = [r for r in files if r < round_]
        for old in [r for r in earlier if r < max(earlier)]:  # keep the newest earlier file: a repeated round reads it
            files[old].unlink(missing_ok=True)


@dataclass
class ClientData:
    """One client's private data."""

    text_vectors: np.ndarray
    histories: list[np.ndarray]
    """Training histories of the client's users."""
    llm: LLMTask | None = None
    private: PrivateStore | None = None
    """Where this client keeps its personal tokens (needed with soft_prompt.personal_tokens > 0)."""
    feedback: PrivateStore | None = None
    """Where this client keeps the error its compressed uploads dropped (with federation.error_feedback)."""

    def touched_items(self) -> np.ndarray:
        """The item ids in this client's histories (the item-table rows its data touches)."""
        return np.unique(np.concatenate(self.histories)) if self.histories else np.zeros(0, np.int64)


def local_train(global_state: State, data: ClientData, recipe: Recipe, *, seed: int, round_: int = 1,
                ) -> tuple[State, int, dict[str, float]]:
    """Train the tower (and, with `soft_prompt.enabled`, the soft prompt) on one client's data.

    With `soft_prompt.personal_tokens`, personal tokens are trained too and saved in `data.private`
    for `round_`; they are not part of the returned delta.

    Returns:
        (delta of the shared arrays, number of training windows, metrics).
    """
    fed = recipe.federation
    tower = RetrievalTower.from_arrays(data.text_vectors, recipe.tower, global_state)
    trainer = TowerTrainer(tower, data.histories, prox_mu=fed.prox_mu, seed=seed)
    metrics = trainer.run(epochs=fed.local_epochs, steps=fed.local_steps)
    local = tower.state_arrays()
    if recipe.soft_prompt.enabled:
        if data.llm is None:
            raise ValueError("soft_prompt.enabled is on but this client has no LLM task")
        local.update(_train_soft_prompt(global_state, tower, data, recipe, seed=seed, round_=round_, metrics=metrics))
    return subtract(local, global_state), int(metrics["examples"]), metrics


def upload(delta: State, data: ClientData, cfg: FederationConfig, *, round_: int) -> State:
    """What the client sends for `delta`: the delta itself, or its compressed form (`federation.compression`),
    carrying what compression dropped over to the next round when `federation.error_feedback` is on."""
    if not cfg.compresses_uploads:
        return delta
    from federation.compression import compress

    store = data.feedback if cfg.error_feedback else None
    if cfg.error_feedback and store is None:
        raise ValueError("federation.error_feedback needs a client-side folder for the carried error (ClientData.feedback)")
    sent, carried = compress(delta, cfg, touched=data.touched_items(), carried=store.load_before(round_) if store else None)
    if store is not None:
        store.save(round_, carried)
    return sent


def _train_soft_prompt(global_state: State, tower: RetrievalTower, data: ClientData, recipe: Recipe, *, seed: int,
                       round_: int, metrics: dict[str, float]) -> State:
    """One epoch over the client's users: the history before each of its last `soft_prompt.positions` items →
    candidates from the local tower → that item."""
    import torch

    from pipeline.llm.softprompt import SoftPrompt, position_examples, train_soft_prompt

    llm = data.llm
    assert llm is not None
    cfg = recipe.soft_prompt
    n = llm.n_candidates
    usable = [i for i, h in enumerate(data.histories) if len(h) >= 2]
    if cfg.users is not None and len(usable) > cfg.users:
        usable = sorted(np.random.default_rng(seed).choice(usable, cfg.users, replace=False).tolist())
    module = SoftPrompt(cfg.tokens, llm.backend.hidden_size, recipe.tower.dim, seed=recipe.federation.seed, personal=cfg.personal_tokens,
                        user_token=cfg.user_token)
    module.load_arrays(global_state)
    if cfg.personal_tokens:
        if data.private is None:
            raise ValueError("soft_prompt.personal_tokens > 0 but this client has no private folder for them")
        module.load_personal(data.private.load_before(round_))
    examples = position_examples(llm.builder, tower, [data.histories[i] for i in usable], lambda j, p: llm.profile(usable[j], p),
                                 positions=cfg.positions, n=n, seed=seed)
    stats = train_soft_prompt(module, llm.backend, examples, torch.as_tensor(tower.item_matrix()), llm.builder.labels(n), epochs=1,
                              batch_size=cfg.batch_size, lr=cfg.lr, seed=seed)
    metrics["soft_prompt_loss"] = stats["loss"]
    if cfg.personal_tokens:
        assert data.private is not None
        data.private.save(round_, module.personal_arrays())
    return module.state_arrays()


@dataclass
class ServerState:
    """Everything the server carries between rounds (checkpointed after each)."""

    round: int
    state: State
    strategy_state: State = field(default_factory=dict)
    """What the Flower strategy carries between rounds (FedOpt moments, FedAvgM momentum), as named arrays."""
    accountant: PrivacyAccountant | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class ClientResult:
    """What one client sent back in a round."""

    client: int | str
    delta: State
    examples: int
    metrics: dict[str, float]


def review_round(server: ServerState, results: list[ClientResult], cfg: FederationConfig, *, expected: int) -> tuple[dict[str, Any], list[ClientResult]]:
    """Validate one round's updates: names, shapes, finite values, the norm bound and a positive example count.

    Args:
        expected: clients asked this round.

    Returns:
        The round's report (accepted / rejected clients with reasons, mean loss; `applied` False when fewer than
        `min_clients` are valid) and the accepted results, which the strategy then aggregates.
    """
    accepted, rejected, norms = [], [], {}
    for result in results:
        norms[result.client] = l2_norm(result.delta)
        reason = validate_update(result.delta, server.state, max_norm=cfg.max_update_norm, norm=norms[result.client])
        if reason is None and result.examples <= 0:
            reason = "reported no training examples"
        if reason:
            log.warning("round %d: rejected client %s: %s", server.round, result.client, reason)
            rejected.append({"client": result.client, "reason": reason})
        else:
            accepted.append(result)
    report: dict[str, Any] = {"round": server.round, "asked": expected, "received": len(results), "accepted": len(accepted), "rejected": rejected}
    if cfg.max_weight_ratio is not None and accepted:
        bound = max(1, int(cfg.max_weight_ratio * float(np.median([r.examples for r in accepted]))))
        report["capped"] = [{"client": r.client, "reported": r.examples, "weight": bound} for r in accepted if r.examples > bound]
        for capped in report["capped"]:
            log.warning("round %d: client %s reported %d examples, more than %g× the median; weighted as %d",
                        server.round, capped["client"], capped["reported"], cfg.max_weight_ratio, bound)
        accepted = [replace(r, examples=min(r.examples, bound)) for r in accepted]
    if accepted:
        report["update_norm_median"] = float(np.median([norms[r.client] for r in accepted]))
    losses = [r.metrics.get("loss", float("nan")) for r in accepted]
    report["train_loss"] = float(np.nanmean(losses)) if losses else float("nan")
    soft = [r.metrics["soft_prompt_loss"] for r in accepted if "soft_prompt_loss" in r.metrics]
    if soft:
        report["soft_prompt_loss"] = float(np.mean(soft))
    if len(accepted) < cfg.min_clients:
        log.warning("round %d: %d valid updates, fewer than federation.min_clients=%d; global state kept", server.round, len(accepted), cfg.min_clients)
        report["applied"] = False
        return report, []
    report["applied"] = True
    return report, accepted


def account_round(server: ServerState, cfg: FederationConfig, report: dict[str, Any]) -> None:
    """After a round was released under central DP: step the accountant and report ε (RDP, PLD, the tighter)."""
    if server.accountant is None:
        return
    server.accountant.step()
    report.update(server.accountant.report(cfg.dp_delta))


def best_round(history: list[dict[str, Any]], metric: str = "R@10") -> tuple[int, float]:
    """(round, validation `metric`) of the best round so far; the earliest wins a tie; (0, -inf) before any."""
    best = (0, -float("inf"))
    for report in history:
        value = report.get("valid", {}).get(metric)
        if value is not None and value > best[1]:
            best = (int(report["round"]), float(value))
    return best


def kept_round(history: list[dict[str, Any]], cfg: FederationConfig) -> int:
    """The round whose state the run keeps (`federation.select`): the best on validation, or the last."""
    if cfg.select == "last":
        return int(history[-1]["round"]) if history else 0
    return best_round(history)[0]


def keep_going(server: ServerState, cfg: FederationConfig) -> bool:
    """Whether another round runs: rounds are left and validation improved within the last `cfg.patience` rounds."""
    if server.round >= cfg.rounds:
        return False
    if cfg.patience is None or not server.history:
        return True
    return server.round - best_round(server.history)[0] < cfg.patience


def new_server(text_vectors: np.ndarray, recipe: Recipe, n_clients: int, *, llm_hidden: int | None = None) -> ServerState:
    """Round-0 server state for `recipe`."""
    cfg = recipe.federation
    accountant = None
    if cfg.dp_clip is not None:
        sample_rate = min(1.0, (cfg.clients_per_round or n_clients) / n_clients)
        accountant = PrivacyAccountant(cfg.dp_noise_multiplier, sample_rate)
    return ServerState(0, initial_state(text_vectors, recipe, llm_hidden=llm_hidden), accountant=accountant)
