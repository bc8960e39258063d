"""Proves the integration harness: a real Kopf operator against the kmock-based emulator."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

import _demo_handlers as demo
import kmock
import kopf
import pytest

if TYPE_CHECKING:
    from fixtures.cluster import Cluster
    from fixtures.operator import OperatorRunner

FINALIZER = "kopf.zalando.org/KopfFinalizerMarker"
LAST_HANDLED = "kopf.zalando.org/last-handled-configuration"
PROGRESS = "kopf.zalando.org/create_fn"


def ftj(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {"baseModel": "tiny", **spec},
    }


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    threads_before = set(threading.enumerate())
    yield
    leaked = [t for t in set(threading.enumerate()) - threads_before if t.is_alive()]
    assert not leaked, f"Leaked threads: {leaked}"


# ---- the operator ---------------------------------------------------------------------------------


async def test_create_runs_the_handler_and_patches_status(k8s: Cluster, run_operator: OperatorRunner) -> None:
    async with run_operator(demo):
        await k8s.create("finetunejobs", ftj("create-1"))
        obj = await k8s.wait_for("finetunejobs", "create-1", lambda o: o["status"]["phase"] == "Created")

    assert obj["status"]["attempts"] == 1
    assert FINALIZER in obj["metadata"]["finalizers"]  # because of the delete handler
    assert LAST_HANDLED in obj["metadata"]["annotations"]
    assert demo.calls("create", "create-1") == 1


async def test_delete_runs_the_handler_and_releases_the_finalizer(
    k8s: Cluster,
    run_operator: OperatorRunner,
) -> None:
    async with run_operator(demo):
        await k8s.create("finetunejobs", ftj("delete-1"))
        await k8s.wait_for("finetunejobs", "delete-1", lambda o: FINALIZER in o["metadata"]["finalizers"])

        marked = await k8s.delete("finetunejobs", "delete-1")
        assert marked is not None and marked["metadata"]["deletionTimestamp"]  # blocked by the finalizer
        await k8s.wait_gone("finetunejobs", "delete-1")

    assert demo.calls("delete", "delete-1") == 1
    with pytest.raises(k8s.ApiError) as err:
        await k8s.get("finetunejobs", "delete-1")
    assert err.value.status == 404
    last_version = [v for v in k8s.history("finetunejobs", "delete-1") if v is not None][-1]
    assert last_version["metadata"]["deletionTimestamp"] and not last_version["metadata"].get("finalizers")


async def test_restart_sees_the_existing_object_without_recreating_it(
    k8s: Cluster,
    run_operator: OperatorRunner,
) -> None:
    async with run_operator(demo):
        await k8s.create("finetunejobs", ftj("restart-1"))
        await k8s.wait_for("finetunejobs", "restart-1", lambda o: o["status"]["phase"] == "Created")

    async with run_operator(demo):
        obj = await k8s.wait_for("finetunejobs", "restart-1", lambda o: o["status"].get("resumes") == 1)

    assert demo.calls("create", "restart-1") == 1
    assert demo.calls("resume", "restart-1") == 1
    assert obj["status"]["phase"] == "Created"


async def test_restart_mid_retries_continues_from_the_persisted_progress(
    k8s: Cluster,
    run_operator: OperatorRunner,
) -> None:
    operator = run_operator(demo)
    await operator.start()
    await k8s.create("finetunejobs", ftj("midrun-1", failAttempts=2, retryDelay=1.0))
    # Kopf persists the handler's progress (retries, delays) in an annotation of the object.
    await k8s.wait_for(
        "finetunejobs",
        "midrun-1",
        lambda o: json.loads(o["metadata"]["annotations"][PROGRESS])["retries"] >= 1,
    )
    await operator.stop()
    assert demo.calls("create", "midrun-1") == 1  # stopped while waiting for the 1s retry delay
    await operator.start()  # the same Operator object, started again on the same cluster state

    obj = await k8s.wait_for("finetunejobs", "midrun-1", lambda o: o["status"]["phase"] == "Created")
    await operator.stop()

    # Retries continued from the persisted counter: 3 attempts in total, not 1 + a fresh 3.
    assert obj["status"]["attempts"] == 3
    assert demo.calls("create", "midrun-1") == 3


async def test_events_are_posted(k8s: Cluster, run_operator: OperatorRunner) -> None:
    async with run_operator(demo):
        created = await k8s.create("finetunejobs", ftj("events-1"))
        events = await k8s.wait_events("events-1", reason="Created")

    assert events[0]["message"] == "Created after 1 attempt(s)."
    assert events[0]["type"] == "Normal"
    assert events[0]["involvedObject"]["kind"] == "FineTuneJob"
    assert events[0]["involvedObject"]["uid"] == created["metadata"]["uid"]
    assert events[0]["metadata"]["name"].startswith("kopf-event-")  # generateName is honoured
    listed = await k8s.list("events", namespace="default", field_selector="involvedObject.name=events-1")
    assert [e["metadata"]["name"] for e in listed] == [e["metadata"]["name"] for e in events]


async def test_operator_stops_without_leftover_tasks(k8s: Cluster, run_operator: OperatorRunner) -> None:
    tasks_before = asyncio.all_tasks()
    async with run_operator(demo) as operator:
        assert operator.thread is not None and operator.thread.is_alive()
        thread = operator.thread
    assert not thread.is_alive()
    await asyncio.sleep(0.05)  # let the server side notice the closed watch connections
    assert not {t for t in asyncio.all_tasks() - tasks_before if not t.done()}


async def test_watch_reconnections_lose_no_events(k8s: Cluster, run_operator: OperatorRunner) -> None:
    def short_watches(settings: kopf.OperatorSettings) -> None:
        settings.watching.server_timeout = 0.1  # kopf re-watches from the last seen resourceVersion

    async with run_operator(demo, configure=short_watches):
        for i in range(3):
            await k8s.create("finetunejobs", ftj(f"rewatch-{i}"))
            await k8s.wait_for("finetunejobs", f"rewatch-{i}", lambda o: o["status"]["phase"] == "Created")
            await asyncio.sleep(0.15)  # let the current watch-stream expire
        await k8s.delete("finetunejobs", "rewatch-0")
        await k8s.wait_gone("finetunejobs", "rewatch-0")

    watches = [
        r
        for r in k8s.emulator
        if r.action == kmock.action.WATCH and r.resource is not None and r.resource.plural == "finetunejobs"
    ]
    assert len(watches) >= 3
    assert all(demo.calls("create", f"rewatch-{i}") == 1 for i in range(3))


async def test_operator_failure_is_reported(k8s: Cluster, run_operator: OperatorRunner) -> None:
    registry = kopf.OperatorRegistry()

    @kopf.on.startup(registry=registry)
    def fail(**_: Any) -> None:
        raise kopf.PermanentError("Boom at startup.")

    with pytest.raises(RuntimeError, match=r"exited unexpectedly.*ActivityError"):
        await run_operator(demo, registry=registry, startup_timeout=5).start()


async def test_handlers_for_unserved_resources_fail_fast(k8s: Cluster, run_operator: OperatorRunner) -> None:
    registry = kopf.OperatorRegistry()

    @kopf.on.create("kubetune.dev", "v1alpha1", "inferencegateways", registry=registry)
    def create_fn(**_: Any) -> None:
        pass

    with pytest.raises(LookupError, match="KUBETUNE_RESOURCES"):
        await run_operator(registry=registry).start()


async def test_wait_for_timeout_shows_the_last_state(
    k8s: Cluster,
    wait_for: Callable[..., Awaitable[Any]],
) -> None:
    await k8s.create("finetunejobs", ftj("timeout-1"))
    fetched = await wait_for(lambda: k8s.get("finetunejobs", "timeout-1"), lambda o: o["spec"])  # async probe
    assert fetched["metadata"]["name"] == "timeout-1"
    with pytest.raises(k8s.WaitTimeoutError) as err:
        await k8s.wait_for("finetunejobs", "timeout-1", lambda o: o["status"]["phase"] == "X", timeout=0.1)
    assert "'name': 'timeout-1'" in str(err.value)
    assert "KeyError('status')" in str(err.value)


# ---- the emulator's apiserver semantics (no operator) ---------------------------------------------


async def test_status_subresource_is_separate(k8s: Cluster) -> None:
    created = await k8s.create("finetunejobs", {**ftj("status-1"), "status": {"phase": "Pending"}})
    assert created["status"] == {"phase": "Pending"}  # written via /status by the helper

    patched = await k8s.patch("finetunejobs", "status-1", {"spec": {"epochs": 2}, "status": {"phase": "X"}})
    assert patched["status"] == {"phase": "Pending"}  # the main endpoint ignores status
    assert patched["metadata"]["generation"] == 2

    both = {"status": {"phase": "Running"}, "spec": {"epochs": 9}}
    patched = await k8s.patch("finetunejobs", "status-1", both, subresource="status")
    assert patched["status"] == {"phase": "Running"}
    assert patched["spec"]["epochs"] == 2  # /status ignores everything but status
    assert patched["metadata"]["generation"] == 2


async def test_json_patch_test_failure_is_422_and_merge_patch_deletes_keys(k8s: Cluster) -> None:
    created = await k8s.create("configmaps", {"metadata": {"name": "cm-1"}, "data": {"a": "1", "b": "2"}})
    rv = created["metadata"]["resourceVersion"]

    ops = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": "0"},
        {"op": "add", "path": "/data/c", "value": "3"},
    ]
    with pytest.raises(k8s.ApiError) as err:
        await k8s.patch("configmaps", "cm-1", ops, patch_type="json")
    assert err.value.status == 422

    ops[0]["value"] = rv
    patched = await k8s.patch("configmaps", "cm-1", ops, patch_type="json")
    assert patched["data"] == {"a": "1", "b": "2", "c": "3"}
    assert int(patched["metadata"]["resourceVersion"]) > int(rv)

    patched = await k8s.patch("configmaps", "cm-1", {"data": {"a": None}})
    assert patched["data"] == {"b": "2", "c": "3"}


async def test_finalizers_block_deletion_until_removed(k8s: Cluster) -> None:
    await k8s.create("configmaps", {"metadata": {"name": "cm-2", "finalizers": ["x/y"]}})
    marked = await k8s.delete("configmaps", "cm-2")
    assert marked is not None and marked["metadata"]["deletionTimestamp"]
    assert k8s.peek("configmaps", "cm-2") is not None

    with pytest.raises(k8s.ApiError) as err:
        await k8s.patch("configmaps", "cm-2", {"metadata": {"finalizers": ["x/y", "new/one"]}})
    assert err.value.status == 422

    await k8s.patch("configmaps", "cm-2", {"metadata": {"finalizers": []}})
    assert k8s.peek("configmaps", "cm-2") is None


async def test_owner_references_cascade_deletion(k8s: Cluster) -> None:
    owner = await k8s.create("finetunejobs", ftj("owner-1"))
    ref = {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": "owner-1",
        "uid": owner["metadata"]["uid"],
        "controller": True,
    }
    await k8s.create("configmaps", {"metadata": {"name": "child-1", "ownerReferences": [ref]}})
    await k8s.create("configmaps", {"metadata": {"name": "unrelated-1"}})

    await k8s.delete("finetunejobs", "owner-1")
    assert k8s.peek("configmaps", "child-1") is None
    assert k8s.peek("configmaps", "unrelated-1") is not None


async def test_server_side_apply_creates_then_merges(k8s: Cluster) -> None:
    doc = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm-3"}, "data": {"a": "1"}}
    applied = await k8s.patch("configmaps", "cm-3", doc, patch_type="apply")
    assert applied["data"] == {"a": "1"} and applied["metadata"]["uid"]
    applied = await k8s.patch("configmaps", "cm-3", {**doc, "data": {"b": "2"}}, patch_type="apply")
    assert applied["data"] == {"a": "1", "b": "2"}  # approximated as a merge: no field ownership


async def test_label_selectors_and_unknown_resources(k8s: Cluster) -> None:
    await k8s.create("configmaps", {"metadata": {"name": "l-1", "labels": {"app": "a", "tier": "x"}}})
    await k8s.create("configmaps", {"metadata": {"name": "l-2", "labels": {"app": "b"}}})
    names = [o["metadata"]["name"] for o in await k8s.list("configmaps", label_selector="app in (a,b),!tier")]
    assert names == ["l-2"]

    with pytest.raises(k8s.ApiError) as err:
        await k8s.request("GET", "/apis/kubetune.dev/v1alpha1/namespaces/default/nosuchthings")
    assert err.value.status == 404


async def test_watch_resumes_from_a_resource_version(k8s: Cluster) -> None:
    first = await k8s.create("configmaps", {"metadata": {"name": "w-1"}})
    await k8s.create("configmaps", {"metadata": {"name": "w-2"}})
    await k8s.delete("configmaps", "w-1")

    since = first["metadata"]["resourceVersion"]
    params = {"watch": "true", "resourceVersion": since, "timeoutSeconds": "0.2"}
    async with k8s.session.get("/api/v1/namespaces/default/configmaps", params=params) as response:
        lines = [line async for line in response.content if line.strip()]

    events = [(e["type"], e["object"]["metadata"]["name"]) for e in map(json.loads, lines)]
    assert events == [("ADDED", "w-2"), ("DELETED", "w-1")]
