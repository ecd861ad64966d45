"""The `fedrec` command line: each subcommand builds a config and calls library code."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich import box
from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from pipeline.config import FedrecConfig, load_config
from pipeline.errors import FedrecError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help=__doc__)
data_app = typer.Typer(no_args_is_help=True, help="Inspect and prepare datasets.")
index_app = typer.Typer(no_args_is_help=True, help="Build FAISS indices.")
app.add_typer(data_app, name="data")
app.add_typer(index_app, name="index")
config_app = typer.Typer(no_args_is_help=True, help="Show configurations.")
app.add_typer(config_app, name="config")
# Printed values are plain text: `[/red]` in a title or a user id prints as written and never as markup.
console = Console(markup=False, highlight=False)


def _say(label: str, style: str, text: str) -> None:
    """Print `label` styled, then `text` verbatim (never parsed as markup)."""
    console.print(Text.assemble((label, style), " ", text))

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (configs/*.yaml); defaults when omitted.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a key, e.g. --set retrieval.query=profile (repeatable).")]
SplitOpt = Annotated[str, typer.Option("--split", help="Which held-out item the history stops before: valid or test.")]
RunOpt = Annotated[Path | None, typer.Option("--run", help="A `fedrec train` run folder to serve (default: the newest run made for this dataset and tower).")]


def _config(config: Path | None, overrides: list[str] | None) -> FedrecConfig:
    return load_config(config, overrides or [])


def _recommender(cfg: FedrecConfig, run: Path | None = None, *, serving: bool = False):  # noqa: ANN202 - pipeline.recommender.Recommender
    """The recommender; `serving`: load the run (`run`, else the newest matching one) and say where candidates come from."""
    from pipeline.io import check_writable
    from pipeline.recommender import Recommender

    check_writable(cfg.resolved_cache_dir(), "cache_dir", folder=True)
    with console.status(f"loading {cfg.data.name}"):
        rec = Recommender.from_config(cfg, progress=True, run=run if run is not None else "auto")
    if serving:
        with console.status("loading the trained run"):
            source = rec.retrieval_source
        _say("retrieval:", "dim", source)
    return rec


def _check_split(split: str) -> str:
    if split not in ("valid", "test"):
        raise FedrecError(f"--split must be valid or test, got {split!r}")
    return split


@config_app.command("show")
def config_show(config: ConfigOpt = None, overrides: SetOpt = None) -> None:
    """Print the fully resolved configuration as YAML."""
    import yaml

    cfg = _config(config, overrides)
    console.print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


@config_app.command("reference")
def config_reference() -> None:
    """Print every configuration key with its default and meaning (Markdown)."""
    from pipeline.config import reference_markdown

    console.print(reference_markdown(), soft_wrap=True)


@data_app.command("info")
def data_info(config: ConfigOpt = None, overrides: SetOpt = None) -> None:
    """Counts and files of the dataset after preprocessing."""
    from pipeline.data import load_dataset
    from pipeline.io import check_writable

    cfg = _config(config, overrides)
    start = time.perf_counter()
    dataset = load_dataset(cfg.data, check_writable(cfg.resolved_cache_dir(), "cache_dir", folder=True))
    elapsed = time.perf_counter() - start
    table = Table(title=f"{dataset.name} after {cfg.data.min_user_interactions}/{cfg.data.min_item_interactions}-core")
    table.add_column("field")
    table.add_column("value", justify="right")
    for key, value in dataset.stats().items():
        table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    table.add_row("user ids", f"{dataset.user_ids[0]} … {dataset.user_ids[-1]}")
    for key, value in dataset.source.items():
        table.add_row(key, value)
    table.add_row("load + preprocess", f"{elapsed:.2f} s")
    console.print(table)


@data_app.command("prepare")
def data_prepare(
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    output: Annotated[Path | None, typer.Option(help="Output directory (default: <cache>/prepared/<dataset>).")] = None,
) -> None:
    """Write the preprocessed dataset, its split and client partitions to a directory."""
    from pipeline.data import load_dataset
    from pipeline.io import check_writable
    from pipeline.prepare import write_prepared

    cfg = _config(config, overrides)
    if output is not None:
        check_writable(output, "--output", folder=True)
    dataset = load_dataset(cfg.data, check_writable(cfg.resolved_cache_dir(), "cache_dir", folder=True))
    target = output or cfg.resolved_cache_dir() / "prepared" / dataset.name
    summary = write_prepared(dataset, cfg, target)
    _say("wrote", "green", f"{target}: {summary['users']:,} users, {summary['items']:,} items, "
                  f"{summary['interactions']:,} interactions, {summary['clients']:,} clients")


@index_app.command("build")
def index_build(
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    per_client: Annotated[bool, typer.Option("--per-client/--catalog-only", help="Also write one local index per client.")] = False,
    rebuild: Annotated[bool, typer.Option("--rebuild/--reuse", help="Rebuild even when a matching index exists.")] = False,
) -> None:
    """Embed the item texts and build the FAISS index (cached by model, texts and factory)."""
    cfg = _config(config, overrides)
    rec = _recommender(cfg)
    start = time.perf_counter()
    rec.item_vectors  # noqa: B018 - embeds (or loads from the cache) with a progress bar
    index = rec.build_index(rec.index_path(), rebuild=rebuild)
    _say("index", "green", f"{rec.index_path()}: {len(index):,} items × {index.dim} dims, "
                  f"factory {index.factory}, {time.perf_counter() - start:.1f} s")
    if per_client:
        paths = rec.client_indices(rebuild=rebuild)
        _say("client indices", "green", f"{len(paths)} files under {rec.index_path(0).parent}")


@app.command()
def recommend(
    user: Annotated[str, typer.Option("--user", "-u", help="User id as it appears in the dataset.")],
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    k: Annotated[int, typer.Option("-k", min=1, max=1000, help="How many items to show.")] = 10,
    split: SplitOpt = "test",
    rerank: Annotated[bool, typer.Option("--rerank/--no-rerank", help="Rerank the retrieved candidates with the LLM.")] = False,
    explain: Annotated[bool, typer.Option("--explain/--no-explain", help="Explain the top 3 picks from their facts: nearest history items, shared genres, rank movement.")] = False,
    run: RunOpt = None,
) -> None:
    """Print a user's text profile and top-k recommendations (trained tower → the user's client FAISS index → LLM)."""
    cfg = _config(config, overrides)
    rec = _recommender(cfg, run, serving=True)
    user_index = rec.dataset.user_index(user)
    _show_user(rec, user_index, k, _check_split(split), rerank=rerank, explain=explain)


def _show_user(rec, user_index: int, k: int, split: str, *, rerank: bool = False, explain: bool = False) -> None:  # noqa: ANN001
    raw_id = rec.dataset.user_id(user_index)
    console.print(Panel(rec.profile(user_index, split), title=Text(f"user {raw_id}: text profile"), expand=False))
    if rerank:
        with console.status(f"reranking with {rec.cfg.llm.backend}: {rec.cfg.llm.model}"):
            results = rec.recommend(raw_id, k, split, rerank=True)
    else:
        results = rec.recommend(raw_id, k, split)
    target = rec.split.targets(split)[user_index]
    title = f"top {len(results)} for user {raw_id}{' (reranked)' if rerank else ''}; held-out {split} item: {rec.dataset.catalog.label(target)}"
    table = Table(title=title)
    columns = [("rank", "right"), ("item", "right"), ("title", "left"), ("score", "right")]
    if rerank:
        columns += [("was", "right"), ("LLM log-p", "right")]
    for column, justify in columns:
        table.add_column(column, justify=justify)
    for r in results:
        hit = " ✓" if rec.dataset.catalog.index_of(r.item_id) == target else ""
        extra = [str(r.retrieval_rank), f"{r.llm_score:.3f}"] if rerank else []
        table.add_row(str(r.rank), str(r.item_id), r.title + hit, f"{r.score:.4f}", *extra)
    console.print(table)
    if explain:
        with console.status("writing an explanation"):
            note = rec.explain(raw_id, results[:3], split)
        console.print(Panel(note, title="why these picks", expand=False))


def _number(value: float) -> str:
    """Metrics print as .0443 (no leading zero) so nine columns fit an 80-column terminal."""
    text = f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return text[1:] if text.startswith("0.") else text


def render_report(report: dict) -> list[Table]:
    """The evaluation report as terminal tables: full ranking, then the sampled track and ceilings."""
    rows = report["rows"]
    splits = list(dict.fromkeys(row["split"] for row in rows))
    side = ("sampled", "ceiling", "users_per_s")
    full_keys = [k for k in rows[0] if k not in ("model", "split", "users") and not k.startswith(side)] if rows else []
    side_keys = sorted({k for row in rows for k in row if k.startswith(side)})
    title = f"{report['dataset']} {'/'.join(splits)}: {report['users']:,} users × {report['items']:,} items"
    tables = []
    side_caption = report["sampled_track"] if report["stage"] == "retrieval" else f"{report.get('backend')}; fusion weight {report.get('fusion_weight')}"
    for keys, caption in ((full_keys, f"{report['protocol']}\n{report['tie_rule']}"), (side_keys, side_caption)):
        if not keys:
            continue
        table = Table(title=title if not tables else None, caption=caption, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        table.add_column("model", no_wrap=True)
        if len(splits) > 1:
            table.add_column("split")
        for key in keys:
            table.add_column(key.replace("sampled_", "sampled ").replace("ceiling_", "ceiling ").replace("_per_s", "/s"), justify="right")
        for row in rows:
            cells = [row["split"]] if len(splits) > 1 else []
            table.add_row(row["model"], *cells, *(_number(row[key]) if key in row else "—" for key in keys))
        tables.append(table)
    return tables


def _run_evaluation(cfg: FedrecConfig, stage: str, output: Path | None, run: Path | None = None, rec=None) -> dict:  # noqa: ANN001
    from pipeline.evaluate import evaluate_recommender
    from pipeline.io import check_writable, write_json

    rec = rec if rec is not None else _recommender(cfg, run, serving=True)
    target = check_writable(output or cfg.output_dir / f"eval-{rec.dataset.name}-{stage}.json", "--output")
    if "text" in cfg.eval.baselines:
        rec.index  # noqa: B018 - embeds items (progress bar) before the evaluation bars start
    report = evaluate_recommender(rec, stage=stage, progress=True)
    for table in render_report(report):
        console.print(table)
    write_json(target, report)
    console.print(f"report written to {target}", style="dim")
    return report


@app.command()
def train(
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    engine: Annotated[str | None, typer.Option(help="inprocess (no Ray), simulation (Flower Simulation Engine) or deployment.")] = None,
    resume: Annotated[bool, typer.Option("--resume/--restart", help="Continue from the last checkpoint of this configuration.")] = False,
) -> None:
    """Federated training of the retrieval tower with Flower; checkpoints every round, keeps the best, writes the run folder."""
    from federation.runner import train as run_training
    from pipeline.io import check_writable
    from pipeline.trained import run_dir

    cfg = _config(config, (overrides or []) + ([f"federation.engine={engine}"] if engine else []))
    check_writable(cfg.output_dir, "output_dir", folder=True)
    rec = _recommender(cfg)
    rec.item_vectors  # noqa: B018 - embeds (or loads) before the rounds start
    results = run_training(rec, resume=resume, progress=True)
    table = Table(title=f"federated training: {results['clients']} clients, {results['rounds']} rounds ({results['engine']}), "
                        f"best round {results['best_round']}",
                  box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for column in ("round", "asked", "accepted", "rejected", "loss", "valid R@10", "valid N@10", "up KiB", "s", "ε"):
        table.add_column(column, justify="right")
    for h in results["history"]:
        table.add_row(str(h["round"]), str(h["asked"]), str(h["accepted"]), str(len(h["rejected"]) + len(h.get("failed", []))), f"{h.get('train_loss', float('nan')):.3f}",
                      _number(h["valid"]["R@10"]), _number(h["valid"]["N@10"]), f"{h['bytes_up'] / 1024:,.0f}",
                      f"{h.get('seconds', 0):.1f}", f"{h['epsilon']:.2f}" if "epsilon" in h else "—")
    console.print(table)
    test = results["test"]
    kept = "best" if rec.cfg.federation.select == "best" else "last"
    console.print(f"test ({kept} round {results['best_round']}, through the client FAISS indices): R@10 {test['R@10']:.4f}  N@10 {test['N@10']:.4f}  "
                  f"R@20 {test.get('R@20', float('nan')):.4f}  MRR {test['MRR']:.4f}")
    console.print(f"run folder: {run_dir(rec)} (serve it with `fedrec recommend|evaluate|serve --run …`)")


@app.command("rerank")
def rerank_job(
    input_path: Annotated[Path, typer.Option("--input", "-i", help="JSONL requests, one JSON object per line: id, user_id or history, optionally candidates and k; or OpenAI batch lines holding them in body.")],
    output_path: Annotated[Path, typer.Option("--output", "-o", help="JSONL results (resumable: rerun the same command to continue).")],
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    errors_path: Annotated[Path | None, typer.Option("--errors", help="Bad rows with line numbers (default: <output>.errors.jsonl).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, max=100_000, help="Requests per LLM batch and per checkpoint.")] = 16,
    fmt: Annotated[str, typer.Option("--format", help="Line format of input and output: native, openai (OpenAI batch lines) or auto (the first JSON object line decides).")] = "auto",
    engine: Annotated[str, typer.Option(help="local, or ray (Ray Data actors; the same output files, resumable by shard).")] = "local",
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="--engine ray: the cluster to join, <head>:6379 or auto (default: $RAY_ADDRESS, else a local Ray).")] = None,
    shard_size: Annotated[int | None, typer.Option("--shard-size", min=1, max=100_000_000, help="--engine ray: lines per shard, the unit of resume; a multiple of --batch-size (default: 64 batches).")] = None,
    concurrency: Annotated[int, typer.Option("--concurrency", min=1, max=10_000, help="--engine ray: reranker actors, each loading the model once.")] = 1,
    run: RunOpt = None,
) -> None:
    """Batch offline reranking of JSONL requests (native or OpenAI batch format), on this machine or a Ray cluster."""
    from pipeline.batch import run_job, run_ray

    if engine not in ("local", "ray"):
        raise FedrecError(f"--engine must be local or ray, got {engine!r}")
    if engine == "local":
        given = [name for name, value in (("--ray-address", ray_address), ("--shard-size", shard_size)) if value is not None]
        given += ["--concurrency"] if concurrency != 1 else []
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise FedrecError(f"{', '.join(given)} {verb} only to --engine ray; add --engine ray, or drop {'it' if len(given) == 1 else 'them'}")
    cfg = _config(config, overrides)
    if engine == "ray":
        summary = run_ray(cfg, input_path, output_path, errors_path=errors_path, batch_size=batch_size, shard_size=shard_size,
                          concurrency=concurrency, progress=True, run=run, fmt=fmt, address=ray_address)
    else:
        summary = run_job(cfg, input_path, output_path, errors_path=errors_path, batch_size=batch_size, progress=True, run=run, fmt=fmt)
    console.print(
        f"rows ok {summary.ok:,}, failed {summary.failed:,}, skipped (already done) {summary.skipped:,}; "
        f"{summary.rows_per_s:.1f} rows/s over {summary.seconds:.1f} s → {output_path}"
    )


@app.command()
def evaluate(
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    stage: Annotated[str, typer.Option(help="Pipeline stage to evaluate: retrieval or rerank.")] = "retrieval",
    output: Annotated[Path | None, typer.Option(help="JSON report path (default: <output_dir>/eval-<dataset>-<stage>.json).")] = None,
    run: RunOpt = None,
) -> None:
    """Full-ranking evaluation (Recall/NDCG@k, MRR, sampled HR/NDCG@10) of baselines and the served pipeline (through FAISS)."""
    _run_evaluation(_config(config, overrides), stage, output, run)


@app.command()
def demo(
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    users: Annotated[int, typer.Option(min=1, max=1000, help="How many users to show recommendations for.")] = 3,
    k: Annotated[int, typer.Option("-k", min=1, max=1000, help="Items per user.")] = 10,
    rerank_users: Annotated[int, typer.Option(min=1, max=1_000_000, help="Users in the LLM-rerank evaluation (valid tunes the fusion weight, test reports).")] = 40,
) -> None:
    """The main job: federated training of the tower, and with `soft_prompt.enabled` of the reranker's soft prompt
    (reused when this config already has a run), a few users' recommendations (tower → the user's client FAISS index →
    LLM rerank, with an explanation), then the evaluation."""
    from federation.runner import train as run_training
    from pipeline.io import check_writable
    from pipeline.trained import find_run, load_trained, run_dir

    cfg = _config(config, overrides)
    check_writable(cfg.output_dir, "output_dir", folder=True)
    rec = _recommender(cfg)
    stats = rec.dataset.stats()
    _say(stats["dataset"], "bold", f"({rec.dataset.source.get('origin')}): {stats['users']:,} users, "
                                    f"{stats['items']:,} items, {stats['interactions']:,} interactions")
    rec.item_vectors  # noqa: B018 - embeds (or loads) the item texts with a progress bar
    folder = run_dir(rec)
    if find_run(rec) == folder:
        console.print(f"trained run found: {folder} (delete it to retrain)")
    else:
        resume = (folder / "checkpoint.npz").is_file()
        fed = cfg.federation
        what = "tower + reranker soft prompt" if cfg.soft_prompt.enabled else "tower"
        console.print(f"federated training ({what}): {cfg.partition.num_clients if cfg.partition.scheme == 'group' else stats['users']} "
                      f"clients, up to {fed.rounds} rounds, patience {fed.patience}{' (resuming)' if resume else ''}")
        start = time.perf_counter()
        results = run_training(rec, resume=resume, progress=True)
        console.print(f"trained in {time.perf_counter() - start:.0f} s: best round {results['best_round']} of {results['rounds']}, "
                      f"{results['bytes_up_per_client_round']:,} bytes up per client per round")
    served = rec.with_run(load_trained(folder, rec))
    _say("retrieval:", "dim", served.retrieval_source)
    start = time.perf_counter()
    with console.status(f"loading the LLM ({cfg.llm.model}, {cfg.llm.dtype})"):
        served.backend  # noqa: B018
    console.print(f"LLM ready: {served.backend.describe()} in {time.perf_counter() - start:.1f} s")
    rng = np.random.default_rng(cfg.eval.seed)
    chosen = sorted(rng.choice(served.dataset.n_users, size=min(users, served.dataset.n_users), replace=False))
    for position, user_index in enumerate(chosen):
        _show_user(served, int(user_index), k, "test", rerank=True, explain=position == 0)
    retrieval = _run_evaluation(served.cfg, "retrieval", None, rec=served)
    subset = served.cfg.model_copy(update={"eval": served.cfg.eval.model_copy(update={"max_users": rerank_users, "splits": ["test"]})})
    reranked = _run_evaluation(subset, "rerank", None, rec=served.with_cfg(subset))
    _summary_table(retrieval, reranked)


def _summary_table(retrieval: dict, reranked: dict) -> None:
    """One table: popularity, zero-shot text, the federated tower (all users) and tower + LLM rerank (a user subset)."""
    table = Table(title=f"{retrieval['dataset']} test, full ranking", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for column in ("model", "users", "R@10", "N@10", "R@20", "MRR"):
        table.add_column(column, justify="left" if column == "model" else "right")
    rows = [r for r in retrieval["rows"] if r["split"] == "test" and r["model"] != "random"]
    rows += [{**r, "model": "tower order (same users)" if r["model"].startswith("retrieval") else f"tower + {'trained' if 'trained' in reranked['prompt'] else 'zero-shot'} LLM {r['model']}"}
             for r in reranked["rows"] if r["split"] == "test"]
    for r in rows:
        table.add_row(r["model"], f"{r['users']:,}", *(_number(r[k]) if k in r else "—" for k in ("R@10", "N@10", "R@20", "MRR")))
    console.print(table)
    console.print(f"rerank rows: the first {reranked['users']} test users, reranked with {reranked['prompt']} (fusion weight tuned "
                  "on their validation items); misses count as 0, so R@20 of the tower is their ceiling", style="dim")


@app.command()
def serve(
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    host: Annotated[str, typer.Option(help="Address to bind (127.0.0.1 keeps the page local; 0.0.0.0 exposes it).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8000,
    run: RunOpt = None,
    timeout: Annotated[float, typer.Option(min=1, max=86_400, help="Seconds one request may wait for the LLM before a 503.")] = 120.0,
    max_queue: Annotated[int, typer.Option(min=1, max=10_000, help="Requests admitted at once; more get a 503 'busy'.")] = 32,
) -> None:
    """The demo page and JSON API (OpenAPI schema at /openapi.json): search, profile, candidates, LLM ranking, explanation."""
    try:
        from pipeline.serve import check_limits
        from pipeline.serve import serve as start
    except ImportError as exc:
        raise ImportError(f"fedrec serve needs the serve extra: pip install -e '.[serve]' ({exc})") from None
    check_limits(timeout, max_queue)
    cfg = _config(config, overrides)
    rec = _recommender(cfg, run, serving=True)
    with console.status("building the item index"):
        rec.index  # noqa: B018
    with console.status(f"loading the LLM ({cfg.llm.model})"):
        rec.backend  # noqa: B018
    console.print(f"fedrec demo on http://{host}:{port}/ ({rec.dataset.name}, {rec.backend.describe()}); Ctrl+C stops it")
    start(rec, host=host, port=port, timeout_s=timeout, max_queue=max_queue)


def main() -> None:
    """Entry point: every failure prints one clear message instead of a traceback (FEDREC_DEBUG=1 shows it)."""
    import click

    from pipeline.llm.base import LLMError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        code = app(standalone_mode=False)
    except click.ClickException as exc:  # usage errors: click prints them with the usage line
        exc.show()
        code = exc.exit_code
    except click.exceptions.Abort as exc:  # click turns EOFError into Abort; an empty file read as a model is one
        cause = exc.__cause__
        code = 130 if cause is None else _report(cause, LLMError)
    except KeyboardInterrupt:
        code = 130
    except Exception as exc:  # noqa: BLE001 - the one place that turns any failure into a message
        code = _report(exc, LLMError)
    if code == 130:
        console.print("interrupted; finished work is saved (rerun the same command, with --resume for `fedrec train`)", style="yellow")
    sys.exit(code if isinstance(code, int) else 0)


def _report(exc: BaseException, llm_error: type[Exception]) -> int:
    """Print `exc` as one line; 2 for a problem with the input or the environment, 1 for anything unexpected."""
    import zipfile

    if os.environ.get("FEDREC_DEBUG"):
        raise exc
    expected = (FedrecError, llm_error, ValueError, OSError, ImportError, zipfile.BadZipFile, EOFError)
    if isinstance(exc, expected):
        _say("error:", "bold red", str(exc) or type(exc).__name__)
        return 2
    _say("error:", "bold red", f"unexpected {type(exc).__name__}: {exc}. This is a bug in fedrec; rerun with FEDREC_DEBUG=1 "
                               "to see the traceback and report it")
    return 1


if __name__ == "__main__":
    main()
