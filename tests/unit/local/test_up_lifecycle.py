"""`kubetune up`'s start and stop around the reconcile loop, with the loop replaced by a fake."""

from __future__ import annotations

import io
import os
import signal
from pathlib import Path
from typing import Any, TextIO

import pytest

from kubetune.config import OperatorConfig
from kubetune.local import up as up_module
from kubetune.local.serving import LocalServing
from kubetune.local.session import StopSignals
from kubetune.local.store import LocalStore
from kubetune.reconcile.deployment import DeploymentRef

DEPLOYMENT = {
    "apiVersion": "kubetune.dev/v1alpha1",
    "kind": "ModelDeployment",
    "metadata": {"name": "router"},
    "spec": {"versions": [{"name": "tuned", "model": {"uri": "/models/tuned"}, "weight": 100}]},
}
SERVED_STATUS = {
    "phase": "Running",
    "endpoint": "http://127.0.0.1:45678/v1",
    "readyVersions": "1/1",
    "versions": [{"name": "tuned", "weight": 100, "ready": True, "url": "http://127.0.0.1:45679"}],
    "conditions": [
        {"type": "Ready", "status": "True", "reason": "AllVersionsReady", "message": "1/1 versions ready"}
    ],
}


def _ready(obj: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in obj["status"]["conditions"] if c["type"] == "Ready")


def test_a_new_up_marks_what_a_killed_up_served_not_served_before_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A `kubetune up` killed outright leaves Ready=True and its endpoint in the store. The next `up`
    # holds the lock, so nothing serves that endpoint any more: `kubetune get` and query.py (started
    # with `up` by `make quickstart`) must not see it Ready while the new `up` starts.
    store = LocalStore(tmp_path)
    obj = store.apply("modeldeployments", DEPLOYMENT, immutable_spec=False).obj
    store.update_status("modeldeployments", obj, SERVED_STATUS)
    seen: dict[str, Any] = {}

    def fake_loop(store: LocalStore, *_: Any, **__: Any) -> int:
        seen.update(store.get("modeldeployments", "router") or {})
        return 0

    monkeypatch.setattr(up_module, "run_until_stopped", fake_loop)
    assert up_module.up([], OperatorConfig(home=tmp_path), out=io.StringIO()) == 0
    assert (_ready(seen)["status"], _ready(seen)["reason"]) == ("False", "NotServed")
    assert "endpoint" not in seen["status"]
    assert [v["url"] for v in seen["status"]["versions"]] == [None]


class _InterruptingLocalBackend:
    """Its interrupt_all is where a third Ctrl+C lands."""

    def interrupt_all(self) -> list[str]:
        os.kill(os.getpid(), signal.SIGINT)
        return ["run-1"]


class _Backends:
    def __init__(self, _settings: OperatorConfig) -> None:
        pass

    def local(self) -> _InterruptingLocalBackend:
        return _InterruptingLocalBackend()


def test_ctrl_c_while_up_stops_at_once_still_stops_everything_and_exits_130(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def second_ctrl_c(*_: Any, stop: StopSignals, **__: Any) -> int:
        stop.received = signal.SIGINT
        raise KeyboardInterrupt

    closed: list[bool] = []

    def close(_: LocalServing) -> list[str]:
        closed.append(True)
        return []

    monkeypatch.setattr(up_module, "run_until_stopped", second_ctrl_c)
    monkeypatch.setattr(up_module, "Backends", _Backends)
    monkeypatch.setattr(LocalServing, "close", close)
    out = io.StringIO()
    assert up_module.up([], OperatorConfig(home=tmp_path), out=out) == 130
    assert closed == [True]
    assert "stopped 1 running pipeline(s)" in out.getvalue()


class _ClosedTerminal(io.StringIO):
    """stdout after the terminal window was closed (SIGHUP): every write fails with EIO."""

    def write(self, _: str) -> int:
        raise OSError(5, "Input/output error")


def test_up_stops_and_says_not_served_when_its_terminal_is_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore(tmp_path)
    obj = store.apply("modeldeployments", DEPLOYMENT, immutable_spec=False).obj

    def hangup_while_serving(store: LocalStore, *_: Any, out: TextIO, stop: StopSignals, **__: Any) -> int:
        store.update_status("modeldeployments", obj, SERVED_STATUS)
        stop.received = signal.SIGHUP
        print("SIGHUP: stopping", file=out, flush=True)
        return 0

    closed: list[bool] = []

    def close(_: LocalServing) -> list[str]:
        closed.append(True)
        return ["the gateway of modeldeployment/router (pid 1, log gateway.log)"]

    monkeypatch.setattr(up_module, "run_until_stopped", hangup_while_serving)
    monkeypatch.setattr(LocalServing, "close", close)
    monkeypatch.setattr(
        LocalServing,
        "deployments",
        lambda self: [DeploymentRef(name="router", namespace="default")],
    )
    assert up_module.up([], OperatorConfig(home=tmp_path), out=_ClosedTerminal()) == 0
    assert closed == [True]
    assert _ready(store.get("modeldeployments", "router") or {})["reason"] == "NotServed"
