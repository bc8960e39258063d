"""Run pipelines on this machine with kfp's local runner, one detached worker process per run.

Each run lives in ``<root>/<key>/``: ``request.json`` (what to run), ``state.json`` (phase, worker pid,
attempt) and the worker logs. Workers are started in their own session, so they outlive the process
that started them: an operator restart re-attaches to a running worker instead of starting a second
run. A worker that died (killed pod, Ctrl+C, reboot) shows as ``Interrupted``; ``resume`` starts a new
attempt of the same run, whose steps pick up from their checkpoints in the workspace. A worker killed
outright (SIGKILL) leaves the step it ran behind; that step is stopped before the run reads as
``Interrupted``, so a resumed attempt never runs beside it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import psutil

from kubetune.common.clock import utc_now
from kubetune.common.files import read_json, write_json_atomically
from kubetune.common.supervision import KILL_WAIT_S, create_time, process_alive, stop_process_group, wait_gone
from kubetune.plan.runs import RunRequest, RunStatus

STATE_FILE = "state.json"
REQUEST_FILE = "request.json"
ORPHAN_GRACE_S = 20.0  # as for a worker: SIGTERM lets a training step save its progress first


def orphaned_group(group_id: int | None) -> list[psutil.Process]:
    """The processes left in the process group of a worker that is gone (its steps, once it was
    SIGKILLed). The kernel reuses no pid while a group of that id has members, so when no process has
    the pid, every member of the group is the dead worker's; when one has it, the group is someone else's
    (or the worker still runs) and none is returned."""
    if not group_id or psutil.pid_exists(group_id):
        return []
    members = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(process.pid) == group_id:
                members.append(process)
    return members


def stop_orphaned_group(group_id: int | None, grace_s: float) -> None:
    """SIGTERM what is left of a dead worker's process group, SIGKILL it after ``grace_s``."""
    members = orphaned_group(group_id)
    for process in members:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    for process in wait_gone(members, grace_s):
        with contextlib.suppress(psutil.Error):
            process.kill()
    wait_gone(members, KILL_WAIT_S)


class LocalBackend:
    name: Literal["local"] = "local"

    def __init__(self, root: Path, *, extra_env: dict[str, str] | None = None) -> None:
        self.root = root
        self.extra_env = extra_env or {}
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    def run_dir(self, key: str) -> Path:
        return self.root / key

    def find(self, key: str, namespace: str | None = None) -> RunStatus | None:
        """The run under `key` (its directory; `namespace` plays no part: the key names the resource)."""
        state = read_json(self.run_dir(key) / STATE_FILE)
        if state is None:
            return None
        child = self._children.get(key)
        if child is not None:
            child.poll()  # reap, so an exited worker is not mistaken for a live zombie
        phase = state.get("phase", "Pending")
        if phase in ("Pending", "Running") and not process_alive(state.get("pid"), state.get("pidStartedAt")):
            # The worker wrote no final phase before it went away.
            state = read_json(self.run_dir(key) / STATE_FILE) or state
            phase = state.get("phase", "Pending")
            if phase in ("Pending", "Running"):
                phase = "Interrupted"
                state["message"] = "the local worker process stopped before the run finished"
                # A worker killed outright leaves its step running; nothing of an interrupted run may
                # run on beside the attempt that resumes it.
                stop_orphaned_group(state.get("pid"), ORPHAN_GRACE_S)
        return RunStatus(
            backend="local",
            id=key,
            phase=phase,
            message=str(state.get("message", "")),
            reason=str(state.get("reason", "")),
            url=str(self.run_dir(key)),
            attempt=int(state.get("attempt", 1)),
        )

    def submit(self, request: RunRequest) -> RunStatus:
        existing = self.find(request.key)
        if existing is not None:
            return existing
        run_dir = self.run_dir(request.key)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomically(run_dir / REQUEST_FILE, asdict(request))
        return self._start(request.key, attempt=1)

    def resume(self, key: str, namespace: str | None = None) -> RunStatus:
        current = self.find(key)
        if current is None:
            raise KeyError(f"no local run {key}")
        if current.phase != "Interrupted":
            return current
        return self._start(key, attempt=current.attempt + 1)

    def cancel(self, key: str, namespace: str | None = None) -> None:
        state = read_json(self.run_dir(key) / STATE_FILE)
        if state is None or state.get("phase") in ("Succeeded", "Failed", "Cancelled"):
            return
        self._stop_worker(key, state)
        state.update(phase="Cancelled", message="cancelled", finishedAt=utc_now())
        write_json_atomically(self.run_dir(key) / STATE_FILE, state)

    def interrupt_all(self) -> list[str]:
        """Stop every worker this process started (Ctrl+C in `kubetune up`); they can be resumed."""
        stopped = []
        for key in list(self._children):
            state = read_json(self.run_dir(key) / STATE_FILE)
            if state is None or state.get("phase") not in ("Pending", "Running"):
                continue
            self._stop_worker(key, state)
            state.update(phase="Interrupted", message="stopped by the user; `kubetune up` resumes it")
            write_json_atomically(self.run_dir(key) / STATE_FILE, state)
            stopped.append(key)
        return stopped

    def _stop_worker(self, key: str, state: dict[str, Any], grace_s: float = 20.0) -> None:
        # SIGTERM lets the training step write a checkpoint before it exits.
        stop_process_group(state.get("pid"), state.get("pidStartedAt"), grace_s)
        stop_orphaned_group(state.get("pid"), grace_s)
        child = self._children.pop(key, None)
        if child is not None:
            child.wait(timeout=5)

    def _start(self, key: str, attempt: int) -> RunStatus:
        run_dir = self.run_dir(key)
        log = (run_dir / f"worker-{attempt}.log").open("ab")
        env = {**os.environ, **self.extra_env, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "kubetune.backends.local_worker", str(run_dir), str(attempt)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
        log.close()
        self._children[key] = proc
        state = {
            "phase": "Pending",
            "attempt": attempt,
            "pid": proc.pid,
            "pidStartedAt": create_time(proc.pid),
            "submittedAt": utc_now(),
            "message": "",
        }
        write_json_atomically(run_dir / STATE_FILE, state)
        return RunStatus(backend="local", id=key, phase="Pending", url=str(run_dir), attempt=attempt)
