"""Flower's Deployment Engine: a SuperLink and two SuperNodes on 127.0.0.1 run one federated round."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, running_server

pytestmark = pytest.mark.flower_deploy


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_one_round_on_superlink_and_two_supernodes(tmp_path: Path, cache_dir: Path) -> None:
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr"), "PATH": f"{bin_dir}:{os.environ['PATH']}", "FEDREC_CACHE_DIR": str(cache_dir)}
    link = _port()
    (tmp_path / "flwr").mkdir()
    (tmp_path / "flwr" / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{link}"\ninsecure = true\n')
    logs = tmp_path / "logs"
    logs.mkdir()
    # A cold start of the SuperLink can take longer than any fixed sleep: wait for its health endpoint.
    superlink = [str(bin_dir / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
                 "--port", str(link)]
    with running_server("SuperLink", superlink, f"http://127.0.0.1:{link}/health", logs / "superlink.log", env, timeout=120):
        _one_round(tmp_path, bin_dir, env, link, logs)


def _one_round(tmp_path: Path, bin_dir: Path, env: dict[str, str], link: int, logs: Path) -> None:
    """Two SuperNodes join the running SuperLink, and `flwr run` trains one round through them."""
    procs = []

    def start(name: str, *args: str) -> None:
        with (logs / f"{name}.log").open("w") as log:
            procs.append(subprocess.Popen([str(bin_dir / args[0]), *args[1:]], env=env, stdout=log, stderr=subprocess.STDOUT))

    try:
        for i in range(2):
            start(f"supernode{i}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}", "--port", str(_port()),
                  "--node-config", f"partition-id={i} num-partitions=2")
        out = tmp_path / "runs"
        overrides = ";".join([
            "partition.scheme=group", "partition.num_clients=2", "federation.rounds=1", "tower.dim=16",
            "tower.max_len=10", "tower.layers=1", "eval.max_users=20", f"output_dir={out}",
        ])
        run_config = f'config="{REPO / "configs" / "tiny.yaml"}" overrides="{overrides}"'
        done = subprocess.run([str(bin_dir / "flwr"), "run", str(REPO / "federation" / "deploy"), "local", "--stream", "-c", run_config],
                              env=env, capture_output=True, text=True, timeout=600)
        logs_text = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(logs.iterdir()))
        assert done.returncode == 0, done.stdout + done.stderr + logs_text
        results = list(out.glob("train-*/results.json"))
        assert results, done.stdout + done.stderr + logs_text
        report = json.loads(results[0].read_text())
        assert report["rounds"] == 1 and report["clients"] == 2
        assert report["history"][0]["accepted"] == 2
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
