"""What one `kubetune up` holds while it runs: the home's lock, the signals that stop it, and an
output that survives its terminal going away."""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import psutil

from kubetune.common.supervision import process_alive


class UpLock:
    """One `kubetune up` reconciles a home at a time: an exclusive lock on ``<home>/up.lock``, which
    holds the owner's pid and start time. The kernel releases it when the process ends, however it
    ends; the file's content stays behind a killed `up`, so readers check that its process runs
    (:meth:`live_holder`)."""

    def __init__(self, home: Path) -> None:
        self.path = home / "up.lock"
        self._handle: TextIO | None = None

    def acquire(self) -> int | None:
        """None when this process holds the lock now; else the holder's pid (0 if unknown)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder, _ = _holder(handle.read())
            handle.close()
            return holder or 0
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()} {psutil.Process().create_time()}\n")
        handle.flush()
        self._handle = handle
        return None

    def live_holder(self) -> int | None:
        """The pid of the `kubetune up` holding the lock, None when none runs (the lock was released,
        or its holder was killed and the pid it wrote is gone or now another process's). Takes no
        lock, so it never makes an `up` starting at the same moment believe another one runs."""
        try:
            pid, created = _holder(self.path.read_text())
        except OSError:
            return None
        return pid if process_alive(pid, created) else None

    def release(self) -> None:
        if self._handle is not None:
            self._handle.truncate(0)
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


def _holder(text: str) -> tuple[int | None, float | None]:
    """The pid and start time an `up` wrote into its lock file ("<pid> <start time>"); a file written
    before the start time was recorded holds the pid alone."""
    fields = text.split()
    pid = int(fields[0]) if fields and fields[0].isdigit() else None
    try:
        created = float(fields[1]) if len(fields) > 1 else None
    except ValueError:
        created = None
    return pid, created


class StopSignals:
    """SIGINT (Ctrl+C), SIGTERM and SIGHUP ask `up` to stop after the current pass; a second SIGINT
    stops at once (KeyboardInterrupt), except while shielded (stopping the processes started)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.received: int | None = None
        self.shielded = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        # Installed even where the shell made background jobs ignore SIGINT (`up &` in a script).
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        return self

    def __exit__(self, *_: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        first = self.received is None
        if first:
            self.received = signum
        if not first and signum == signal.SIGINT and not self.shielded:
            raise KeyboardInterrupt

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    def sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self.received is None and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.1))


class GoneTerminalSafe(io.TextIOBase):
    """``out`` whose writes never raise: once the terminal is closed (SIGHUP: writes fail with EIO) or
    the reader of a pipe is gone (EPIPE), `up` must still stop what it started and mark it not served."""

    def __init__(self, out: TextIO) -> None:
        self._out = out

    def write(self, text: str) -> int:
        with contextlib.suppress(OSError, ValueError):
            return self._out.write(text)
        return len(text)

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._out.flush()
