"""examples/quickstart/query.py's wait for the ModelDeployment, with `kubetune get` replaced by a fake."""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil
import pytest

QUERY = Path(__file__).resolve().parents[3] / "examples" / "quickstart" / "query.py"


@pytest.fixture
def query() -> ModuleType:
    spec = importlib.util.spec_from_file_location("quickstart_query", QUERY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _deployment(ready: str, endpoint: str | None) -> dict[str, Any]:
    status: dict[str, Any] = {"conditions": [{"type": "Ready", "status": ready, "reason": "Why"}]}
    if endpoint:
        status["endpoint"] = endpoint
    return {"status": status}


def _fake_get(monkeypatch: pytest.MonkeyPatch, query: ModuleType, obj: dict[str, Any]) -> None:
    def kubetune(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(args, 0, stdout=json.dumps(obj), stderr="")

    monkeypatch.setattr(query, "kubetune", kubetune)


def _limit_polls(monkeypatch: pytest.MonkeyPatch, polls: int) -> None:
    count = [0]

    def sleep(_: float) -> None:
        count[0] += 1
        if count[0] > polls:
            raise AssertionError(f"still waiting after {polls} polls")

    monkeypatch.setattr(time, "sleep", sleep)


def test_a_ready_status_whose_endpoint_does_not_answer_is_not_ready(
    query: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a `kubetune up` killed outright left in the store, read before the new `up` corrects it.
    endpoint = f"http://127.0.0.1:{_closed_port()}/v1"
    _fake_get(monkeypatch, query, _deployment("True", endpoint))
    _limit_polls(monkeypatch, 2)
    with pytest.raises(AssertionError, match="still waiting"):
        query.wait_until_ready("router", "default", timeout_s=60, up_pid=None)


def test_it_stops_waiting_when_up_has_exited_but_is_not_reaped_yet(
    query: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 10
        while psutil.Process(exited.pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        _fake_get(monkeypatch, query, _deployment("False", None))
        _limit_polls(monkeypatch, 2)
        with pytest.raises(SystemExit, match=f"kubetune up \\(pid {exited.pid}\\) stopped"):
            query.wait_until_ready("router", "default", timeout_s=60, up_pid=exited.pid)
    finally:
        exited.wait()
