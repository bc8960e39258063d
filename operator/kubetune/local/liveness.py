"""What the local store says about processes of a `kubetune up` that is gone.

A `kubetune up` writes Running, Ready and endpoints into the store while it runs, and marks them
stopped when it stops; one that was killed outright (SIGKILL, the OOM killer, a closed laptop lid
followed by a reboot) could not. The next `kubetune up` corrects that before it starts
(:func:`mark_not_served`), and so does any command that reads the store first
(:func:`settle_after_dead_up`): nothing then claims Running or Ready for a process that is gone.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from kubetune.backends.local import LocalBackend
from kubetune.common.clock import utc_now
from kubetune.local.session import UpLock
from kubetune.local.store import LocalStore
from kubetune_contract.conditions import SUCCEEDED, find_condition, set_condition, set_job_conditions

DEPLOYMENTS = "modeldeployments"
JOBS = ("finetunejobs", "quantizejobs")
STOPPED = "kubetune up stopped serving it; run `kubetune up` to serve it again"
GONE = "the kubetune up that served it is gone; run `kubetune up` to serve it again"


def not_served_status(
    status: dict[str, Any], generation: int | None, now: str, message: str = STOPPED
) -> dict[str, Any]:
    """The status of a ModelDeployment whose `kubetune up` stopped: nothing answers any more."""
    conditions = list(status.get("conditions") or [])
    for type_ in ("Ready", "Progressing"):
        conditions = set_condition(
            conditions, type_, "False", "NotServed", message, now=now, generation=generation
        )
    versions = [
        {**version, "ready": False, "url": None, "message": "not served"}
        for version in status.get("versions") or []
    ]
    updated = {key: value for key, value in status.items() if key != "endpoint"}
    updated.update(
        conditions=conditions,
        phase="Stopped",
        versions=versions,
        readyVersions=f"0/{len(versions)}",
    )
    return updated


def mark_not_served(store: LocalStore, served: list[tuple[str, str]], message: str = STOPPED) -> None:
    now = utc_now()
    for namespace, name in served:
        obj = store.get(DEPLOYMENTS, name, namespace)
        if obj is None or not obj.get("status"):
            continue
        status = not_served_status(obj["status"], obj["metadata"].get("generation"), now, message)
        with contextlib.suppress(KeyError):
            store.update_status(DEPLOYMENTS, obj, status)


def served_before(store: LocalStore) -> list[tuple[str, str]]:
    """The stored ModelDeployments whose status says a `kubetune up` serves them (not yet Stopped)."""
    return [
        (obj["metadata"]["namespace"], obj["metadata"]["name"])
        for obj in store.list_objects(DEPLOYMENTS)
        if (obj.get("status") or {}).get("phase") not in (None, "Stopped")
    ]


def _interrupted_status(status: dict[str, Any], generation: int | None, why: str, now: str) -> dict[str, Any]:
    message = f"{why}; the kubetune up that ran it is gone: run `kubetune up` to resume it"
    conditions = list(status.get("conditions") or [])
    conditions = set_job_conditions(
        conditions, "Unknown", "Interrupted", message, now=now, generation=generation
    )
    return {**status, "conditions": conditions, "phase": "Interrupted"}


def interrupt_orphaned_jobs(store: LocalStore, home: Path) -> list[str]:
    """Mark Interrupted the unfinished jobs of the local executor whose worker is gone (a `kubetune up`
    that is gone left them Running or Pending); returns them as kind/name."""
    runs = LocalBackend(home / "local-runs")
    now = utc_now()
    interrupted = []
    for plural in JOBS:
        for obj in store.list_objects(plural):
            status = obj.get("status") or {}
            condition = find_condition(list(status.get("conditions") or []), SUCCEEDED) or {}
            pipeline_run = status.get("pipelineRun") or {}
            if condition.get("status") != "Unknown" or status.get("phase") not in ("Pending", "Running"):
                continue
            if pipeline_run.get("backend") != "local" or not pipeline_run.get("name"):
                continue  # not submitted yet, or run by Kubeflow Pipelines, which goes on without `up`
            run = runs.find(str(pipeline_run["name"]))
            if run is not None and run.phase != "Interrupted":
                continue  # its worker still runs (or ended): the next `up` reads how it went
            why = run.message if run is not None and run.message else "its pipeline run is gone"
            updated = _interrupted_status(status, obj["metadata"].get("generation"), why, now)
            with contextlib.suppress(KeyError):
                store.update_status(plural, obj, updated)
                interrupted.append(f"{obj['kind'].lower()}/{obj['metadata']['name']}")
    return interrupted


def settle_after_dead_up(store: LocalStore, home: Path) -> None:
    """When no `kubetune up` runs with this home, correct what a killed one left claiming to run:
    its ModelDeployments become NotServed, its local jobs whose worker is gone Interrupted. A no-op
    while an `up` runs (it keeps the store true itself). Call it before reading the store to show it."""
    if UpLock(home).live_holder() is not None:
        return
    live = [
        (obj["metadata"]["namespace"], obj["metadata"]["name"])
        for obj in store.list_objects(DEPLOYMENTS)
        if (obj.get("status") or {}).get("phase") not in (None, "Stopped", "Failed")
    ]
    mark_not_served(store, live, GONE)
    interrupt_orphaned_jobs(store, home)
