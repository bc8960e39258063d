"""The local object store behaves like the API server for what `kubetune up` needs."""

from __future__ import annotations

import fcntl
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from kubetune.local.printer import age, jsonpath
from kubetune.local.store import ApplyError, DamagedEntry, LocalStore

MANIFEST = {
    "apiVersion": "kubetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "tune", "labels": {"team": "a"}},
    "spec": {"baseModel": {"uri": "m"}, "dataset": {"uri": "d.jsonl"}},
}
# Bounds the waits between the racing threads, so that a broken lock fails the test instead of hanging it.
WAIT_S = 10


def test_apply_creates_with_uid_generation_and_default_namespace(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    result = store.apply("finetunejobs", MANIFEST, immutable_spec=True)
    assert result.action == "created"
    meta = result.obj["metadata"]
    assert meta["namespace"] == "default" and meta["generation"] == 1 and meta["uid"]
    assert meta["labels"] == {"team": "a"}
    assert store.apply("finetunejobs", MANIFEST, immutable_spec=True).action == "unchanged"
    assert store.get("finetunejobs", "tune")["metadata"]["uid"] == meta["uid"]  # type: ignore[index]


def test_immutable_spec_is_refused_with_the_field_named(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.apply("finetunejobs", MANIFEST, immutable_spec=True)
    changed = {**MANIFEST, "spec": {**MANIFEST["spec"], "executor": "kfp"}}  # type: ignore[dict-item]
    with pytest.raises(ApplyError, match=r"FineTuneJob/tune: spec: spec is immutable"):
        store.apply("finetunejobs", changed, immutable_spec=True)
    assert store.apply("finetunejobs", changed, immutable_spec=False).obj["metadata"]["generation"] == 2


def test_status_is_kept_apart_and_delete_removes(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    obj = store.apply("finetunejobs", MANIFEST, immutable_spec=True).obj
    store.update_status("finetunejobs", obj, {"phase": "Running"})
    assert store.list_objects("finetunejobs")[0]["status"] == {"phase": "Running"}
    assert store.delete("finetunejobs", "tune")
    assert store.list_objects("finetunejobs") == []
    with pytest.raises(KeyError):
        store.update_status("finetunejobs", obj, {})
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_delete_landing_mid_status_write_waits_for_it_and_is_not_undone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`kubetune delete` between a status update's read and its write: without the store's write lock
    the delete would go through at once and the status write would then bring the object back."""
    store = LocalStore(tmp_path)
    obj = store.apply("finetunejobs", MANIFEST, immutable_spec=True).obj
    status_read = threading.Event()
    finish_status_write = threading.Event()
    delete_blocked_or_done = threading.Event()

    write = store._write

    def write_when_told(plural: str, current: dict[str, Any]) -> None:
        status_read.set()
        assert finish_status_write.wait(WAIT_S)
        write(plural, current)

    monkeypatch.setattr(store, "_write", write_when_told)
    flock = fcntl.flock

    def flock_noting_contention(handle: Any, operation: int) -> None:
        if operation == fcntl.LOCK_EX:
            try:
                flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                delete_blocked_or_done.set()  # only the delete can contend: it now waits in flock
        flock(handle, operation)

    monkeypatch.setattr(fcntl, "flock", flock_noting_contention)

    def delete() -> bool:
        try:
            return store.delete("finetunejobs", "tune")
        finally:
            delete_blocked_or_done.set()

    with ThreadPoolExecutor(max_workers=2) as pool:
        try:
            status_update = pool.submit(store.update_status, "finetunejobs", obj, {"phase": "Running"})
            assert status_read.wait(WAIT_S)
            deletion = pool.submit(delete)
            assert delete_blocked_or_done.wait(WAIT_S)
        finally:
            finish_status_write.set()
        assert status_update.result(WAIT_S)["status"] == {"phase": "Running"}
        assert deletion.result(WAIT_S) is True
    assert store.get("finetunejobs", "tune") is None
    assert store.list_objects("finetunejobs") == []


def test_jsonpath_subset_used_by_printer_columns() -> None:
    obj = {
        "status": {
            "conditions": [{"type": "Ready", "reason": "A"}, {"type": "Succeeded", "reason": "B"}],
            "progress": {"percent": 40},
        }
    }
    assert jsonpath(obj, '.status.conditions[?(@.type=="Succeeded")].reason') == "B"
    assert jsonpath(obj, ".status.progress.percent") == 40
    assert jsonpath(obj, ".status.conditions[0].type") == "Ready"
    assert jsonpath(obj, ".status.missing.deeper") is None


def test_age_reads_like_kubectl() -> None:
    from datetime import UTC, datetime

    now = datetime(2026, 1, 1, 1, 0, 0, tzinfo=UTC)
    assert age("2026-01-01T00:59:30Z", now) == "30s"
    assert age("2026-01-01T00:00:00Z", now) == "1h"
    assert age(None) == "<unknown>"


def test_workspace_reports_are_read_from_paths_and_mounted_claims(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from kubetune_contract.workspace import WorkspaceReport

    run = tmp_path / "claim" / "runs" / "r1"
    (run / "evaluation").mkdir(parents=True)
    (run / "progress.json").write_text(json.dumps({"step": 3}))
    (run / "evaluation" / "final.json").write_text("{not json")  # torn or foreign: reads as absent
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(tmp_path))
    for uri in (str(run), f"file://{run}", "pvc://claim/runs/r1"):
        report = WorkspaceReport.read(uri)
        assert report.progress == {"step": 3}
        assert report.final is None and report.output is None


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b'{"metadata": {"name": "tune"', "invalid JSON: Expecting ',' delimiter at line 1"),
        (b"\xff\xfe\x00", "not UTF-8 text"),
        (b"[1, 2]", "not an object with metadata.name"),
    ],
)
def test_a_damaged_entry_is_named_and_can_still_be_deleted(
    tmp_path: Path, content: bytes, problem: str
) -> None:
    store = LocalStore(tmp_path)
    store.apply("finetunejobs", MANIFEST, immutable_spec=True)
    path = tmp_path / "store" / "finetunejobs" / "default" / "tune.json"
    path.write_bytes(content)
    recovery = "remove it with `kubetune delete finetunejobs tune -n default`"
    expected = f"{path}: damaged store entry ({problem}); {recovery}"
    with pytest.raises(DamagedEntry) as read:
        store.get("finetunejobs", "tune")
    assert str(read.value) == expected
    with pytest.raises(DamagedEntry, match=re.escape(expected)):
        store.list_objects("finetunejobs")
    assert store.delete("finetunejobs", "tune")
    assert store.get("finetunejobs", "tune") is None and store.list_objects("finetunejobs") == []
