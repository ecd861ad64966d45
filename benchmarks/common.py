"""Helpers shared by the benchmark scripts: machine facts, timing, and RESULTS.md sections."""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "RESULTS.md"
RECORDS = REPO / "benchmarks" / "records"
"""Per-seed result records of the tables built from several runs (committed, so `--report` rebuilds a table on any
checkout and later seeds add to it); the trained runs themselves stay under runs/."""
sys.path.insert(0, str(REPO))


def data_dir() -> Path:
    """MovieLens copies: $FEDREC_DATA_DIR or ../shared/data beside the checkout."""
    env = os.environ.get("FEDREC_DATA_DIR")
    path = Path(env) if env else REPO.parent / "shared" / "data"
    if not (path / "ml-latest-small").is_dir():
        sys.exit(f"benchmark data not found in {path}; set FEDREC_DATA_DIR to a folder holding ml-latest-small/ and ml-100k/")
    return path


def machine() -> str:
    """CPU model, cores and memory, in one line."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
        mem = f"{mem_kb / 1024 / 1024:.0f} GiB"
    except (OSError, StopIteration):
        mem = "?"
    return f"{cpu}, {os.cpu_count()} cores, {mem} RAM, no GPU, Python {platform.python_version()}"


def median_time(fn: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    """Median wall time of `fn` over `repeats` runs, and all the runs."""
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs), runs


def record_machines(records: list[dict]) -> str:
    """The machines that committed records were measured on (each record's `machine`), in one line."""
    return "; ".join(dict.fromkeys(r["machine"] for r in records))


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def update_results(section: str, title: str, command: str, body: str, measured_on: str | None = None) -> None:
    """Replace (or append) the section `section` of RESULTS.md, stamped with machine, date and command. `measured_on`
    names the machine(s) of a section rebuilt from committed records (default: this one)."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    block = (
        f"<!-- {section} -->\n## {title}\n\n"
        f"Command: `{command}`  \nMachine: {measured_on or machine()}  \nDate: {stamp}\n\n{body.strip()}\n<!-- /{section} -->"
    )
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.is_file() else "# Benchmark results\n\nEvery figure here is written by the script named in its section.\n"
    pattern = re.compile(rf"<!-- {re.escape(section)} -->.*?<!-- /{re.escape(section)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    from pipeline.io import write_text

    write_text(RESULTS, text)


def wait_http(url: str, process: subprocess.Popen, timeout: float = 300.0) -> None:
    """Block until `url` answers 200; fail if `process` exits or the timeout passes."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


@contextmanager
def vllm_server(model: str, port: int, *extra: str, dtype: str = "float32") -> Iterator[str | None]:
    """The vLLM CPU server from .venv-vllm on 127.0.0.1:`port` with the flags fedrec needs; yields its /v1 URL
    (None when .venv-vllm is absent) and stops it afterwards."""
    python = REPO / ".venv-vllm" / "bin" / "python"
    if not python.exists():
        yield None
        return
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--enforce-eager",
               "--enable-prompt-embeds", "--logprobs-mode", "processed_logprobs", "--max-logprobs", "52",
               "--dtype", dtype, "--host", "127.0.0.1", "--port", str(port), *extra]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", server)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.terminate()
        server.wait(timeout=60)


def mean_sd(values: list[float]) -> str:
    """`mean ± sd` over seeds to 4 decimals (the value alone for one seed)."""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def log_command(out: Path, script: str, argv: list[str]) -> None:
    """Append the command that is about to produce results under `out` (its `--report` lists them all)."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "commands.txt").open("a") as handle:
        handle.write(f"python benchmarks/{script} " + " ".join(argv) + "\n")


def logged_commands(out: Path) -> str:
    """The distinct commands `log_command` recorded under `out`, for a RESULTS.md section ("?" when none)."""
    path = out / "commands.txt"
    return "`; `".join(dict.fromkeys(path.read_text().split("\n"))).strip("`; ") if path.is_file() else "?"

