"""The real ``kubetune operator`` process on the real API server, as its ServiceAccount under chart RBAC.

:func:`install_operator_rbac` renders the Helm chart (as tests/unit/charts does, offline) and applies only
its ServiceAccount and RBAC objects: cluster-wide a ClusterRole + ClusterRoleBinding, with
``watchNamespaces`` a Role + RoleBinding in each. :func:`run_operator` starts ``python -m kubetune
operator`` with a kubeconfig holding that ServiceAccount's token, so every call it makes is authorized
by exactly the generated rules, and stops it with Ctrl-C; :func:`start_operator` starts one the caller
stops (or SIGKILLs, and starts again on the same state). Pipeline steps run locally: the fast stand-in
steps of tests/integration/fake_steps shadow ``kubetune_components`` through ``PYTHONPATH``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

from realcluster.control_plane import FIELD_MANAGER, ControlPlane

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubetune"
FAKE_STEPS = REPO / "tests" / "integration" / "fake_steps"
RELEASE = "kubetune"  # the chart's full name, and so its ServiceAccount's and its roles' names
RBAC_KINDS = frozenset({"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"})
STOP_TIMEOUT_S = 60.0
# Found in what Kopf and lightkube log when the API server refuses a request for lack of permission
# ("... is forbidden: User ... cannot ...", Kopf's APIForbiddenError).
FORBIDDEN = re.compile(r"forbidden", re.IGNORECASE)


@dataclass(frozen=True)
class OperatorIdentity:
    """The operator's ServiceAccount, as the chart named it, and a kubeconfig that authenticates as it."""

    namespace: str
    name: str
    kubeconfig: Path

    @property
    def username(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.name}"


def rendered_rbac(values: dict[str, Any], release_namespace: str) -> list[dict[str, Any]]:
    """The chart's ServiceAccount, (Cluster)Roles and their bindings, rendered with ``values``."""
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values, name=RELEASE, namespace=release_namespace)
    documents = [
        document
        for file_name, text in rendered.items()
        if file_name.endswith(".yaml")
        for document in yaml.safe_load_all(text)
        if document
    ]
    rbac = [document for document in documents if document["kind"] in RBAC_KINDS]
    for document in rbac:  # helm install sets the release namespace on objects that name none
        if document["kind"] in ("ServiceAccount", "Role", "RoleBinding"):
            document["metadata"].setdefault("namespace", release_namespace)
    return rbac


def install_operator_rbac(
    plane: ControlPlane, release_namespace: str, watch_namespaces: list[str]
) -> OperatorIdentity:
    """Apply the chart's RBAC (cluster-wide without ``watch_namespaces``) and log in as its ServiceAccount."""
    documents = rendered_rbac({"watchNamespaces": watch_namespaces}, release_namespace)
    plane.kubectl(
        "apply",
        "--server-side",
        f"--field-manager={FIELD_MANAGER}",
        "-f",
        "-",
        stdin=yaml.safe_dump_all(documents),
    )
    (account,) = [document for document in documents if document["kind"] == "ServiceAccount"]
    name = account["metadata"]["name"]
    kubeconfig = plane.service_account_kubeconfig(release_namespace, name)
    return OperatorIdentity(release_namespace, name, kubeconfig)


@dataclass
class OperatorProcess:
    """A running ``kubetune operator`` and where its output goes."""

    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def check_running(self) -> None:
        """Fail (with the log's tail) if the operator has exited."""
        if self.process.poll() is not None:
            raise AssertionError(f"the operator exited with {self.process.returncode}:\n{self.log()[-6000:]}")

    def kill(self) -> None:
        """SIGKILL: no cleanup handler runs, as when a node dies or the kernel's OOM killer strikes."""
        self.process.kill()
        self.process.wait()

    def forbidden_lines(self) -> list[str]:
        return [line for line in self.log().splitlines() if FORBIDDEN.search(line)]


def operator_environment(
    identity: OperatorIdentity, workdir: Path, extra_env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of ``kubetune operator`` in these tests: the local executor with fast stand-in
    steps, state under ``workdir/home`` (so a restarted operator finds its runs again), no metrics port."""
    return {
        **os.environ,
        "KUBECONFIG": str(identity.kubeconfig),
        "KUBETUNE_HOME": str(workdir / "home"),
        "KUBETUNE_DEFAULT_EXECUTOR": "local",
        "KUBETUNE_RECONCILE_INTERVAL": "0.5",
        "KUBETUNE_RETIRE_GRACE_SECONDS": "0",
        "KUBETUNE_METRICS_PORT": "0",
        "FAKE_STEP_S": "0.05",
        "PYTHONPATH": os.pathsep.join([str(FAKE_STEPS), os.environ.get("PYTHONPATH", "")]),
        **(extra_env or {}),
    }


def start_operator(
    identity: OperatorIdentity,
    workdir: Path,
    namespaces: Sequence[str] = (),
    extra_env: Mapping[str, str] | None = None,
) -> OperatorProcess:
    """Start ``kubetune operator [--namespace NS ...]`` as ``identity``; its output is appended to
    ``workdir/operator.log`` (a restarted operator continues the same log). The caller stops it."""
    workdir.mkdir(parents=True, exist_ok=True)
    arguments = [arg for namespace in namespaces for arg in ("--namespace", namespace)]
    log_path = workdir / "operator.log"
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "kubetune", "operator", "--liveness-port", "0", *arguments],
            env=operator_environment(identity, workdir, extra_env),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    return OperatorProcess(process, log_path)


@contextlib.contextmanager
def run_operator(
    identity: OperatorIdentity,
    workdir: Path,
    namespaces: Sequence[str] = (),
    extra_env: Mapping[str, str] | None = None,
) -> Iterator[OperatorProcess]:
    """``kubetune operator [--namespace NS ...]`` as ``identity``; stopped with Ctrl-C, which must end it
    cleanly (exit status 0) within a minute."""
    operator = start_operator(identity, workdir, namespaces, extra_env)
    process = operator.process
    try:
        yield operator
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise AssertionError(f"the operator ignored Ctrl-C:\n{operator.log()[-6000:]}") from None
    assert process.returncode == 0, (
        f"the operator exited with {process.returncode}:\n{operator.log()[-6000:]}"
    )


def refused_requests(plane: ControlPlane, identity: OperatorIdentity) -> list[str]:
    """The requests ``identity`` made that the API server refused with 403, from its audit log."""
    return [
        f"{event['verb']} {event['requestURI']}"
        for event in plane.audit_events(identity.username)
        if (event.get("responseStatus") or {}).get("code") == 403
    ]
