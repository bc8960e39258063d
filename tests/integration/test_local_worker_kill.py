"""A local run's worker SIGKILLed mid-step: the run resumes once, or fails clearly, and never runs twice.

The worker (backends/local_worker.py) runs the real kfp pipeline with kfp's local runner; each step is a
child process in the worker's process group. SIGKILL to the worker alone (the OOM killer picks one
process) leaves that step running. Reconcile passes (the code the operator's timers and ``kubetune up``
run) must then stop the leftover step before a second attempt starts, resume training from its
checkpoint, and give up with a reason once the attempts are spent. The steps are the fast stand-ins of
tests/integration/fake_steps.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from kubetune.common.files import read_json
from kubetune.config import OperatorConfig
from kubetune.plan.lifecycle import Decision
from kubetune.reconcile.jobs import Backends, reconcile_finetune

FAKE_STEPS = Path(__file__).parent / "fake_steps"
TOTAL_STEPS = 30
PASS_TIMEOUT_S = 120.0  # a loaded 2-core machine starts kfp's runner slowly


@pytest.fixture
def backends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Backends:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(FAKE_STEPS), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FAKE_STEP_S", "0.2")
    monkeypatch.setenv("FAKE_STEPS", str(TOTAL_STEPS))
    return Backends(OperatorConfig(home=tmp_path, max_run_attempts=2))


def finetunejob() -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "tune", "namespace": "default", "uid": "5eed0000-1", "generation": 1},
        "spec": {"baseModel": {"uri": "m"}, "dataset": {"uri": "d.jsonl"}, "executor": "local"},
    }


class Passes:
    """Reconcile passes over one job, its status written back as the operator writes it."""

    def __init__(self, backends: Backends, base_dir: Path) -> None:
        self.backends = backends
        self.base_dir = base_dir
        self.body = finetunejob()
        self.decisions: list[Decision] = []

    def once(self) -> Decision:
        decision = reconcile_finetune(self.body, self.backends, base_dir=self.base_dir)
        self.body["status"] = {**(self.body.get("status") or {}), **decision.status}
        self.decisions.append(decision)
        return decision

    def until(self, what: str, holds: Any) -> None:
        deadline = time.monotonic() + PASS_TIMEOUT_S
        while not holds():
            assert time.monotonic() < deadline, (
                f"no {what} after {PASS_TIMEOUT_S:.0f}s: {self.body['status']}"
            )
            self.once()
            time.sleep(0.2)

    @property
    def run_dir(self) -> Path:
        return Path(self.body["status"]["pipelineRun"]["url"])

    @property
    def workspace(self) -> Path:
        return Path(json.loads((self.run_dir / "request.json").read_text())["workspace"])

    def state(self) -> dict[str, Any]:
        state = read_json(self.run_dir / "state.json")
        assert state is not None
        return state

    def training_step(self) -> int:
        progress = read_json(self.workspace / "progress.json")
        return int(progress["step"]) if progress else 0

    def starts(self) -> list[str]:
        return (self.workspace / "starts.log").read_text().split()


def succeeded_condition(status: dict[str, Any]) -> dict[str, Any]:
    (condition,) = [c for c in status["conditions"] if c["type"] == "Succeeded"]
    found: dict[str, Any] = condition
    return found


def still_running(processes: list[psutil.Process]) -> list[int]:
    return [p.pid for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def kill_worker_mid_training(passes: Passes) -> list[psutil.Process]:
    """SIGKILL the worker alone once this attempt's training is under way (two steps past where it
    began); the step processes it leaves behind."""
    past = passes.training_step() + 2
    passes.until("training", lambda: passes.training_step() >= past)
    worker = psutil.Process(passes.state()["pid"])
    steps: list[psutil.Process] = worker.children(recursive=True)
    assert steps, "the worker runs its step as a child process"
    os.kill(worker.pid, signal.SIGKILL)
    psutil.wait_procs([worker], timeout=10)
    return steps


def test_a_killed_worker_is_resumed_once_and_its_step_never_runs_beside_the_new_attempt(
    backends: Backends, tmp_path: Path
) -> None:
    passes = Passes(backends, tmp_path)
    passes.until("run", lambda: "pipelineRun" in (passes.body.get("status") or {}))
    left_behind = kill_worker_mid_training(passes)
    stopped_at = passes.training_step()

    passes.until("resume", lambda: passes.decisions[-1].action == "resume")
    # By the time the second attempt starts, nothing of the first runs.
    assert still_running(left_behind) == []
    assert passes.state()["attempt"] == 2
    (resuming,) = passes.decisions[-1].events
    assert (resuming.reason, resuming.message) == (
        "Resuming",
        "the local worker process stopped before the run finished; resuming from the last checkpoint "
        "(attempt 2)",
    )

    passes.until("end", lambda: passes.body["status"]["phase"] in ("Succeeded", "Failed"))
    assert passes.body["status"]["phase"] == "Succeeded", passes.body["status"]
    assert [d.action for d in passes.decisions].count("resume") == 1
    assert [d.action for d in passes.decisions].count("submit") == 1
    # One finetune start per attempt, and the second picked up where the first stopped.
    assert passes.starts().count("finetune") == 2 and passes.starts().count("publish") == 1
    assert 2 <= stopped_at < TOTAL_STEPS and passes.training_step() == TOTAL_STEPS
    assert passes.body["status"]["progress"]["step"] == TOTAL_STEPS


def test_a_worker_killed_on_every_attempt_fails_the_job_with_the_reason(
    backends: Backends, tmp_path: Path
) -> None:
    passes = Passes(backends, tmp_path)
    passes.until("run", lambda: "pipelineRun" in (passes.body.get("status") or {}))
    left_behind = kill_worker_mid_training(passes)
    passes.until("resume", lambda: passes.decisions[-1].action == "resume")
    left_behind += kill_worker_mid_training(passes)

    passes.until("end", lambda: passes.body["status"]["phase"] in ("Succeeded", "Failed"))
    succeeded = succeeded_condition(passes.body["status"])
    assert (passes.body["status"]["phase"], succeeded["reason"]) == ("Failed", "BackoffLimitExceeded")
    assert "the local worker process stopped before the run finished" in succeeded["message"]
    assert "gave up after 2 attempts" in succeeded["message"]
    assert still_running(left_behind) == []
    # Further passes leave a failed job alone.
    passes.once()
    assert passes.decisions[-1].action == "none" and passes.state()["attempt"] == 2
