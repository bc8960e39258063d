"""``kubetune operator`` whose local executor records runs in memory instead of starting them.

For benchmarks/operator_scale.py, which measures the control plane (watching, planning, submitting,
writing statuses for hundreds of jobs), not training: with the real local executor each FineTuneJob
would start a worker process and a kfp pipeline. Everything else is the real operator. A recorded run
stays Pending, so every job stays unfinished and its timer keeps reconciling it, as while runs go on.

    python benchmarks/operator_with_recorded_runs.py operator --namespace NS [--liveness-port 0]
"""

from __future__ import annotations

import sys
from pathlib import Path

import kubetune.reconcile.jobs
from kubetune.cli import main
from kubetune.plan.runs import RunRequest, RunStatus


class RecordedRuns:
    """The local backend's interface; a submitted run is remembered and stays Pending."""

    name = "local"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.runs: dict[str, RunStatus] = {}

    def find(self, key: str) -> RunStatus | None:
        return self.runs.get(key)

    def submit(self, request: RunRequest) -> RunStatus:
        return self.runs.setdefault(
            request.key, RunStatus(backend="local", id=request.key, phase="Pending", url=str(self.root))
        )

    def resume(self, key: str) -> RunStatus:
        return self.runs[key]

    def cancel(self, key: str) -> None:
        self.runs.pop(key, None)


if __name__ == "__main__":
    kubetune.reconcile.jobs.LocalBackend = RecordedRuns  # type: ignore[attr-defined,misc,assignment]
    main(sys.argv[1:])
