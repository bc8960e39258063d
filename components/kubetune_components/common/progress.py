"""`progress.json` in the run's workspace: what the step is doing right now, for the operator to show.

The file is replaced atomically, so a reader never sees half of it. During training it is written
at most once per `min_interval_s` (plus at phase changes, checkpoints and the end), so reporting never
slows the training loop down.

A training step that restarts after an interruption resumes from its newest checkpoint, not from the
last step it reported: `checkpointStep` (the newest checkpoint written) lets the restarted step show
where it will resume before the model is loaded, and `resumedFromStep` says so for the whole attempt.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from typing import Any, Literal

from kubetune_components.common import storage

Phase = Literal["curating", "evaluating-baseline", "training", "evaluating", "publishing", "done"]
PROGRESS_FILE = "progress.json"
_UP_TO_TRAINING: frozenset[str] = frozenset({"curating", "evaluating-baseline", "training"})
"""The phases before training has finished (a resumed run may redo the ones before training)."""


def utc_now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ProgressReporter:
    """Writes `{workspace}/progress.json`; throttled while training, immediate on phase changes."""

    def __init__(self, workspace_dir: Path, min_interval_s: float = 1.0) -> None:
        self.path = Path(workspace_dir) / PROGRESS_FILE
        self.min_interval_s = min_interval_s
        self._last_write = float("-inf")
        self._state: dict[str, Any] = self._read_existing()

    def _read_existing(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "phase": "curating",
            "step": 0,
            "totalSteps": 0,
            "epoch": 0.0,
            "trainLoss": None,
            "learningRate": None,
            "tokensSeen": 0,
            "checkpointStep": None,
            "resumedFromStep": None,
            "updatedAt": None,
        }
        if self.path.is_file():
            try:
                previous = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                previous = None
            if isinstance(previous, dict):
                state.update({key: previous[key] for key in state if key in previous})
        return state

    @property
    def state(self) -> dict[str, Any]:
        return dict(self._state)

    def set_phase(self, phase: Phase) -> None:
        checkpoint_step = self._state["checkpointStep"]
        unfinished = self._state["phase"] in _UP_TO_TRAINING
        if phase == "training" and unfinished and isinstance(checkpoint_step, int):
            # Training again before it ever finished, with a checkpoint on disk: the run was interrupted,
            # and this attempt resumes from the checkpoint, not from the step the stopped one last
            # reported. The loop confirms (or corrects) this once it has loaded the checkpoint.
            self._state.update(step=checkpoint_step, resumedFromStep=checkpoint_step)
        self._state["phase"] = phase
        self._write()

    def training_started(self, resumed_from_step: int | None) -> None:
        """This attempt trains from a checkpoint's step, or afresh (None); written with the next update."""
        self._state["resumedFromStep"] = resumed_from_step
        if resumed_from_step is None:
            self._state["checkpointStep"] = None

    def checkpoint_saved(self, step: int) -> None:
        """A resumable checkpoint of `step` is on disk: a restart resumes from here."""
        self._state["checkpointStep"] = step
        # Not a training update: frequent checkpoints must not hold back the throttled step counts.
        self._write(restarts_throttle=False)

    def training_update(
        self,
        *,
        step: int,
        total_steps: int,
        epoch: float,
        train_loss: float | None,
        learning_rate: float | None,
        tokens_seen: int,
        force: bool = False,
    ) -> bool:
        """Record a training step; returns True when the file was actually written."""
        if not force and time.monotonic() - self._last_write < self.min_interval_s:
            return False
        self._state.update(
            phase="training",
            step=step,
            totalSteps=total_steps,
            epoch=round(epoch, 4),
            trainLoss=train_loss,
            learningRate=learning_rate,
            tokensSeen=tokens_seen,
        )
        self._write()
        return True

    def due(self) -> bool:
        """Whether a non-forced update would be written now (lets callers skip computing its values)."""
        return time.monotonic() - self._last_write >= self.min_interval_s

    def _write(self, *, restarts_throttle: bool = True) -> None:
        self._state["updatedAt"] = utc_now_iso()
        storage.atomic_write_json(self.path, self._state)
        if restarts_throttle:
            self._last_write = time.monotonic()
