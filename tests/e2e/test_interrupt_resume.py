"""Ctrl+C stops `kubetune up` cleanly; running it again resumes from the last checkpoint."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from conftest import KubetuneCli

# The `kubetune up` inside may take longer than the suite-wide 600 s timeout on a loaded machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

JOB = """\
apiVersion: kubetune.dev/v1alpha1
kind: FineTuneJob
metadata: {name: resumable}
spec:
  baseModel: {uri: ./.kubetune/models/tiny-base}
  dataset: {uri: examples/quickstart/data/support-tickets.jsonl, format: instruction, validationSplit: "0.05"}
  method: {type: lora, lora: {r: 4, alpha: 8}}
  training: {maxSteps: 2000, batchSize: 4, learningRate: "1e-3", checkpointEverySteps: 10, maxSeqLength: 96}
  evaluation: {metrics: [evalLoss], maxSamples: 5}
  executor: local
"""


# Long enough (about 40 s idle) that training cannot end before the test has seen it under way and its
# SIGINT arrives, on a fast machine or a loaded one.
TOTAL_STEPS = 2000


def stored(project: Path) -> dict[str, Any]:
    path = project / ".kubetune" / "store" / "finetunejobs" / "default" / "resumable.json"
    try:
        value: dict[str, Any] = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return value


def test_ctrl_c_then_up_again_resumes_from_the_checkpoint(project: Path, kubetune: KubetuneCli) -> None:
    (project / "job.yaml").write_text(JOB)
    up = kubetune.popen("up", "-f", "job.yaml")
    deadline = time.monotonic() + 300
    while (stored(project).get("status") or {}).get("progress", {}).get("step", 0) < 12:
        assert up.poll() is None, up.stdout.read() if up.stdout else ""
        assert time.monotonic() < deadline, "training never got going"
        time.sleep(0.5)
    up.send_signal(signal.SIGINT)
    output, _ = up.communicate(timeout=120)
    assert up.returncode == 130, output
    assert "run `kubetune up` again to resume" in output

    run_id = stored(project)["status"]["pipelineRun"]["id"]
    state = json.loads((project / ".kubetune" / "local-runs" / run_id / "state.json").read_text())
    assert state["phase"] == "Interrupted"
    workspace = next((project / ".kubetune" / "runs").rglob("checkpoints"))
    assert any(workspace.iterdir()), "no checkpoint was written"

    result = kubetune("up", timeout=600)  # no files: carry on with what is stored
    assert "Succeeded" in result.stdout, result.stdout
    obj = json.loads(kubetune("get", "ftj", "resumable", "-o", "json").stdout)
    assert obj["status"]["pipelineRun"]["id"] == run_id  # the same run, a second attempt
    training = json.loads((workspace.parent / "trained" / "kubetune-training.json").read_text())
    assert training["resumedFromStep"] >= 10
    assert obj["status"]["progress"]["step"] == TOTAL_STEPS
    # While it resumed, `up` said from where: the checkpoint's step, not the step the stopped run reached.
    assert f"resuming from step {training['resumedFromStep']}" in result.stdout, result.stdout
    assert obj["status"]["progress"]["resumedFromStep"] == training["resumedFromStep"]
