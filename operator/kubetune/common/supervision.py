"""Supervision of child processes, shared by local serving and the local pipeline backend.

- :class:`ManagedProcess` starts a command in its own session (its own process group) with its
  output in a log file, optionally dying with its parent (``PR_SET_PDEATHSIG``), and remembers the
  descendants it was seen to have.
- :func:`stop_processes`, :func:`stop_process_group` and :func:`stop_recorded` stop with SIGTERM,
  wait with psutil's ``wait_procs`` (:func:`wait_gone`), then SIGKILL whatever is left.
- :func:`process_alive` tells whether a recorded pid still names the same process (its start time
  guards against pid reuse).
- :class:`Backoff` with :data:`RESTART_BACKOFF` is the one policy for trying again what keeps
  failing: 1 s, doubling, capped at 60 s, and afresh once the thing stayed up for a minute.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from kubetune.common.clock import utc_now

STOP_GRACE_S = 15.0
KILL_WAIT_S = 5.0  # after SIGKILL: the kernel needs no longer, unless the process is stuck in I/O
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
# "ValueError: ...", "[ERROR]", "error: ...", "... failed": not a warning that mentions a future error.
ERROR_LINE = re.compile(r"\b\w*(Error|Exception)\b:|\bERROR\b|^error:|\bfailed\b|^Traceback")


# -- which process is which --------------------------------------------------------------------------


def process_alive(pid: int | None, created: float | None) -> bool:
    """Whether ``pid`` still runs and is the process started at ``created`` (None: any process with
    that pid). An exited process its parent has not reaped yet (a zombie) does not run."""
    return running_process(pid, created) is not None


def running_process(pid: int | None, created: float | None) -> psutil.Process | None:
    """The process ``pid`` if it runs and was started at ``created`` (within a second), else None."""
    if not pid:
        return None
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        if created is not None and abs(process.create_time() - created) >= 1.0:
            return None
    except psutil.Error:
        return None
    return process


def create_time(pid: int) -> float | None:
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def last_problem_line(log: Path, offset: int = 0) -> str:
    """The last line of ``log`` (after ``offset``) that reads like an error, else its last line."""
    try:
        with log.open("rb") as handle:
            handle.seek(offset)
            lines = [line.strip() for line in handle.read().decode(errors="replace").splitlines()]
    except OSError:
        return "(no log)"
    lines = [line for line in lines if line]
    for line in reversed(lines):
        if ERROR_LINE.search(line):
            return line[:300]
    return lines[-1][:300] if lines else "(the log is empty)"


# -- starting ----------------------------------------------------------------------------------------


def stop_with_parent() -> Callable[[], None] | None:
    """What a child runs before exec so the kernel sends it SIGTERM when its parent dies, however it
    dies (SIGKILL, the OOM killer): without it a server outlives a killed `kubetune up`, holding its
    port and the model's memory until the next `up` reaps it. SIGTERM, not SIGKILL, so that
    `bentoml serve` stops its workers (they run in sessions of their own). Linux only; the signal
    follows the thread that started the child, so start such children from the main thread."""
    if _LIBC is None:
        return None
    libc, parent = _LIBC, os.getpid()

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


class ManagedProcess:
    """A child process in its own session, and every descendant it was seen to have.

    Descendants are remembered because some leave the process group (BentoML starts its workers in
    sessions of their own) and outlive a parent that crashed, still holding the port.
    """

    def __init__(
        self,
        role: str,
        command: Sequence[str],
        *,
        env: Mapping[str, str],
        log: Path,
        cwd: Path,
        die_with_parent: bool = True,
    ) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        cwd.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as output:
            self.log_offset = output.tell()
            output.write(f"\n=== {utc_now()} {shlex.join(command)}\n".encode())
            output.flush()
            # psutil's Popen: psutil.wait_procs then records the exit code where poll() finds it.
            self.popen: Any = psutil.Popen(
                list(command),
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=stop_with_parent() if die_with_parent else None,
            )
        self.role = role
        self.log = log
        self.command = list(command)
        self.pid: int = self.popen.pid
        self.created = create_time(self.pid)
        self.started = time.monotonic()
        self.descendants: dict[int, float] = {}

    def exit_code(self) -> int | None:
        """None while it runs; else its exit code, negative for the signal that killed it."""
        code: int | None = self.popen.poll()
        return code

    def last_problem(self) -> str:
        """The line of this run's log that best says what went wrong."""
        return last_problem_line(self.log, self.log_offset)

    def track(self) -> bool:
        """Remember descendants not seen before; True when there were any."""
        if self.popen.poll() is not None:
            return False
        try:
            children = self.popen.children(recursive=True)
        except psutil.Error:
            return False
        changed = False
        for child in children:
            if child.pid in self.descendants:
                continue
            with contextlib.suppress(psutil.Error):
                self.descendants[child.pid] = float(child.create_time())
                changed = True
        return changed

    def alive_descendants(self) -> list[psutil.Process]:
        found = (running_process(pid, created) for pid, created in self.descendants.items())
        return [process for process in found if process is not None]

    def running(self) -> bool:
        return self.popen.poll() is None or bool(self.alive_descendants())

    def send(self, signum: int) -> None:
        """``signum`` to the process group; descendants outside it get it directly once the parent is
        gone (while it lives, the parent stops its own workers)."""
        self.track()
        parent_gone = self.popen.poll() is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)
        if parent_gone or signum == signal.SIGKILL:
            self.signal_descendants(signum)

    def signal_descendants(self, signum: int) -> None:
        for process in self.alive_descendants():
            with contextlib.suppress(psutil.Error):
                process.send_signal(signum)

    def record(self) -> dict[str, Any]:
        """What a later process needs to stop this one and its descendants (see :func:`stop_recorded`)."""
        return {
            "role": self.role,
            "pid": self.pid,
            "created": self.created,
            "descendants": {str(pid): created for pid, created in self.descendants.items()},
            "command": self.command,
        }


# -- stopping ----------------------------------------------------------------------------------------


def wait_gone(
    processes: Iterable[psutil.Process],
    timeout_s: float,
    on_gone: Callable[[psutil.Process], None] | None = None,
) -> list[psutil.Process]:
    """psutil's ``wait_procs``, except that an exited process its parent has not reaped yet (a
    zombie: an init that reaps slowly, as in many containers) counts as gone. Returns those still
    running after ``timeout_s``; ``on_gone`` is called once for each that went."""
    deadline = time.monotonic() + timeout_s
    alive = list(processes)
    while alive:
        _, still = psutil.wait_procs(
            alive, timeout=max(0.0, min(0.2, deadline - time.monotonic())), callback=on_gone
        )
        alive = []
        for process in still:
            if _exited(process):
                if on_gone is not None:
                    on_gone(process)
            else:
                alive.append(process)
        if time.monotonic() >= deadline:
            break
    return alive


def _exited(process: psutil.Process) -> bool:
    try:
        return bool(process.status() == psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return True


def _members(processes: Iterable[ManagedProcess]) -> list[psutil.Process]:
    members: list[psutil.Process] = []
    for process in processes:
        if process.popen.poll() is None:
            members.append(process.popen)
        members += process.alive_descendants()
    return members


def stop_processes(processes: Iterable[ManagedProcess], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM to each (all at once), then SIGKILL to whatever still runs after ``grace_s``."""
    pending = list(processes)
    for process in pending:
        process.send(signal.SIGTERM)
    by_leader = {id(process.popen): process for process in pending}

    def orphaned(gone: psutil.Process) -> None:
        # The parent is gone: a descendant that outlived it gets the signal directly.
        process = by_leader.get(id(gone))
        if process is not None:
            process.signal_descendants(signal.SIGTERM)

    wait_gone(_members(pending), grace_s, on_gone=orphaned)
    pending = [process for process in pending if process.running()]
    for process in pending:
        process.send(signal.SIGKILL)
    wait_gone(_members(pending), KILL_WAIT_S)


def stop_process_group(
    pid: int | None, created: float | None, grace_s: float, kill_wait_s: float = KILL_WAIT_S
) -> None:
    """SIGTERM to the process group led by ``pid`` (if that process still runs), SIGKILL to the group
    when its leader is still there after ``grace_s``."""
    leader = running_process(pid, created)
    if leader is None:
        return
    try:
        os.killpg(leader.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if wait_gone([leader], grace_s):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(leader.pid, signal.SIGKILL)
        wait_gone([leader], kill_wait_s)


def stop_recorded(
    members: Iterable[tuple[int, float | None]],
    grace_s: float = 10.0,
    kill_wait_s: float = KILL_WAIT_S,
) -> bool:
    """Stop the processes (pid, start time) that a previous process recorded, those that still run:
    SIGTERM, then SIGKILL after ``grace_s``. True when any still ran."""
    found = (running_process(pid, created) for pid, created in members)
    running = [process for process in found if process is not None]
    if not running:
        return False
    for process in running:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    alive = wait_gone(running, grace_s)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    wait_gone(alive, kill_wait_s)
    return True


# -- trying again --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackoffPolicy:
    """How long to wait after each consecutive failure: ``first_s``, times ``factor`` each time, at
    most ``cap_s``; a thing that stays up ``stable_after_s`` starts afresh."""

    first_s: float = 1.0
    factor: float = 2.0
    cap_s: float = 60.0
    stable_after_s: float = 60.0

    def delay(self, failures: int) -> float:
        return float(min(self.first_s * self.factor ** max(failures - 1, 0), self.cap_s))


RESTART_BACKOFF = BackoffPolicy()  # 1, 2, 4, 8, 16, 32, 60, 60, ... seconds


@dataclass
class Backoff:
    """Consecutive failures of one thing, and when to try it again."""

    policy: BackoffPolicy = RESTART_BACKOFF
    failures: int = 0
    retry_at: float = 0.0
    problem: str | None = None

    def fail(self, problem: str, now: float) -> float:
        """Count a failure; returns the seconds to wait before the next try."""
        self.failures += 1
        delay = self.policy.delay(self.failures)
        self.retry_at = now + delay
        self.problem = problem
        return delay

    def waiting(self, now: float) -> float:
        """Seconds left before the next try (0: try now)."""
        return max(0.0, self.retry_at - now) if self.problem is not None else 0.0

    def settle(self, up_since: float, now: float) -> None:
        """Start afresh once the thing has stayed up since ``up_since`` long enough."""
        if now - up_since >= self.policy.stable_after_s:
            self.reset()

    def reset(self) -> None:
        self.failures, self.retry_at, self.problem = 0, 0.0, None
