"""examples/feedback-loop end to end: the example's own driver, run as a user runs it.

`loop.py` starts `kubetune up` and a real Prometheus, fine-tunes and serves v1 (real bentoml server,
real gateway), asks tickets with the official openai client and rates the answers with POST
/v1/feedback, exports them with `kubetune feedback export --format kto`, runs a KTO FineTuneJob on
them on top of v1, and rolls the result out as a canary judged by Prometheus on the users' feedback.
The test checks that every figure the driver reports agrees with the others: each rated answer is
exported once with its label, the KTO job reports metrics before and after, and the rollout reaches a
decision that its last analysis explains.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]
FEEDBACK_TICKETS = 60
STAGES = ("== 1. serve v1", "== 2. feedback", "== 3. export", "== 4. fine-tune", "== 5. canary")


def processes_under(directory: Path) -> list[str]:
    """Command lines that name a path in ``directory`` (the gateway's and servers' do)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        command = " ".join(process.info["cmdline"] or [])
        if str(directory) in command:
            found.append(command)
    return found


def test_feedback_loop_serves_rates_exports_tunes_with_kto_and_decides_the_canary(project: Path) -> None:
    summary_path = project / "summary.json"
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "examples" / "feedback-loop" / "loop.py"),
            "--feedback-tickets",
            str(FEEDBACK_TICKETS),
            "--timeout",
            "900",
            "--summary",
            str(summary_path),
        ],
        capture_output=True,
        text=True,
        timeout=1700,
    )
    output = f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr[-6000:]}"
    assert result.returncode == 0, output
    print(f"loop.py took {time.monotonic() - started:.0f}s")
    for heading in STAGES:
        assert heading in result.stdout, output

    summary: dict[str, Any] = json.loads(summary_path.read_text())
    feedback, export = summary["feedback"], summary["export"]
    assert feedback["rated"] == FEEDBACK_TICKETS
    assert feedback["good"] + feedback["bad"] == FEEDBACK_TICKETS
    # Every rated answer was captured and exported once, labelled as it was rated.
    assert export["rows"] == FEEDBACK_TICKETS
    assert export["desirable"] == feedback["good"]
    rows = [json.loads(line) for line in (project / ".kubetune" / "feedback-loop" / "feedback.jsonl").open()]
    assert len(rows) == FEEDBACK_TICKETS
    assert all(isinstance(row["prompt"], list) and row["prompt"][-1]["role"] == "user" for row in rows)
    assert sum(row["label"] is True for row in rows) == feedback["good"]

    kto = summary["kto"]
    assert kto["baseline"] and kto["final"], kto
    assert set(kto["baseline"]) == set(kto["final"])

    canary = summary["canary"]
    assert canary["outcome"] in ("Promoted", "RolledBack"), canary
    assert canary["feedbackCount"]["v2"] > 0, canary
    if canary["outcome"] == "Promoted":
        assert canary["weights"] == "v1=0,v2=100", canary
    else:
        analysis = canary["lastAnalysis"]
        assert analysis["metric"] in ("feedback", "errorRate"), canary
        assert canary["weights"] == "v1=100,v2=0", canary

    assert not processes_under(project), "the driver left processes running"
