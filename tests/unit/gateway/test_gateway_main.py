"""``python -m kubetune.gateway`` as the CLI and a local deployment start it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
from gateway_doubles import StubModelServer, base_config, chat_body

from asgi_server import free_port


def test_bad_config_exits_with_the_field_named(tmp_path: Path) -> None:
    path = tmp_path / "gateway.json"
    path.write_text(
        json.dumps({"deployment": "d", "versions": [{"name": "a", "url": "http://x:1", "weight": 0}]})
    )
    result = subprocess.run(
        [sys.executable, "-m", "kubetune.gateway", "--config", str(path), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert f"error: {path}: " in result.stderr
    assert "at least one version needs a weight above 0" in result.stderr


def test_serves_on_the_given_port(tmp_path: Path, stubs: dict[str, StubModelServer]) -> None:
    path = tmp_path / "gateway.json"
    path.write_text(json.dumps(base_config(stubs)))
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kubetune.gateway",
            "--config",
            str(path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                health = httpx.get(f"{url}/healthz", timeout=1)
                break
            except httpx.TransportError:
                assert process.poll() is None, process.stdout.read() if process.stdout else ""
                assert time.monotonic() < deadline, "the gateway did not come up"
                time.sleep(0.1)
        assert health.json()["deployment"] == "support-bot"
        answer = httpx.post(f"{url}/v1/chat/completions", json=chat_body(user="x"), timeout=10)
        assert answer.status_code == 200
        assert answer.headers["x-kubetune-version"] in {"alpha", "beta"}
    finally:
        process.terminate()
        process.wait(timeout=10)
