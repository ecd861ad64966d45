"""Typed experiment configuration, parsed once at the boundary.

Every model forbids unknown keys and documents every field; `load_config` reads a YAML
file, applies `a.b=value` overrides and turns pydantic's errors into messages that name the
key, the value and what is allowed.
"""

from __future__ import annotations

import os
import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.errors import ConfigError
from retrieval.config import TowerConfig

DatasetName = Literal["ml-100k", "ml-latest-small", "ml-1m", "ml-10m", "ml-25m", "ml-32m", "custom"]
StrategyName = Literal["fedavg", "fedprox", "fedadam", "fedyogi", "fedavgm", "fedtrimmedavg", "fedmedian", "krum", "bulyan"]
MEAN_STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedavgm")
"""Strategies built on the (weighted) mean, the only ones central DP's noise is calibrated for."""
DataFormat = Literal["auto", "ml-100k", "movielens-csv", "movielens-dat", "recbole", "interactions"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True, allow_inf_nan=False)


class DataConfig(_Section):
    name: DatasetName = "ml-100k"
    """Dataset to load; `custom` reads `path` in the given `format`."""
    path: Path | None = None
    """Directory (or interactions file for `interactions`) to read instead of resolving `name`."""
    format: DataFormat = "auto"
    """File layout; `auto` detects it from the files present."""
    items_path: Path | None = None
    """Item catalogue (CSV/JSONL with item_id,title[,genres,year,tags]) for the `interactions` format."""
    min_user_interactions: int = 5
    """k-core threshold for users (>= 3: leave-one-out needs train, validation and test items)."""
    min_item_interactions: int = 5
    """k-core threshold for items."""
    duplicates: Literal["error", "keep_first", "keep_all"] = "error"
    """What to do with repeated (user, item) rows."""
    missing_items: Literal["error", "drop"] = "error"
    """What to do with interactions whose item is absent from the catalogue."""
    use_tags: bool = True
    """Append user tags (where the dataset has them) to the item text."""
    max_tags: int = Field(default=5, ge=0, le=1000)
    """Most frequent tags kept per item."""
    download: bool = True
    """Download from GroupLens (checksum-verified) when no local copy is found."""

    @field_validator("min_user_interactions")
    @classmethod
    def _enough_for_leave_one_out(cls, value: int) -> int:
        if value < 3:
            raise ValueError(
                f"must be >= 3 because leave-one-out needs a training, a validation and a test "
                f"item per user, got {value}; raise data.min_user_interactions to 3 or more"
            )
        return value

    @field_validator("min_item_interactions")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be >= 1, got {value}")
        return value

    @model_validator(mode="after")
    def _custom_needs_path(self) -> DataConfig:
        if self.name == "custom" and self.path is None:
            raise ValueError("data.name=custom needs data.path; set data.path=/your/dir or pick a named dataset")
        if self.format == "interactions" and self.items_path is None:
            raise ValueError("data.format=interactions needs data.items_path (the item catalogue file)")
        return self


class PartitionConfig(_Section):
    scheme: Literal["user", "group"] = "user"
    """`user`: one user per client (cross-device); `group`: `num_clients` user groups (cross-silo)."""
    num_clients: int = Field(default=10, ge=1, le=10_000_000)
    """Number of clients for the `group` scheme."""
    split: Literal["random", "dirichlet"] = "random"
    """How users are assigned to groups: uniformly at random, or non-IID by dominant genre."""
    alpha: float = Field(default=0.5, ge=1e-3, le=1e6)
    """Dirichlet concentration for `dirichlet` (smaller is more skewed)."""
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    """Seed for the assignment."""


class ProfileConfig(_Section):
    template: str = "profile.v1"
    """Prompt template (file `prompts/templates/<template>.jinja`)."""
    max_recent_items: int = Field(default=10, ge=0, le=1000)
    """Most recent history items listed in the profile."""
    top_genres: int = Field(default=3, ge=0, le=100)
    """Dominant genres listed."""
    max_tokens: int = Field(default=256, ge=16, le=100_000)
    """Upper bound on the profile length in tokens of the embedder's tokenizer."""


class EmbedderConfig(_Section):
    model: str = "all-MiniLM-L6-v2"
    """Sentence-transformers model: the packaged all-MiniLM-L6-v2 by default, or a local path / HF id."""
    batch_size: int = Field(default=64, ge=1, le=65_536)
    """Texts per encoding batch."""
    normalize: bool = True
    """L2-normalise embeddings so inner product is cosine similarity."""
    device: str = "cpu"
    """Torch device for the embedder."""


class IndexConfig(_Section):
    factory: str = "Flat"
    """FAISS index factory string (`Flat`, `HNSW32`, `IVF256,PQ16`, ...); inner-product metric."""
    nprobe: int = Field(default=16, ge=1, le=65_536)
    """IVF lists probed per query."""
    ef_search: int = Field(default=128, ge=1, le=65_536)
    """HNSW search depth."""


class RetrievalConfig(_Section):
    query: Literal["profile", "history", "hybrid"] = "hybrid"
    """Query vector: the profile's embedding, pooled history item embeddings, or their weighted sum."""
    history_weight: float = Field(default=0.5, ge=0, le=1)
    """Weight of the pooled history in `hybrid` (the profile gets 1 - weight)."""
    recency_decay: float = Field(default=0.9, gt=0, le=1)
    """Pooling weight ratio between consecutive history items (1 = plain mean)."""
    max_history: int = Field(default=50, ge=1, le=10_000)
    """Most recent items pooled."""
    num_candidates: int = Field(default=20, ge=1, le=1000)
    """Candidates returned for reranking."""


class LLMConfig(_Section):
    backend: Literal["transformers", "openai", "vllm"] = "transformers"
    """`transformers` in-process (default), `openai` for any OpenAI-compatible server (vLLM), `vllm` offline engine."""
    model: str = "SmolLM2-135M-Instruct"
    """Model: the packaged SmolLM2-135M-Instruct, a local folder or a model id (also the local tokenizer for `openai`)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype for in-process and offline backends; label scores always come from fp32 logits. `auto`: bfloat16 on a
    GPU or on a CPU with native bf16 instructions (AVX-512 BF16 or AMX), else float32 (the offline `vllm` engine takes
    `auto` as the model's own dtype). bf16 ran 2.4-3.1x the users/s of fp32 on an AMD EPYC with AVX-512 BF16, 0.6-0.9x
    on an Intel Xeon without AMX (bench_speed.py)."""
    device: str = "cpu"
    """Torch device for the in-process backend."""
    batch_size: int = Field(default=1, ge=1, le=4096)
    """Prompts per in-process forward pass. With the prefix cache a batch is right-padded after the shared start: 4
    measured 0.99-1.39x the users/s of 1 on 2 CPU cores (benchmarks/bench_speed.py)."""
    prefix_cache: bool = True
    """In-process: compute the prompt's shared start (the chat header and the trained soft prompt) once and reuse its KV
    cache for every user; vLLM does the same with --enable-prefix-caching."""
    max_context: int | None = Field(default=None, ge=64, le=10_000_000)
    """Prompt budget in tokens (default: the model's context length)."""
    base_url: str = "http://127.0.0.1:8000/v1"
    """OpenAI-compatible endpoint for `openai`."""
    served_model: str | None = None
    """Model name on the server (default: the first one /v1/models lists)."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the server's API key (unset: no key sent)."""
    concurrency: int = Field(default=4, ge=1, le=1024)
    """Requests in flight at once for `openai`."""
    timeout_s: float = Field(default=60.0, gt=0, le=86_400)
    """Per-request timeout for `openai`."""
    max_retries: int = Field(default=3, ge=0, le=100)
    """Retries with exponential backoff on connection errors, timeouts and 5xx for `openai`."""
    soft_prompt_transport: Literal["chat", "completions"] = "chat"
    """How `openai` sends a soft prompt: a `prompt_embeds` chat content part, or full-prompt embeddings on /completions."""


class RerankConfig(_Section):
    method: Literal["verbalizer", "listwise"] = "verbalizer"
    """`verbalizer`: label log-probs from one forward pass (LlamaRec); `listwise`: generated ranking (LLMRank baseline)."""
    label_set: Literal["letters", "letters52"] = "letters"
    """Candidate labels: A..Z (26) or A..Z a..z (52)."""
    template: str = "rerank.v1"
    """Verbalizer prompt (`prompts/templates/<template>.yaml`)."""
    listwise_template: str = "listwise.v1"
    """Listwise-generation prompt."""
    explain_template: str = "explain.v1"
    """Explanation prompt for demos."""
    explain_mode: Literal["template", "llm"] = "template"
    """How each pick's grounded facts become a sentence: a fixed template, or the LLM (`explain.v2`, template fallback)."""
    max_history_titles: int = Field(default=10, ge=0, le=1000)
    """Most recent history titles listed in the prompt."""
    max_title_chars: int = Field(default=80, ge=8, le=10_000)
    """Titles longer than this are cut when the prompt must shrink to fit the context."""
    max_title_tokens: int | None = Field(default=None, ge=4, le=10_000)
    """Titles in the prompt are cut to this many LLM tokens, dropping a trailing " (year)" first (LlamaRec: 32; None = whole titles)."""
    fusion_weight: float | None = Field(default=None, ge=0, le=1)
    """Weight of the LLM score against the retrieval score; None = chosen on validation."""
    fusion_grid: Annotated[list[Annotated[float, Field(ge=0, le=1)]], Field(min_length=1)] = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    """Weights tried on validation (0 = retrieval order, so reranking never scores below retrieval there)."""
    explain_max_tokens: int = Field(default=60, ge=1, le=4096)
    """Length of a generated explanation."""


class FederationConfig(_Section):
    rounds: int = Field(default=10, ge=1, le=1_000_000)
    """Most federated rounds (training may stop earlier, see patience)."""
    clients_per_round: int | None = Field(default=None, ge=1)
    """Clients sampled each round (None = all)."""
    sampling: Literal["fixed", "poisson"] = "fixed"
    """How clients_per_round picks clients: exactly that many (fixed), or each independently with probability clients_per_round / clients (poisson: what the DP accountant assumes; under DP the noised sum is divided by the expected count)."""
    select: Literal["best", "last"] = "best"
    """Which round's state the run keeps: the best on validation R@10, or the last (under DP, choosing by validation uses data ε does not cover)."""
    min_clients: int = Field(default=1, ge=1)
    """A round aggregates what arrived if at least this many valid updates did; otherwise the state is kept."""
    local_epochs: int = Field(default=1, ge=1, le=10_000)
    """Passes over each client's local windows per round (ignored when local_steps is set)."""
    local_steps: int | None = Field(default=None, ge=1, le=1_000_000)
    """Optimiser steps per client per round, whatever its data size (None = local_epochs passes)."""
    patience: int | None = Field(default=10, ge=1)
    """Stop after this many rounds without a better validation R@10; the best round is what the run keeps (None = run every round)."""
    strategy: StrategyName = "fedavg"
    """Flower strategy (`flwr.serverapp.strategy`) that aggregates the valid updates: fedavg, fedprox, fedadam, fedyogi, fedavgm, fedtrimmedavg, fedmedian, krum or bulyan."""
    trim_fraction: float = Field(default=0.1, ge=0, lt=0.5)
    """Fraction trimmed at each end for `fedtrimmedavg` (its beta)."""
    prox_mu: float = Field(default=0.0, ge=0, le=1e4)
    """FedProx proximal weight (0 = FedAvg local objective)."""
    server_lr: float = Field(default=0.01, gt=0, le=10)
    """Server learning rate: eta of `fedadam` / `fedyogi`, server_learning_rate of `fedavgm`."""
    server_momentum: float = Field(default=0.9, ge=0, lt=1)
    """Server momentum of `fedavgm`."""
    num_malicious: int = Field(default=0, ge=0, le=1000)
    """Clients `krum` / `bulyan` tolerate (bulyan needs 4·f + 3 replies per round)."""
    max_update_norm: float | None = Field(default=None, gt=0, le=1e12)
    """Updates with a larger L2 norm are rejected (None = no bound)."""
    max_weight_ratio: float | None = Field(default=None, ge=1, le=1e6)
    """A client's example count weighs at most this many times the round's median (a client that overstates its data cannot dominate the mean; None = as reported)."""
    dp_clip: float | None = Field(default=None, gt=0, le=1e6)
    """Central DP: clip each update to this L2 norm (None = no DP)."""
    dp_noise_multiplier: float = Field(default=0.0, ge=0, le=1e4)
    """Central DP: Gaussian noise std as a multiple of dp_clip, on the sum of updates."""
    dp_delta: float = Field(default=1e-5, gt=0, lt=1)
    """δ at which ε is reported."""
    dp_clip_on: Literal["server", "client"] = "server"
    """Where central DP clips: on the server (it sees raw updates), or on each client with Flower's clipping mods (the server only noises)."""
    dp_adaptive: bool = False
    """Central DP with adaptive clipping (Andrew et al.): dp_clip is the initial norm, moved each round towards the dp_target_quantile of update norms."""
    dp_target_quantile: float = Field(default=0.5, ge=0, le=1)
    """Adaptive clipping: the fraction of updates the norm should leave unclipped."""
    dp_clip_lr: float = Field(default=0.2, gt=0, le=10)
    """Adaptive clipping: learning rate of the geometric norm update."""
    upload_rows: Literal["all", "touched"] = "all"
    """Item-table rows a client uploads: all, or only those of items in its own histories (indices + values)."""
    upload_rank: int | None = Field(default=None, ge=1, le=4096)
    """Upload every matrix update as rank-r factors of its truncated SVD where that is smaller (CoLR-style); None = full."""
    upload_bits: Literal[32, 16, 8, 1] = 32
    """Numbers in the tower's upload: 32 = fp32, 16 = bf16, 8 = int8 with an fp32 scale per row or column, 1 = the sign with one fp32 scale (mean magnitude) per row or column."""
    soft_prompt_bits: Literal[32, 16, 8, 1] = 32
    """Numbers in the soft prompt and projector's upload (as upload_bits)."""
    error_feedback: bool = True
    """With a lossy upload, each client keeps what its upload dropped (in its own folder) and adds it to its next update."""
    secagg: bool = False
    """Aggregate with SecAgg+ (the server sees only the weighted mean; no per-update validation, robust rules or central DP)."""
    secagg_num_shares: int = Field(default=3, ge=2)
    """SecAgg+ shares per client secret."""
    secagg_threshold: int = Field(default=2, ge=1)
    """SecAgg+ shares needed to reconstruct (tolerates num_shares - threshold dropouts)."""
    secagg_clipping_range: float = Field(default=8.0, gt=0, le=1e6)
    """SecAgg+ clips scaled values to ±this before quantising."""
    secagg_quantization_range: int = Field(default=2**22, ge=2)
    """SecAgg+ quantisation levels (error ≈ 2·clip/levels per client)."""
    engine: Literal["inprocess", "simulation", "deployment"] = "inprocess"
    """Flower engine: in-process grid (no Ray), Simulation Engine (Ray), or Deployment Engine (SuperLink/SuperNodes)."""
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    """Seed for client sampling, local shuffling and DP noise."""

    @property
    def compresses_uploads(self) -> bool:
        """Whether uploads are compressed (then lossy, and error feedback applies)."""
        return self.upload_rows != "all" or self.upload_rank is not None or self.upload_bits != 32 or self.soft_prompt_bits != 32

    @model_validator(mode="after")
    def _consistent(self) -> FederationConfig:
        if self.dp_noise_multiplier > 0 and self.dp_clip is None:
            raise ValueError("federation.dp_noise_multiplier > 0 needs federation.dp_clip (the per-client L2 bound)")
        if self.secagg and (self.dp_clip is not None or self.strategy != "fedavg" or self.max_update_norm is not None
                            or self.clients_per_round is not None or self.sampling != "fixed"):
            raise ValueError(
                "federation.secagg=true hides single updates from the server, so it cannot be combined with dp_clip, "
                "max_update_norm, a strategy other than fedavg or client sampling; turn those off or set secagg=false"
            )
        if self.dp_clip is not None and self.strategy not in MEAN_STRATEGIES:
            raise ValueError(f"federation.dp_clip wraps a mean-based strategy (DP noise is calibrated to the mean); "
                             f"{self.strategy} is not one; use {', '.join(MEAN_STRATEGIES[:-1])} or {MEAN_STRATEGIES[-1]}")
        if self.sampling == "poisson" and self.dp_clip is not None and self.strategy not in ("fedavg", "fedprox"):
            raise ValueError(f"federation.sampling=poisson under DP divides the noised sum by the expected cohort, which is only "
                             f"the mean for fedavg and fedprox, not {self.strategy}; use one of those or sampling=fixed")
        if self.compresses_uploads and (self.secagg or (self.dp_clip is not None and self.dp_clip_on == "client")):
            raise ValueError("compressed uploads (upload_rows / upload_rank / upload_bits / soft_prompt_bits) are decoded by the "
                             "server, so they cannot be combined with secagg or dp_clip_on=client (whose clipping mod needs full "
                             "arrays); keep the uploads at their defaults or clip on the server")
        if self.secagg_threshold > self.secagg_num_shares:
            raise ValueError(f"federation.secagg_threshold={self.secagg_threshold} exceeds secagg_num_shares={self.secagg_num_shares}")
        return self


class SoftPromptConfig(_Section):
    enabled: bool = False
    """Also train the LLM soft prompt and the item-token projector on each client, in-process backend only."""
    tokens: int = Field(default=20, ge=0, le=1000)
    """Virtual tokens in the soft prompt."""
    template: str = "rerank.v6"
    """Prompt of the trained reranker: `rerank.v6` (lean: the user token and top genres, then each candidate's bare letter and
    item token, no titles; each slot on its own line so vLLM's prompt_embeds parts match), `rerank.v5` (`rerank.v6` with "(B)" letters),
    `rerank.v4` (compact: also genres, history titles and 10-token candidate titles; 3× the positions), `rerank.v3` (the
    full prompt, item tokens only) or `rerank.v2`."""
    user_token: bool = True
    """Also project the tower's query vector for the user into one token (LlaRA/CoLLM hybrid prompt); needs a template
    with `{{ user_slot }}`."""
    max_title_tokens: int | None = Field(default=10, ge=4, le=10_000)
    """Title length in LLM tokens in a trained reranker's prompt that shows titles (`rerank.v4`; None = whole titles)."""
    max_history_titles: int = Field(default=10, ge=0, le=1000)
    """History titles in a trained reranker's prompt that shows them (`rerank.v4`; the user token carries the whole history)."""
    positions: int = Field(default=1, ge=1, le=1000)
    """Training examples per user: targets at the last `positions` places of its training history, each with the
    tower's candidates for the history before it."""
    lr: float = Field(default=1e-2, gt=0, le=10)
    """Client learning rate for the soft prompt and projector."""
    batch_size: int = Field(default=8, ge=1, le=4096)
    """Prompts per soft-prompt training step."""
    users: int | None = Field(default=None, ge=1)
    """At most this many of a client's users train the soft prompt per round, drawn afresh each round (None = all)."""
    personal_tokens: int = Field(default=0, ge=0, le=1000)
    """Personal virtual tokens per client, put before the soft prompt, trained locally and never sent (0 = none)."""

    @model_validator(mode="after")
    def _personal_needs_prompt(self) -> SoftPromptConfig:
        if self.personal_tokens and not self.enabled:
            raise ValueError("soft_prompt.personal_tokens > 0 needs soft_prompt.enabled=true (they are extra soft-prompt tokens)")
        return self


class EvalConfig(_Section):
    splits: list[Literal["valid", "test"]] = ["test"]
    """Splits to evaluate."""
    ks: Annotated[list[Annotated[int, Field(ge=1, le=10_000)]], Field(min_length=1)] = [5, 10, 20]
    """Cut-offs for Recall/NDCG."""
    baselines: list[Literal["popularity", "random", "text"]] = ["popularity", "random", "text"]
    """Scorers to evaluate."""
    sampled_negatives: int = Field(default=99, ge=1, le=100_000)
    """Negatives per user for the sampled track (HR@10/NDCG@10)."""
    max_users: int | None = Field(default=None, ge=1)
    """Evaluate only the first N users (None = all)."""
    rerank_max_users: int | None = Field(default=None, ge=0)
    """Users in the reranked test evaluation that ends a `fedrec train` with a soft prompt: the first N of the evaluated
    users (an LLM pass each; 0 = skip it, None = all of them)."""
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    """Seed for the random baseline and negative sampling."""
    batch_size: int = Field(default=256, ge=1, le=65_536)
    """Users scored per batch."""

    @field_validator("ks")
    @classmethod
    def _positive_ks(cls, ks: list[int]) -> list[int]:
        if not ks or any(k < 1 for k in ks):
            raise ValueError(f"must be a non-empty list of positive cut-offs, got {ks}")
        return sorted(set(ks))


class FedrecConfig(_Section):
    data: DataConfig = DataConfig()
    """Dataset and preprocessing."""
    partition: PartitionConfig = PartitionConfig()
    """Client partitions."""
    profile: ProfileConfig = ProfileConfig()
    """Text profiles."""
    embedder: EmbedderConfig = EmbedderConfig()
    """Item and profile text embedding."""
    index: IndexConfig = IndexConfig()
    """FAISS index."""
    retrieval: RetrievalConfig = RetrievalConfig()
    """Candidate retrieval."""
    llm: LLMConfig = LLMConfig()
    """LLM backend."""
    rerank: RerankConfig = RerankConfig()
    """LLM reranking."""
    tower: TowerConfig = TowerConfig()
    """Retrieval tower: shape and training recipe."""
    soft_prompt: SoftPromptConfig = SoftPromptConfig()
    """LLM soft prompt and item-token projector."""
    federation: FederationConfig = FederationConfig()
    """Federated training."""
    eval: EvalConfig = EvalConfig()
    """Evaluation protocol."""
    cache_dir: Path | None = None
    """Where downloads, embeddings and indices are cached (default: $FEDREC_CACHE_DIR or ~/.cache/fedrec)."""
    output_dir: Path = Path("runs")
    """Where results (JSON, plots) are written."""

    def resolved_cache_dir(self) -> Path:
        """The cache directory after applying the environment default."""
        if self.cache_dir is not None:
            return self.cache_dir
        env = os.environ.get("FEDREC_CACHE_DIR")
        return Path(env) if env else Path.home() / ".cache" / "fedrec"


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b=value` into (["a", "b"], parsed YAML value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects KEY=VALUE such as retrieval.query=profile, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"--set {key}: value {raw[:80]!r} is not valid YAML ({reason})") from None
    _check_size(value, f"--set {key}")
    return key.strip().split("."), value


MAX_CONFIG_VALUES = 100_000
"""Most values a config may expand to; YAML aliases can otherwise make a small file expand without bound."""


def _check_size(tree: Any, source: str) -> None:
    """Refuse a parsed config that expands (through aliases) to more than `MAX_CONFIG_VALUES` values."""
    seen, stack = 0, [tree]
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_CONFIG_VALUES:
            raise ConfigError(f"{source} expands to more than {MAX_CONFIG_VALUES:,} values (nested YAML aliases?); "
                              "write the values out or remove the aliases")
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _apply(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(path)}: {part} is a value, not a section")
        node = child
    node[path[-1]] = value


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return sorted(model.model_fields)


def format_validation_error(exc: ValidationError, model: type[BaseModel], source: str) -> str:
    """Render a pydantic error as one line per key: key, value and what is allowed."""
    lines = [f"invalid configuration in {source}:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(_allowed_keys(model, err["loc"]))
            lines.append(f"  {key}: unknown key; allowed keys here: {allowed}")
            continue
        message = err["msg"].removeprefix("Value error, ")
        got = err.get("input")
        text = "" if isinstance(got, dict) else reprlib.repr(got)
        shown = f" (got {text})" if text else ""
        lines.append(f"  {key}: {message}{shown}")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> FedrecConfig:
    """Read a YAML config (or the defaults) and apply `a.b=value` overrides.

    Raises:
        ConfigError: the file is missing or malformed, or a key or value is invalid.
    """
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a folder; pass a YAML file such as configs/ml-100k.yaml")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist (or is not a regular file); pass one of configs/*.yaml")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start}: {exc.reason}); pass a YAML file") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        _check_size(loaded, f"config file {path}")
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(loaded).__name__}")
        tree = loaded or {}
    for text in overrides or []:
        keys, value = parse_override(text)
        _apply(tree, keys, value)
        source += f" + --set {text}"
    try:
        return FedrecConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, FedrecConfig, source)) from None


def _shown(value: Any) -> str:
    return str(value) if isinstance(value, Path) else repr(value)


def reference_markdown() -> str:
    """The configuration reference as a Markdown table (kept in the README; a test checks it)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]

    def one_line(text: str | None) -> str:  # a wrapped field docstring stays in its table row
        return " ".join((text or "").split())

    for section, field in FedrecConfig.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            for name, sub in annotation.model_fields.items():
                rows.append(f"| `{section}.{name}` | `{_shown(sub.default)}` | {one_line(sub.description)} |")
        else:
            rows.append(f"| `{section}` | `{_shown(field.default)}` | {one_line(field.description)} |")
    return "\n".join(rows)
