"""The real ``kubetune operator`` SIGKILLed at random moments while it runs many jobs on the real API server.

A node dies or the OOM killer strikes: the operator gets no chance to clean up, and a new one starts.
Local runs outlive the operator (their workers are in their own sessions), so a restarted operator must
re-attach to them, never start a second run or a step twice, and never write a status that goes back
(a watch on the API server records every stored version of every job). A job deleted while no operator
runs, or while one is being killed, still has its finalizer handled: its run is cancelled and it goes.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from realcluster.cluster_objects import (
    ClusterObjects,
    Manifest,
    finetunejob,
    quantizejob,
    succeeded,
    wait_until,
)
from realcluster.control_plane import ControlPlane
from realcluster.operator_process import (
    OperatorIdentity,
    OperatorProcess,
    install_operator_rbac,
    refused_requests,
    start_operator,
)
from realcluster.status_watch import SeenVersion, StatusWatch

pytestmark = pytest.mark.realcluster

SEED = 20261202
KILLS = 5
FINETUNES = [f"tune-{index}" for index in range(8)]
QUANTIZES = {f"{source}-int8": source for source in FINETUNES[:4]}
DOOMED = ["doomed-0", "doomed-1"]  # deleted around kills
FINALIZER = "kubetune.dev/finalizer"
# Slow enough that kills land while runs are training, fast enough for a loaded 2-core machine.
STEPS_ENV = {"FAKE_STEP_S": "0.5", "FAKE_STEPS": "50"}
FINETUNE_STEPS = ["curate", "evaluate", "evaluate", "finetune", "publish"]
PHASE_ORDER = {"Pending": 0, "Running": 1, "Succeeded": 2, "Failed": 2}
SET_ONCE = ("startTime", "completionTime", "observedGeneration")
END_TIMEOUT_S = 300.0


@dataclass
class KilledOperator:
    """An operator that is killed and started again; ``current`` is the live one."""

    identity: OperatorIdentity
    workdir: Path
    current: OperatorProcess
    kills: int = 0

    def kill(self, rng: random.Random) -> None:
        """SIGKILL the live one, then leave no operator running for a random moment."""
        self.current.kill()
        self.kills += 1
        time.sleep(rng.uniform(0.0, 1.5))

    def restart(self) -> None:
        self.current = start_operator(self.identity, self.workdir, extra_env=STEPS_ENV)


@pytest.fixture
def killed_operator(
    control_plane: ControlPlane, kubetune_crds: list[str], tmp_path: Path
) -> Iterator[KilledOperator]:
    identity = install_operator_rbac(control_plane, control_plane.create_namespace(), [])
    operator = KilledOperator(identity, tmp_path, start_operator(identity, tmp_path, extra_env=STEPS_ENV))
    try:
        yield operator
    finally:
        operator.current.kill()


def phase_rank(seen: SeenVersion) -> int:
    return PHASE_ORDER[str(seen.status["phase"])]


def assert_status_only_moves_forward(name: str, history: list[SeenVersion]) -> None:
    """From its first status on, a job's status is never emptied, its phase never goes back, its
    training progress never shrinks and what is set once (start, end, the run) never changes."""
    statuses = [seen for seen in history if seen.status]
    assert statuses, f"{name}: the watch saw no status"
    first_with_status = history.index(statuses[0])
    lost = [
        seen.resource_version
        for seen in history[first_with_status:]
        if not seen.status and seen.event != "DELETED"
    ]
    assert lost == [], f"{name}: status emptied at resourceVersions {lost}"
    ranks = [phase_rank(seen) for seen in statuses]
    assert ranks == sorted(ranks), f"{name}: phase went back: {[seen.status['phase'] for seen in statuses]}"
    steps = [int((seen.status.get("progress") or {}).get("step") or 0) for seen in statuses]
    assert steps == sorted(steps), f"{name}: training progress went back: {steps}"
    for key in (*SET_ONCE, "pipelineRun"):
        values = [json.dumps(seen.status[key], sort_keys=True) for seen in statuses if key in seen.status]
        assert len(set(values)) <= 1, f"{name}: status.{key} changed: {values}"
        if values:
            first = next(index for index, seen in enumerate(statuses) if key in seen.status)
            assert all(key in seen.status for seen in statuses[first:]), f"{name}: status.{key} was lost"


def runs_of(home: Path, namespace: str, name: str) -> list[Path]:
    """The local backend's run directories of job ``namespace/name``, every generation and attempt."""
    runs = []
    for request in sorted((home / "local-runs").glob("*/request.json")):
        if json.loads(request.read_text())["display_name"] == f"{namespace}/{name}":
            runs.append(request.parent)
    return runs


def step_starts(run_dir: Path) -> list[str]:
    """The steps the run started, in order (the stand-in steps append their name to starts.log)."""
    workspace = Path(json.loads((run_dir / "request.json").read_text())["workspace"])
    return [line.split()[0] for line in (workspace / "starts.log").read_text().splitlines()]


def events_of(objects: ClusterObjects, name: str, reason: str) -> list[dict[str, Any]]:
    response = objects.http.get(f"/api/v1/namespaces/{objects.namespace}/events")
    response.raise_for_status()
    return [
        event
        for event in response.json()["items"]
        if event["involvedObject"]["name"] == name and event["reason"] == reason
    ]


def test_sigkilled_operator_ends_every_job_exactly_once(
    control_plane: ControlPlane, killed_operator: KilledOperator
) -> None:
    rng = random.Random(SEED)
    namespace = control_plane.create_namespace()
    watch = StatusWatch(control_plane, namespace, ("finetunejobs", "quantizejobs")).start()
    with control_plane.admin_http() as http:
        objects = ClusterObjects(control_plane, namespace, http, killed_operator.current)
        manifests: list[Manifest] = [finetunejob(name) for name in (*FINETUNES, *DOOMED)]
        manifests += [quantizejob(name, source) for name, source in QUANTIZES.items()]
        objects.kubectl(
            "apply", "--server-side", "--field-manager=kubetune-tests", "-f", "-",
            stdin={"apiVersion": "v1", "kind": "List", "items": manifests},
        )  # fmt: skip
        for name in DOOMED:  # the operator has taken them on: they carry its finalizer
            objects.wait_for("finetunejobs", name, lambda found: bool(found.get("status")), "a status")

        downtimes: list[float] = []
        for kill in range(1, KILLS + 1):
            time.sleep(rng.uniform(2.0, 8.0))  # from the operator's start (imports, login, list) to its runs
            if kill == 3:  # deleted while the operator handles it, just before a kill
                objects.kubectl("delete", "finetunejob", DOOMED[1], "--wait=false")
            began = time.monotonic()
            killed_operator.kill(rng)
            if kill == 1:  # deleted while no operator runs
                objects.kubectl("delete", "finetunejob", DOOMED[0], "--wait=false")
            killed_operator.restart()
            objects.operator = killed_operator.current
            downtimes.append(time.monotonic() - began)

        for name in DOOMED:
            objects.wait_gone("finetunejobs", name)
        ends = [("finetunejobs", name) for name in FINETUNES] + [("quantizejobs", name) for name in QUANTIZES]
        wait_until(
            "every job to succeed",
            lambda: all(
                (found := objects.get(plural, name)) is not None and succeeded(found) for plural, name in ends
            ),
            killed_operator.current,
            timeout_s=END_TIMEOUT_S,
        )
        time.sleep(2.0)  # passes already under way would show any late, stale write
        watch.stop()

        home = killed_operator.workdir / "home"
        for plural, name in ends:
            assert_status_only_moves_forward(name, watch.history(plural, name))
            (run,) = runs_of(home, namespace, name)  # one run: the job has one generation
            state = json.loads((run / "state.json").read_text())
            assert (state["phase"], state["attempt"]) == ("Succeeded", 1), f"{name}: {state}"
            starts = step_starts(run)
            if plural == "finetunejobs":
                assert sorted(starts) == FINETUNE_STEPS, f"{name} started steps {starts}"
            else:
                assert [step for step, count in Counter(starts).items() if count > 1] == [], (
                    f"{name} started steps {starts}"
                )
            assert len(events_of(objects, name, "Succeeded")) == 1, f"{name} was reported Succeeded twice"

        for name in DOOMED:
            history = watch.history("finetunejobs", name)
            assert history[-1].event == "DELETED"
            assert any(FINALIZER in seen.finalizers for seen in history), f"{name} never had the finalizer"
            for run in runs_of(home, namespace, name):
                state = json.loads((run / "state.json").read_text())
                assert state["phase"] in ("Succeeded", "Cancelled"), f"{name}'s run was left {state}"

    assert killed_operator.kills == KILLS
    assert refused_requests(control_plane, killed_operator.identity) == []
    print(f"downtimes: {[round(d, 1) for d in downtimes]}")
