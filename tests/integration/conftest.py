"""Integration-test harness: a real Kopf operator against kmock's in-memory Kubernetes API.

Fixtures (function-scoped; everything async -- ``asyncio_mode=auto``):

``k8s`` -> :class:`Cluster`
    A :class:`KubeEmulator` (a ``kmock.KubernetesEmulator`` subclass with apiserver semantics)
    served over HTTP on ``127.0.0.1:<free port>`` (``k8s.url``), with the kubetune CRDs
    (:data:`KUBETUNE_RESOURCES`) and builtins (:data:`BUILTIN_RESOURCES`) served for discovery.
    Async helpers go through the real HTTP API: ``create``, ``get``, ``list``, ``patch``
    (merge/json/strategic/apply), ``replace``, ``delete``, ``request`` (raw); errors raise
    ``k8s.ApiError`` (``.status``, ``.reason``). Sync helpers read the in-memory state directly:
    ``peek`` (None if absent), ``history`` (all versions), ``events`` (core v1 Events).
    Polling: ``await k8s.wait_for(resource, name, predicate)`` -> the object, ``wait_gone``,
    ``wait_events``. Resources are named by plural (``"finetunejobs"``), ``"group/version/plural"``,
    kind, or a :class:`ResourceSpec`; namespaced ones default to ``namespace="default"``.

``run_operator`` -> :class:`OperatorRunner`
    ``async with run_operator("kubetune.handlers.jobs", ...) as op:`` runs Kopf with only
    those modules' handlers, in its own thread and
    event loop; entering returns once kopf is ready and watching every handled resource; exiting
    stops it gracefully and joins its threads. Enter it again (or ``await op.restart()``, or
    ``op.stop()`` + ``op.start()``) for "the operator restarted": the emulator keeps the state
    (annotations with kopf's progress, status, finalizers). A crashed operator fails the next
    ``wait_for`` at once. Options: ``namespaces=[...]``, ``configure=fn(settings)``, ``memo=``,
    ``registry=``; settings are tuned for tests in :func:`tune_settings`.

``wait_for`` -> the generic poller :func:`wait_for`: ``await wait_for(probe, predicate, timeout=...)``.

``redis`` (module-scoped) -> a real ``redis-server`` without a password (:mod:`redis_server`).

Example::

    async def test_it(k8s: Cluster, run_operator: OperatorRunner) -> None:
        async with run_operator("kubetune.handlers.jobs"):
            await k8s.create("finetunejobs", {"metadata": {"name": "x"}, "spec": {...}})
            obj = await k8s.wait_for("finetunejobs", "x", lambda o: o["status"]["phase"] == "Succeeded")

The ``k8s`` fixture also writes a kubeconfig for the emulator and points ``KUBECONFIG`` at it: the
operator's login handler (kubetune.handlers.login) and its Kubernetes client read it, as they read
a real cluster's; a registry without a login handler logs in with ``kopf.login_with_kubeconfig``.

The classes live in the ``fixtures`` package (one module per part, see fixtures/__init__.py); test
modules import them from there, never from conftest.py (pytest imports every conftest.py under the
same module name).

Why a thread for the operator: on exit, ``kopf.operator()`` cancels *every* task of its event
loop that appeared while it ran (it cannot tell its own ones apart): in the test's loop, that
would hit the emulator's server-side connections and the test's own tasks. In its own loop it
owns everything there. Sync handlers run in kopf's thread pool, which is shut down on stop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import pytest
from fixtures.cluster import TEST_AGENT, Cluster, write_kubeconfig
from fixtures.kmock_api import FastShutdownServer, KubeEmulator
from fixtures.operator import OperatorRunner
from fixtures.polling import wait_for
from fixtures.resources import BUILTIN_RESOURCES, KUBETUNE_RESOURCES, ResourceSpec
from lightkube import AsyncClient

from kubetune.kube.client import async_client, cluster_config
from redis_server import RedisServer, running_redis


@pytest.fixture
async def k8s(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cluster]:
    """A started emulator on 127.0.0.1 with the kubetune + builtin resources registered, and
    ``KUBECONFIG`` naming it."""
    emulator = KubeEmulator()
    emulator.register(*KUBETUNE_RESOURCES, *BUILTIN_RESOURCES)
    async with (
        emulator,
        kmock.Server(emulator, server_cls=FastShutdownServer) as server,
        aiohttp.ClientSession(base_url=server.url, headers={"User-Agent": TEST_AGENT}) as session,
    ):
        cluster = Cluster(emulator, server, session)
        monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path / "kubeconfig", cluster.url)))
        yield cluster


@pytest.fixture
async def run_operator(k8s: Cluster) -> AsyncIterator[OperatorRunner]:
    """A factory of operators on the ``k8s`` emulator; any left running are stopped at teardown."""
    runner = OperatorRunner(k8s)
    try:
        yield runner
    finally:
        for operator in runner.created:
            await operator.stop()


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real ``redis-server`` (no password) shared by the tests of one module."""
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(name="wait_for")
def wait_for_fixture() -> Callable[..., Awaitable[Any]]:
    """The generic poller: ``await wait_for(probe, predicate, timeout=...)`` (see :func:`wait_for`)."""
    return wait_for


@pytest.fixture
async def cluster(k8s: Cluster) -> Cluster:
    """The emulator, serving ModelDeployments too (before any operator starts: discovery)."""
    try:
        k8s.resource("modeldeployments")
    except LookupError:
        k8s.register(ResourceSpec("kubetune.dev", "v1alpha1", "modeldeployments", "ModelDeployment"))
    return k8s


@pytest.fixture
async def api(cluster: Cluster) -> AsyncIterator[AsyncClient]:
    """The client the operator makes, from the same kubeconfig (the k8s fixture's, for the emulator)."""
    client = async_client(cluster_config())
    try:
        yield client
    finally:
        await client.close()
