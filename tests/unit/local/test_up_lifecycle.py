"""`kubetune up`'s start and stop around the reconcile loop, with the loop replaced by a fake."""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, TextIO

import pytest

from kubetune.config import OperatorConfig
from kubetune.local import up as up_module
from kubetune.local.serving import LocalServing
from kubetune.local.session import StopSignals, UpLock
from kubetune.local.store import LocalStore
from kubetune.reconcile.deployment import DeploymentOutcome, DeploymentRef
from kubetune.reconcile.jobs import Backends

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


STALLED_STATUS = {
    "phase": "Failed",
    "versions": [{"name": "tuned", "weight": 0, "ready": False, "message": "build failed"}],
    "conditions": [
        {"type": "Ready", "status": "False", "reason": "ModelInvalid", "message": "version tuned: no model"},
        {"type": "Stalled", "status": "True", "reason": "ModelInvalid", "message": "version tuned: no model"},
    ],
}


def test_up_exits_with_a_reason_when_no_deployment_can_be_served_and_no_job_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore(tmp_path)
    store.apply("modeldeployments", DEPLOYMENT, immutable_spec=False)
    passes: list[str] = []

    async def stalled_pass(obj: dict[str, Any], **_: Any) -> DeploymentOutcome:
        passes.append(obj["metadata"]["name"])
        assert len(passes) < 5, "up kept waiting for a deployment that cannot be served"
        return DeploymentOutcome(status=STALLED_STATUS, requeue_after=None)

    monkeypatch.setattr(up_module, "reconcile_deployment", stalled_pass)
    out = io.StringIO()
    assert up_module.up([], OperatorConfig(home=tmp_path), out=out, poll_s=0.01) == 1
    assert passes == ["router"]
    assert (
        "nothing left that can make progress: every job ended and no ModelDeployment can be served\n"
        "  modeldeployment/router is stalled (ModelInvalid: version tuned: no model)\n"
    ) in out.getvalue()


def test_up_keeps_serving_a_stalled_deployment_whose_stable_version_answers(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    obj = store.apply("modeldeployments", DEPLOYMENT, immutable_spec=False).obj
    rolled_back = {
        **STALLED_STATUS,
        "versions": [{"name": "tuned", "weight": 100, "ready": True}, {"name": "canary", "ready": False}],
    }
    store.update_status("modeldeployments", obj, rolled_back)
    assert [o["metadata"]["name"] for o in up_module.deployments_left_to_serve(store)] == ["router"]


def test_up_with_a_quantizejob_whose_finetunejob_does_not_exist_ends_after_the_grace_period(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    manifest = tmp_path / "qj.yaml"
    manifest.write_text(
        "apiVersion: kubetune.dev/v1alpha1\n"
        "kind: QuantizeJob\n"
        "metadata: {name: router-int8}\n"
        "spec:\n"
        "  model: {fineTuneJobRef: {name: router}}\n"
        "  method: {type: int8-weight-only}\n"
    )
    out = io.StringIO()
    settings = OperatorConfig(home=tmp_path / "home", missing_reference_grace_s=0)
    assert up_module.up([manifest], settings, out=out, poll_s=0.01) == 1
    job = LocalStore(settings.home).get("quantizejobs", "router-int8") or {}
    succeeded = next(c for c in job["status"]["conditions"] if c["type"] == "Succeeded")
    assert (succeeded["status"], succeeded["reason"]) == ("False", "SourceNotFound")
    assert "quantizejob/router-int8  Failed" in out.getvalue()
    assert "FineTuneJob/router does not exist in namespace default" in out.getvalue()


# -- hand-off between `kubetune up` processes --------------------------------------------------------


def _deployment_file(tmp_path: Path) -> Path:
    path = tmp_path / "router.yaml"
    path.write_text(
        "apiVersion: kubetune.dev/v1alpha1\n"
        "kind: ModelDeployment\n"
        "metadata: {name: router}\n"
        "spec:\n"
        "  versions: [{name: tuned, model: {uri: /models/tuned}, weight: 100}]\n"
    )
    return path


def test_up_f_waits_for_the_running_up_to_take_the_change_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = UpLock(tmp_path)
    assert running.acquire() is None
    store = LocalStore(tmp_path)

    def running_up_pass() -> None:  # the running `up` sees the new generation in its next pass
        time.sleep(0.3)
        obj = store.get("modeldeployments", "router") or {}
        store.update_status("modeldeployments", obj, {"observedGeneration": obj["metadata"]["generation"]})

    monkeypatch.setattr(up_module, "_run", lambda *_: pytest.fail("the running up took the change"))
    passing = threading.Thread(target=running_up_pass)
    passing.start()
    out = io.StringIO()
    started = time.monotonic()
    try:
        assert up_module.up([_deployment_file(tmp_path)], OperatorConfig(home=tmp_path), out=out) == 0
    finally:
        passing.join()
        running.release()
    assert time.monotonic() - started >= 0.3
    assert (
        f"kubetune up (pid {os.getpid()}) is running with {tmp_path}: it applies the change" in out.getvalue()
    )


def test_up_f_sent_while_the_running_up_stops_runs_the_change_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The running `up` is stopping: it takes nothing new up and lets its lock go.
    running = UpLock(tmp_path)
    assert running.acquire() is None
    stopping = threading.Timer(0.3, running.release)
    ran: list[dict[str, Any] | None] = []

    def new_up_runs(store: LocalStore, *_: Any) -> int:
        ran.append(store.get("modeldeployments", "router"))
        return 0

    monkeypatch.setattr(up_module, "_run", new_up_runs)
    stopping.start()
    out = io.StringIO()
    try:
        assert up_module.up([_deployment_file(tmp_path)], OperatorConfig(home=tmp_path), out=out) == 0
    finally:
        stopping.join()
    assert len(ran) == 1 and ran[0] is not None
    assert "it applies the change" not in out.getvalue()
    assert "stopped before it took the change: this one runs it" in out.getvalue()
    assert UpLock(tmp_path).acquire() is None  # the new `up` let the lock go when it was done


def test_a_stopping_up_takes_up_no_job_applied_since_its_last_pass(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.apply(
        "quantizejobs",
        {
            "apiVersion": "kubetune.dev/v1alpha1",
            "kind": "QuantizeJob",
            "metadata": {"name": "router-int8"},
            "spec": {"model": {"fineTuneJobRef": {"name": "router"}}, "method": {"type": "int8-weight-only"}},
        },
        immutable_spec=True,
    )
    backends = Backends(OperatorConfig(home=tmp_path))
    progress = up_module.Progress()
    out = io.StringIO()
    assert up_module.reconcile_jobs(store, backends, tmp_path, out, progress, stopping=lambda: True) is False
    assert "status" not in (store.get("quantizejobs", "router-int8") or {})
    assert up_module.reconcile_jobs(store, backends, tmp_path, out, progress, stopping=lambda: False) is True
    assert (store.get("quantizejobs", "router-int8") or {})["status"]["observedGeneration"] == 1
