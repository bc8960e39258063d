"""A real Prometheus server for tests.

``with running_prometheus(["127.0.0.1:8080"], tmp_path) as prometheus:`` starts the Prometheus
binary (``/usr/bin/prometheus``, the Debian package; ``KUBETUNE_TEST_PROMETHEUS`` overrides it) on
a free 127.0.0.1 port with a temporary config and storage, scraping the targets every second, and
returns once it answers ``/-/ready``. On exit the process is stopped (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from asgi_server import free_port

DEFAULT_BINARY = "/usr/bin/prometheus"


class PrometheusUnavailable(RuntimeError):
    """There is no Prometheus binary to run."""


def prometheus_binary() -> str:
    binary = os.environ.get("KUBETUNE_TEST_PROMETHEUS") or DEFAULT_BINARY
    found = shutil.which(binary)
    if found is None:
        raise PrometheusUnavailable(f"no Prometheus binary at {binary} (set KUBETUNE_TEST_PROMETHEUS)")
    return found


@dataclass(frozen=True)
class PrometheusServer:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_for_targets_up(self, timeout_s: float = 15.0) -> None:
        """Until every scrape target has been scraped successfully at least once."""
        deadline = time.monotonic() + timeout_s
        last: object = None
        while time.monotonic() < deadline:
            response = httpx.get(f"{self.url}/api/v1/targets", timeout=2)
            targets = response.json()["data"]["activeTargets"]
            last = [(target["scrapeUrl"], target["health"], target.get("lastError")) for target in targets]
            if targets and all(target["health"] == "up" for target in targets):
                return
            time.sleep(0.2)
        raise TimeoutError(f"Prometheus targets not up within {timeout_s}s: {last}")


def _config(targets: Sequence[str], scrape_interval: str) -> str:
    quoted = ", ".join(f'"{target}"' for target in targets)
    return (
        "global:\n"
        f"  scrape_interval: {scrape_interval}\n"
        f"  scrape_timeout: {scrape_interval}\n"
        f"  evaluation_interval: {scrape_interval}\n"
        "scrape_configs:\n"
        "  - job_name: kubetune-test\n"
        "    static_configs:\n"
        f"      - targets: [{quoted}]\n"
    )


def _wait_ready(server: PrometheusServer, timeout_s: float) -> bool:
    """True once /-/ready answers; False if it exited because its port was taken; raises otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        if server.process.poll() is not None:
            if "address already in use" in server.log_tail():
                return False
            raise RuntimeError(f"Prometheus exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.url}/-/ready", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            server.process.kill()
            server.process.wait(timeout=10)
            raise TimeoutError(f"Prometheus not ready within {timeout_s}s:\n{server.log_tail()}")
        time.sleep(0.1)


@contextmanager
def running_prometheus(
    targets: Sequence[str],
    workdir: Path,
    *,
    scrape_interval: str = "1s",
    startup_timeout_s: float = 30.0,
) -> Iterator[PrometheusServer]:
    """Run Prometheus scraping ``targets`` ("host:port", path /metrics) until the block ends."""
    binary = prometheus_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    config.write_text(_config(targets, scrape_interval))
    storage = workdir / "data"
    log = workdir / "prometheus.log"
    # A port picked free can be taken before Prometheus binds it: only that start is retried.
    for _ in range(3):
        port = free_port()
        with log.open("wb") as log_file:
            process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={storage}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=workdir,
            )
        server = PrometheusServer(f"http://127.0.0.1:{port}", process, log)
        if _wait_ready(server, startup_timeout_s):
            break
    else:
        raise RuntimeError(f"Prometheus could not bind a free port in 3 tries:\n{server.log_tail()}")
    try:
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
