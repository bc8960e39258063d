"""Stopping training on request: SIGTERM (a pod being evicted) or a step hook.

The loop checkpoints after the optimizer step in progress and raises TrainingInterrupted; running the
step again resumes from that checkpoint.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType


class StopRequest:
    """Set by SIGTERM (or a step hook); the loop checkpoints after the current optimizer step and stops."""

    def __init__(self) -> None:
        self.requested = False
        self.reason = ""

    def request(self, reason: str = "requested") -> None:
        self.requested = True
        self.reason = reason


class TrainingInterrupted(Exception):
    """Training stopped early on request; the position is saved in `checkpoint` (when there is one).

    Not a ComponentError: nothing is wrong, and running the step again resumes from the checkpoint.
    """

    def __init__(self, step: int, checkpoint: Path | None, reason: str) -> None:
        saved = f"checkpoint {checkpoint}" if checkpoint is not None else "no checkpoint directory"
        super().__init__(f"training stopped at step {step} ({reason}); {saved}")
        self.step = step
        self.checkpoint = checkpoint
        self.reason = reason


@contextlib.contextmanager
def stop_on_sigterm(stop: StopRequest) -> Iterator[None]:
    """While active, SIGTERM only sets `stop`; elsewhere (or off the main thread) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        stop.request("SIGTERM")

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
