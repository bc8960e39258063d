"""Fixtures of the real-cluster tests: one etcd + kube-apiserver for the whole session.

``control_plane`` -> :class:`realcluster.control_plane.ControlPlane`
    Started once per session from ``KUBEBUILDER_ASSETS`` or ``../shared/k8s`` (see control_plane.py),
    killed at the end. Without binaries every test here is skipped with one reason saying how to get them.
``kubetune_crds`` -> the names of the CRDs
    ``manifests/crds`` applied server-side, each Established.
``namespace`` -> a fresh namespace name per test (nothing deletes namespaces without the
    controller-manager; the whole cluster goes away with the session).
``client`` -> a lightkube ``AsyncClient`` of the control plane (the operator's, from ``async_client``),
    closed after the test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path

import pytest
from lightkube import AsyncClient, KubeConfig

from kubetune.kube.client import async_client
from realcluster.control_plane import (
    FIELD_MANAGER,
    BinariesUnavailable,
    ControlPlane,
    ManagedProcess,
    find_binaries,
    start_control_plane,
)

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "manifests" / "crds"


_BINARIES = pytest.StashKey[Path | BinariesUnavailable]()


def _binaries(config: pytest.Config) -> Path | BinariesUnavailable:
    """The binaries' directory, looked for (and unpacked) once per session."""
    if _BINARIES not in config.stash:
        try:
            config.stash[_BINARIES] = find_binaries(REPO)
        except BinariesUnavailable as exc:
            config.stash[_BINARIES] = exc
    return config.stash[_BINARIES]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without binaries, skip every real-cluster test by a mark, so that pytest's summary (``-rs``)
    folds them into one line that says how to get the binaries."""
    realcluster = [item for item in items if item.get_closest_marker("realcluster")]
    found = _binaries(config) if realcluster else None
    if isinstance(found, BinariesUnavailable):
        skip = pytest.mark.skip(reason=f"real-cluster tests skipped: {found}")
        for item in realcluster:
            item.add_marker(skip)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Report those skips from one place, so that they fold into one line even across test modules and
    parametrized tests (pytest folds skips by file, line and reason)."""
    report = yield
    if report.skipped and item.get_closest_marker("realcluster"):
        found = _binaries(item.config)
        if isinstance(found, BinariesUnavailable):
            report.longrepr = (__file__, None, f"real-cluster tests skipped: {found}")  # type: ignore[assignment]
    return report


@pytest.fixture(scope="session")
def control_plane(pytestconfig: pytest.Config) -> Iterator[ControlPlane]:
    binaries = _binaries(pytestconfig)
    if isinstance(binaries, BinariesUnavailable):  # a test without the realcluster mark asked for it
        pytest.skip(f"real-cluster tests skipped: {binaries}")
    with start_control_plane(binaries) as plane:
        yield plane


@pytest.fixture(scope="session")
def kubetune_crds(control_plane: ControlPlane) -> list[str]:
    control_plane.kubectl("apply", "--server-side", f"--field-manager={FIELD_MANAGER}", "-f", str(CRD_DIR))
    names = sorted(path.name.removesuffix(".yaml") for path in CRD_DIR.glob("*.yaml"))
    control_plane.kubectl("wait", "--for=condition=Established", "--timeout=90s", "crd", *names)
    return names


@pytest.fixture
def namespace(control_plane: ControlPlane) -> str:
    return control_plane.create_namespace()


@pytest.fixture(scope="session")
def controller_manager(control_plane: ControlPlane, kubetune_crds: list[str]) -> ManagedProcess:
    try:
        return control_plane.start_controller_manager()
    except BinariesUnavailable as exc:  # e.g. setup-envtest's assets: an API server and etcd only
        pytest.skip(f"real-cluster tests of garbage collection skipped: {exc}")


@pytest.fixture
async def client(control_plane: ControlPlane) -> AsyncIterator[AsyncClient]:
    config = KubeConfig.from_file(control_plane.kubeconfig).get()
    assert config is not None
    api: AsyncClient = async_client(config)
    yield api
    await api.close()
