"""The local backend's process handling: exactly-once, restart, interrupt and resume, cancel, failure.

The pipeline here is the real kfp pipeline run by kfp's local runner in a detached worker; only the
step code is swapped for fast stand-ins (tests/integration/fake_steps) so the timing is controllable.
The real steps run in tests/e2e.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kubetune.api.validation import parse_resource
from kubetune.backends.local import LocalBackend
from kubetune.common.files import read_json
from kubetune.common.supervision import process_alive
from kubetune.config import OperatorConfig
from kubetune.plan.finetune import build_request
from kubetune.plan.runs import RunRequest, RunStatus
from kubetune_contract.finetune import FineTuneJob

FAKE_STEPS = Path(__file__).parent / "fake_steps"


def make_backend(root: Path, **env: str) -> LocalBackend:
    pythonpath = os.pathsep.join(p for p in (str(FAKE_STEPS), os.environ.get("PYTHONPATH", "")) if p)
    return LocalBackend(root, extra_env={"PYTHONPATH": pythonpath, **env})


@pytest.fixture
def request_(tmp_path: Path) -> RunRequest:
    body = {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "tune", "namespace": "default", "uid": "0f0f0f0f-1", "generation": 1},
        "spec": {"baseModel": {"uri": "m"}, "dataset": {"uri": "d.jsonl"}, "executor": "local"},
    }
    return build_request(parse_resource(body, FineTuneJob), OperatorConfig(home=tmp_path), base_dir=tmp_path)


def wait_until(
    backend: LocalBackend, key: str, done: Callable[[RunStatus], bool], timeout: float = 90
) -> RunStatus:
    deadline = time.monotonic() + timeout
    status = backend.find(key)
    while time.monotonic() < deadline:
        status = backend.find(key)
        if status is not None and done(status):
            return status
        time.sleep(0.1)
    raise AssertionError(f"run {key} did not get there in {timeout}s; last status {status}")


def starts(request: RunRequest) -> list[str]:
    return (Path(request.workspace) / "starts.log").read_text().split()


def training_step(request: RunRequest) -> int:
    progress = read_json(Path(request.workspace) / "progress.json")
    return int(progress["step"]) if progress else 0


def test_a_run_completes_and_is_never_submitted_twice(tmp_path: Path, request_: RunRequest) -> None:
    backend = make_backend(tmp_path / "runs")
    assert backend.find(request_.key) is None
    backend.submit(request_)
    final = wait_until(backend, request_.key, lambda s: s.finished)
    assert final.phase == "Succeeded", (tmp_path / "runs" / request_.key / "worker-1.log").read_text()
    # A second control plane (an operator restart) and a repeated submit find the same run.
    again = make_backend(tmp_path / "runs").submit(request_)
    assert (again.id, again.phase) == (final.id, "Succeeded")
    # evaluate-baseline and finetune may run in either order; each step ran once.
    assert sorted(starts(request_)) == ["curate", "evaluate", "evaluate", "finetune", "publish"]
    assert starts(request_)[0] == "curate" and starts(request_)[-1] == "publish"


def test_restart_reattaches_to_a_running_worker_then_cancel_stops_it(
    tmp_path: Path, request_: RunRequest
) -> None:
    backend = make_backend(tmp_path / "runs", FAKE_STEP_S="0.3", FAKE_STEPS="200")
    backend.submit(request_)
    wait_until(backend, request_.key, lambda s: training_step(request_) >= 2)
    restarted = make_backend(tmp_path / "runs", FAKE_STEP_S="0.3", FAKE_STEPS="200")
    assert restarted.find(request_.key).phase == "Running"  # type: ignore[union-attr]
    restarted.submit(request_)
    assert starts(request_).count("finetune") == 1
    state = read_json(tmp_path / "runs" / request_.key / "state.json")
    assert state is not None
    restarted.cancel(request_.key)
    assert restarted.find(request_.key).phase == "Cancelled"  # type: ignore[union-attr]
    assert not process_alive(state["pid"], state["pidStartedAt"])


def test_interrupted_run_resumes_where_it_stopped(tmp_path: Path, request_: RunRequest) -> None:
    backend = make_backend(tmp_path / "runs", FAKE_STEP_S="0.2", FAKE_STEPS="25")
    backend.submit(request_)
    wait_until(backend, request_.key, lambda s: training_step(request_) >= 3)
    assert backend.interrupt_all() == [request_.key]
    interrupted = backend.find(request_.key)
    assert interrupted is not None and interrupted.phase == "Interrupted"
    stopped_at = training_step(request_)
    resumed = make_backend(tmp_path / "runs", FAKE_STEP_S="0.01", FAKE_STEPS="25").resume(request_.key)
    assert resumed.attempt == 2
    final = wait_until(backend, request_.key, lambda s: s.finished)
    assert final.phase == "Succeeded"
    assert stopped_at < 25 and training_step(request_) == 25


def test_a_worker_killed_outright_reads_as_interrupted(tmp_path: Path, request_: RunRequest) -> None:
    backend = make_backend(tmp_path / "runs", FAKE_STEP_S="0.3", FAKE_STEPS="200")
    backend.submit(request_)
    wait_until(backend, request_.key, lambda s: training_step(request_) >= 1)
    state = read_json(tmp_path / "runs" / request_.key / "state.json")
    assert state is not None
    os.killpg(state["pid"], 9)
    status = wait_until(backend, request_.key, lambda s: s.phase != "Running", timeout=10)
    assert status.phase == "Interrupted"


def test_a_failed_step_reports_its_reason(tmp_path: Path, request_: RunRequest) -> None:
    backend = make_backend(tmp_path / "runs", FAKE_FAIL_STEP="publish")
    backend.submit(request_)
    final = wait_until(backend, request_.key, lambda s: s.finished)
    assert (final.phase, final.reason) == ("Failed", "QualityGateFailed")
    assert "exactMatch 0.1 < 0.5" in final.message
