"""What a killed `kubetune up` left in the store is corrected by the next command that reads it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kubetune.cli import main as cli_main
from kubetune.local.liveness import settle_after_dead_up
from kubetune.local.session import UpLock
from kubetune.local.store import LocalStore

DEPLOYMENT = {
    "apiVersion": "kubetune.dev/v1alpha1",
    "kind": "ModelDeployment",
    "metadata": {"name": "router"},
    "spec": {"versions": [{"name": "tuned", "model": {"uri": "/models/tuned"}, "weight": 100}]},
}
SERVED = {
    "phase": "Ready",
    "endpoint": "http://127.0.0.1:45678/v1",
    "readyVersions": "1/1",
    "versions": [{"name": "tuned", "weight": 100, "ready": True, "url": "http://127.0.0.1:45679"}],
    "conditions": [{"type": "Ready", "status": "True", "reason": "AllVersionsReady", "message": "serving"}],
}
FINETUNE = {
    "apiVersion": "kubetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "router-lora"},
    "spec": {"baseModel": {"uri": "/models/base"}, "dataset": {"uri": "/data/train.jsonl"}},
}
RUN_KEY = "ftj-default-router-lora-g1-abcdef12"
RUNNING = {
    "phase": "Running",
    "pipelineRun": {"backend": "local", "id": RUN_KEY, "name": RUN_KEY, "generation": 1},
    "conditions": [{"type": "Succeeded", "status": "Unknown", "reason": "Running", "message": "training"}],
}


def exited_pid() -> int:
    """The pid of a process that has exited (what a killed `up` wrote into its lock file)."""
    process = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    return int(process.stdout)


def killed_up(home: Path) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "up.lock").write_text(f"{exited_pid()} 1.0\n")


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    assert obj is not None
    return next(c for c in obj["status"]["conditions"] if c["type"] == type_)


def stored(tmp_path: Path) -> LocalStore:
    store = LocalStore(tmp_path)
    deployment = store.apply("modeldeployments", DEPLOYMENT, immutable_spec=False).obj
    store.update_status("modeldeployments", deployment, SERVED)
    job = store.apply("finetunejobs", FINETUNE, immutable_spec=True).obj
    store.update_status("finetunejobs", job, RUNNING)
    run_dir = tmp_path / "local-runs" / RUN_KEY
    run_dir.mkdir(parents=True)
    (run_dir / "state.json").write_text(json.dumps({"phase": "Running", "pid": exited_pid(), "attempt": 1}))
    return store


def test_after_a_killed_up_nothing_reads_ready_or_running(tmp_path: Path) -> None:
    store = stored(tmp_path)
    killed_up(tmp_path)
    settle_after_dead_up(store, tmp_path)

    deployment = store.get("modeldeployments", "router")
    ready = condition(deployment, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "NotServed")
    assert ready["message"] == "the kubetune up that served it is gone; run `kubetune up` to serve it again"
    assert deployment is not None and "endpoint" not in deployment["status"]
    assert deployment["status"]["phase"] == "Stopped" and deployment["status"]["readyVersions"] == "0/1"

    job = store.get("finetunejobs", "router-lora")
    succeeded = condition(job, "Succeeded")
    assert (succeeded["status"], succeeded["reason"]) == ("Unknown", "Interrupted")
    assert succeeded["message"] == (
        "the local worker process stopped before the run finished; the kubetune up that ran it is gone: "
        "run `kubetune up` to resume it"
    )
    assert job is not None and job["status"]["phase"] == "Interrupted"


def test_while_an_up_runs_its_statuses_are_left_as_they_are(tmp_path: Path) -> None:
    store = stored(tmp_path)
    running = UpLock(tmp_path)
    assert running.acquire() is None
    try:
        assert running.live_holder() == os.getpid()
        settle_after_dead_up(store, tmp_path)
    finally:
        running.release()
    assert condition(store.get("modeldeployments", "router"), "Ready")["reason"] == "AllVersionsReady"
    assert condition(store.get("finetunejobs", "router-lora"), "Succeeded")["reason"] == "Running"


def test_a_pid_reused_by_another_process_is_not_taken_for_the_up(tmp_path: Path) -> None:
    # The killed `up` wrote its pid and start time; a process now running with that pid started later.
    (tmp_path / "up.lock").write_text(f"{os.getpid()} 1.0\n")
    assert UpLock(tmp_path).live_holder() is None


def test_kubetune_get_after_a_killed_up_shows_it_not_served(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stored(tmp_path)
    killed_up(tmp_path)

    with pytest.raises(SystemExit) as exit_:
        cli_main(["--home", str(tmp_path), "get", "mdep", "router", "-o", "json"])

    assert exit_.value.code in (0, None)
    shown = json.loads(capsys.readouterr().out)
    ready = condition(shown, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "NotServed")
