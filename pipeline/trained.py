"""A trained run: the folder `fedrec train` writes, and the one door (`load_trained`) every entry point reads it through.

Layout of `<output_dir>/train-<dataset>-<hash>/`:

| file | holds |
|---|---|
| `checkpoint.npz` | the last round's server state, for `--resume` |
| `best.npz` | the global state of the best validation round |
| `item_embeddings.npy` | `(n_items, tower.dim)` tower item embeddings of that state |
| `index/client-NNNNN.faiss` | each client's local FAISS index over those embeddings |
| `results.json`, `MODEL_CARD.md` | metrics per round and on test; a short human summary |
| `run.json` | fingerprint, best round and file digests; written last, so a run without it is incomplete |
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from federation.core import non_finite
from pipeline.errors import FedrecError
from pipeline.io import atomic_path, file_digest, write_json, write_text

if TYPE_CHECKING:
    from pipeline.config import SoftPromptConfig
    from pipeline.recommender import Recommender
    from pipeline.rerank import VerbalizerReranker
    from retrieval import ItemIndex
    from retrieval.tower import RetrievalTower

log = logging.getLogger(__name__)
RUN_FILE = "run.json"
TOWER_SHAPE = {"dim", "max_len", "layers", "heads", "item_init"}
"""The tower fields a serving config must share with a run (the training recipe may differ)."""
PROMPT_SETTINGS = ("template", "max_title_tokens", "max_history_titles")
"""The soft_prompt fields that shape the trained reranker's prompt, served as the run was trained."""
FORMAT = 1


class RunError(FedrecError):
    """A run folder is missing, incomplete, corrupt, or made for another configuration."""


def _hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def serving_identity(rec: Recommender) -> dict[str, Any]:
    """What a run must share with the config that serves it: dataset and catalogue, item texts, tower shape, and the
    LLM when the run has a soft prompt (`soft_prompt` records whether it has one)."""
    cfg = rec.cfg
    return {
        "dataset": rec.dataset.name,
        "n_items": int(rec.dataset.n_items),
        "catalog": _hash([str(i) for i in rec.dataset.catalog.item_ids.tolist()])[:16],
        "item_texts": rec.embedder.cache_key(rec.item_texts),
        "tower": cfg.tower.model_dump(mode="json", include=TOWER_SHAPE),
        "soft_prompt": cfg.soft_prompt.enabled,
        "llm": cfg.llm.model,
    }


def fingerprint(rec: Recommender) -> dict[str, Any]:
    """Every config section that determines a run's result (stopping rules and the engine excluded, so a resumed run
    with more rounds, or on another engine, continues the same folder)."""
    cfg = rec.cfg
    sections = {
        "serving": serving_identity(rec),
        "data": cfg.data.model_dump(mode="json"),
        "partition": cfg.partition.model_dump(mode="json"),
        "tower": cfg.tower.model_dump(mode="json"),
        "federation": cfg.federation.model_dump(mode="json", exclude={"rounds", "engine", "patience"}),
        "eval_users": cfg.eval.max_users,
    }
    if cfg.soft_prompt.enabled:
        sections.update(soft_prompt=cfg.soft_prompt.model_dump(mode="json"), profile=cfg.profile.model_dump(mode="json"),
                        rerank=cfg.rerank.model_dump(mode="json"), num_candidates=cfg.retrieval.num_candidates)
    return {"sections": sections, "hash": _hash(sections)[:12]}


def run_dir(rec: Recommender) -> Path:
    """The folder of this configuration's run."""
    return rec.cfg.output_dir / f"train-{rec.dataset.name}-{fingerprint(rec)['hash']}"


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as saved:
            return {k: saved[k] for k in saved.files}
    except FileNotFoundError:
        raise RunError(f"{path} is missing; retrain with `fedrec train`") from None
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:  # truncated or bit-flipped
        raise RunError(f"{path} is corrupt ({type(exc).__name__}: {exc}); retrain with `fedrec train`") from None


def _index_meta(embeddings: np.ndarray, factory: str) -> dict[str, Any]:
    return {"embeddings": hashlib.sha256(np.ascontiguousarray(embeddings, dtype=np.float32).tobytes()).hexdigest()[:24],
            "factory": factory, "n_items": int(len(embeddings))}


@dataclass
class TrainedRun:
    """A complete run folder, checked against the config that loads it."""

    folder: Path
    manifest: dict[str, Any]
    state: dict[str, np.ndarray]
    item_embeddings: np.ndarray
    """`(n_items, tower.dim)` float32: what every client's FAISS index holds."""
    text_vectors: np.ndarray
    index_factory: str = "Flat"
    _indices: dict[int, ItemIndex] = field(default_factory=dict, repr=False, compare=False)

    @property
    def best_round(self) -> int:
        return int(self.manifest["best_round"])

    @property
    def has_soft_prompt(self) -> bool:
        return any(k.startswith("soft/") for k in self.state)

    @cached_property
    def results(self) -> dict[str, Any]:
        path = self.folder / "results.json"
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RunError(f"{path} is unreadable ({exc}); retrain with `fedrec train`") from None
        missing = [k for k in ("history", "test", "rounds", "best_round") if k not in results] if isinstance(results, dict) else ["all keys"]
        if missing or not isinstance(results["history"], list) or not isinstance(results["test"], dict):
            raise RunError(f"{path} lacks {', '.join(missing) or 'a valid history or test section'}; retrain with `fedrec train`")
        return results

    @cached_property
    def tower(self) -> RetrievalTower:
        from retrieval.config import TowerConfig
        from retrieval.tower import RetrievalTower

        cfg = TowerConfig.model_validate(self.manifest["fingerprint"]["sections"]["serving"]["tower"])
        try:
            return RetrievalTower.from_arrays(self.text_vectors, cfg, self.state)
        except ValueError as exc:
            raise RunError(f"{self.folder / 'best.npz'}: {exc}") from None

    def index_path(self, client: int) -> Path:
        return self.folder / "index" / f"client-{client:05d}.faiss"

    @cached_property
    def index_meta(self) -> dict[str, Any]:
        """What a client index must have been built from (checked on load)."""
        return _index_meta(self.item_embeddings, self.index_factory)

    def index(self, client: int = 0) -> ItemIndex:
        """Client `client`'s local FAISS index (loaded once); built from the run's item embeddings when absent or stale (and saved)."""
        if client not in self._indices:
            self._indices[client] = self._load_or_build_index(client)
        return self._indices[client]

    def _load_or_build_index(self, client: int) -> ItemIndex:
        from retrieval import ItemIndex

        path, meta = self.index_path(client), self.index_meta
        if path.is_file():
            try:
                return ItemIndex.load(path, expected_dim=self.item_embeddings.shape[1], expected_meta=meta)
            except (ValueError, OSError) as exc:
                log.warning("rebuilding %s: it does not match the run's item embeddings (%s)", path, exc)
        index = ItemIndex.build(self.item_embeddings, self.index_factory, meta=meta)
        index.save(path)
        return index

    def describe(self) -> str:
        return f"trained tower from {self.folder} (round {self.best_round})"

    def prompt_settings(self, current: SoftPromptConfig) -> SoftPromptConfig:
        """`current` with the prompt the run's soft prompt was trained with (template, title and history budgets): a soft
        prompt is tuned to its prompt, so a run keeps serving it when the config's default prompt changes."""
        trained = self.manifest["fingerprint"]["sections"].get("soft_prompt") or {}
        return current.model_copy(update={k: trained[k] for k in PROMPT_SETTINGS if k in trained})

    def reranker(self, rec: Recommender, *, fusion_weight: float = 1.0, personal: dict[str, np.ndarray] | None = None) -> VerbalizerReranker:
        """A verbalizer reranker with the run's soft prompt, item tokens and (when trained with one) user token, in the
        prompt it was trained with (`prompt_settings`; the projectors read the tower's vectors). `personal`: one client's
        personal tokens."""
        return trained_reranker(rec, self.state, self.item_embeddings, self.tower, fusion_weight=fusion_weight, personal=personal,
                                soft=self.prompt_settings(rec.cfg.soft_prompt))


def trained_reranker(rec: Recommender, state: dict[str, np.ndarray], item_embeddings: np.ndarray, tower: RetrievalTower, *,
                     fusion_weight: float = 1.0, personal: dict[str, np.ndarray] | None = None,
                     soft: SoftPromptConfig | None = None) -> VerbalizerReranker:
    """A verbalizer reranker over a state's soft prompt and projectors, for any candidates; `tower` gives the user token's
    query vector for each request's history. `soft`: the prompt settings (default `rec.cfg.soft_prompt`)."""
    import torch

    from pipeline.llm.openai_backend import OpenAIBackend
    from pipeline.llm.softprompt import SoftPrompt
    from pipeline.llm.transformers_backend import TransformersBackend
    from pipeline.rerank import RerankRequest, VerbalizerReranker, trained_prompt_builder

    backend = rec.backend
    if not isinstance(backend, TransformersBackend | OpenAIBackend):
        raise FedrecError("a trained soft prompt runs in-process (inputs_embeds) or on an OpenAI-compatible server (prompt_embeds); "
                          "set llm.backend=transformers or openai")
    sp = soft or rec.cfg.soft_prompt
    user_token = SoftPrompt.has_user_token(state)
    module = SoftPrompt(state["soft/prompt"].shape[0], backend.hidden_size, item_embeddings.shape[1],
                        personal=sp.personal_tokens if personal else 0, user_token=user_token)
    module.load_arrays(state)
    if personal:
        module.load_personal(personal)
    with torch.no_grad():
        prompt, tokens = module.full_prompt(), module.item_tokens(torch.as_tensor(item_embeddings))

    def slot_tokens(requests: list[RerankRequest]) -> list[torch.Tensor]:
        rows = [tokens[[c.item for c in r.candidates]] for r in requests]
        if not user_token:
            return rows
        with torch.no_grad():
            users = module.user_projector(torch.as_tensor(tower.encode([list(r.history) for r in requests])))  # type: ignore[misc]
        return [torch.cat([u[None], row]) for u, row in zip(users, rows, strict=True)]

    builder = trained_prompt_builder(backend, rec.dataset.catalog, rec.cfg.rerank, sp, user_token=user_token)
    return VerbalizerReranker(backend, builder, fusion_weight=fusion_weight, soft_prompt=prompt, item_tokens=slot_tokens)


def write_state(folder: Path, state: dict[str, np.ndarray], round_: int) -> None:
    """Save the best state so far (atomically)."""
    with atomic_path(folder / "best.npz") as tmp, tmp.open("wb") as handle:
        np.savez(handle, **state, **{"meta/round": np.array([round_])})


def export_run(rec: Recommender, folder: Path, *, clients: int, index_clients: bool) -> TrainedRun:
    """From `best.npz`, write the item embeddings and (with `index_clients`) every client's local FAISS index.

    The returned run is usable at once (evaluation runs on it before `finish_run` marks it complete).
    """
    from retrieval.tower import RetrievalTower

    saved = _load_npz(folder / "best.npz")
    round_ = int(saved.pop("meta/round")[0])
    tower = RetrievalTower.from_arrays(rec.item_vectors, rec.cfg.tower, saved)
    embeddings = tower.item_matrix()
    with atomic_path(folder / "item_embeddings.npy") as tmp, tmp.open("wb") as handle:
        np.save(handle, embeddings)
    manifest = {"format": FORMAT, "fingerprint": fingerprint(rec), "best_round": round_, "complete": False}
    run = TrainedRun(folder, manifest, saved, embeddings, rec.item_vectors, rec.cfg.index.factory)
    if index_clients:
        for client in range(clients):
            run.index(client)
    return run


def finish_run(rec: Recommender, run: TrainedRun, results: dict[str, Any]) -> None:
    """Write results.json and the model card, then `run.json` with the file digests (last: it marks the run complete)."""
    write_json(run.folder / "results.json", results)
    write_text(run.folder / "MODEL_CARD.md", model_card(results, run))
    files = {name: file_digest(run.folder / name) for name in ("best.npz", "item_embeddings.npy", "results.json")}
    run.manifest = {**run.manifest, "complete": True, "files": files}
    write_json(run.folder / RUN_FILE, run.manifest)


def _mismatch(expected: dict[str, Any], found: dict[str, Any]) -> list[str]:
    reasons = []
    for key in ("dataset", "n_items", "catalog", "item_texts", "tower", "llm"):
        if key == "llm" and not found.get("soft_prompt"):
            continue  # without a soft prompt the run serves any LLM (zero-shot prompt)
        if expected.get(key) != found.get(key):
            reasons.append(f"{key}: run has {found.get(key)!r}, this config has {expected.get(key)!r}")
    return reasons


def load_trained(folder: str | Path, rec: Recommender) -> TrainedRun:
    """The run in `folder`, after checking it is complete, intact and made for `rec`'s dataset, tower and LLM.

    Raises:
        RunError: naming the file and the mismatch.
    """
    folder = Path(folder)
    manifest_path = folder / RUN_FILE
    if not folder.is_dir():
        state = "is not a folder" if folder.exists() else "does not exist"
        raise RunError(f"run folder {folder} {state}; pass a folder written by `fedrec train` (under output_dir)")
    if not manifest_path.is_file():
        raise RunError(f"{manifest_path} is missing: {folder} is not a finished `fedrec train` run (interrupted? rerun it with --resume)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        expected_files = dict(manifest["files"])
        found = manifest["fingerprint"]["sections"]["serving"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RunError(f"{manifest_path} is corrupt ({type(exc).__name__}: {exc}); retrain with `fedrec train`") from None
    for name, digest in expected_files.items():
        path = folder / name
        if not path.is_file():
            raise RunError(f"{path} is missing from the run; retrain with `fedrec train`")
        if file_digest(path) != digest:
            raise RunError(f"{path} does not match the digest in {manifest_path} (truncated or changed); retrain with `fedrec train`")
    reasons = _mismatch(serving_identity(rec), found)
    if reasons:
        raise RunError(f"run {folder} was made for another configuration: " + "; ".join(reasons))
    state = _load_npz(folder / "best.npz")
    state.pop("meta/round", None)
    embeddings = np.load(folder / "item_embeddings.npy")
    if embeddings.shape != (rec.dataset.n_items, rec.cfg.tower.dim):
        raise RunError(f"{folder / 'item_embeddings.npy'} has shape {embeddings.shape}, expected ({rec.dataset.n_items}, {rec.cfg.tower.dim})")
    for name, arrays in (("best.npz", state), ("item_embeddings.npy", {"embeddings": embeddings})):
        broken = non_finite(arrays)
        if broken:
            raise RunError(f"{folder / name} holds NaN or infinite values ({', '.join(broken[:3])}); retrain with `fedrec train`")
    return TrainedRun(folder, manifest, state, embeddings, rec.item_vectors, rec.cfg.index.factory)


def find_run(rec: Recommender) -> Path | None:
    """The newest complete run under output_dir made for this dataset, catalogue, tower and LLM (None when there is none)."""
    root = rec.cfg.output_dir
    if not root.is_dir():
        return None
    wanted = serving_identity(rec)
    found = []
    for manifest in root.glob(f"train-{rec.dataset.name}-*/{RUN_FILE}"):
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
            if data.get("complete") and not _mismatch(wanted, data["fingerprint"]["sections"]["serving"]):
                found.append((manifest.stat().st_mtime, manifest.parent))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return max(found)[1] if found else None


def model_card(results: dict[str, Any], run: TrainedRun) -> str:
    """A short markdown summary of a run."""
    fed, part, tower = results["federation"], results["partition"], results["tower"]
    test = results["test"]
    lines = [
        f"# fedrec run {run.folder.name}",
        "",
        f"- **Data:** {results['dataset']}, {results['users']:,} users, {results['items']:,} items; leave-one-out by (timestamp, item id), "
        "full ranking over all items with the user's history excluded.",
        f"- **Clients:** {results['clients']} ({part['scheme']} scheme" + (f", {part['split']} split" if part["scheme"] == "group" else "") + f"), "
        f"engine {results['engine']}, {fed['clients_per_round'] or 'all'} clients per round.",
        f"- **Tower:** {tower['layers']} causal self-attention blocks, dim {tower['dim']}, max_len {tower['max_len']}, item side `{tower['item_init']}`, "
        f"AdamW lr {tower['lr']} wd {tower['weight_decay']}, dropout {tower['dropout']}.",
        f"- **Rounds:** {results['rounds']} run, best validation round {results['best_round']} (patience {fed['patience']}); "
        f"{results['seconds']:.0f} s wall time.",
        f"- **Bytes:** {results['bytes_up_per_client_round']:,} up and {results['bytes_down_per_client_round']:,} down per client per round.",
        f"- **Privacy:** ε = {results['epsilon']:.3g} at δ = {fed['dp_delta']}" if "epsilon" in results else "- **Privacy:** no differential privacy (ε = ∞).",
        "",
        "| test (FAISS path) | " + " | ".join(test) + " |",
        "|---|" + "---|" * len(test),
        "| tower | " + " | ".join(f"{v:.4f}" for v in test.values()) + " |",
    ]
    if "test_rerank" in results:
        rr = {k: v for k, v in results["test_rerank"].items() if k != "by_client"}
        lines.append("| tower + LLM rerank | " + " | ".join(f"{rr.get(k, float('nan')):.4f}" for k in test) + " |")
    return "\n".join(lines) + "\n"
