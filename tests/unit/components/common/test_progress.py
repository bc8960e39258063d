"""progress.json: what the operator shows of a running step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune_components.common import progress as progress_module
from kubetune_components.common.progress import ProgressReporter


def test_frequent_checkpoints_do_not_hold_back_the_training_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint is written at once but is not the throttled training update: with a checkpoint
    every few steps (each well within the throttle), the steps shown would otherwise stay at 0 until
    training ended."""
    now = [100.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: now[0])
    progress = ProgressReporter(tmp_path, min_interval_s=1.0)
    progress.set_phase("training")
    for step in range(1, 31):
        now[0] += 0.2  # five steps a second, a checkpoint every 3 steps
        progress.training_update(
            step=step,
            total_steps=30,
            epoch=step / 30,
            train_loss=1.0,
            learning_rate=0.1,
            tokens_seen=8 * step,
        )
        if step % 3 == 0:
            progress.checkpoint_saved(step)
            assert json.loads((tmp_path / "progress.json").read_text())["checkpointStep"] == step
    shown = json.loads((tmp_path / "progress.json").read_text())["step"]
    assert shown >= 25  # written about once a second: at most a second's steps behind
