"""`kubetune operator`, the command the Helm chart runs, as a process against the emulated API server.

What the process does is observed from outside, as a cluster would see it: which namespaces it
watches (the emulator logs every request), whether it looks for CRDs, the metrics it serves and
the jobs it reconciles.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import kmock
from fixtures.cluster import write_kubeconfig
from fixtures.polling import wait_for

from asgi_server import free_port

if TYPE_CHECKING:
    from fixtures.cluster import Cluster

FAKE_STEPS = Path(__file__).parent / "fake_steps"
FINETUNEJOBS = "/apis/kubetune.dev/v1alpha1"


@asynccontextmanager
async def kubetune_operator(
    k8s: Cluster, tmp_path: Path, *args: str, env: Mapping[str, str] | None = None
) -> AsyncIterator[None]:
    """`kubetune operator ARGS` on the emulator (its kubeconfig), stopped with Ctrl-C at the end."""
    process_env = {
        **os.environ,
        "KUBECONFIG": str(write_kubeconfig(tmp_path / "kubeconfig", k8s.url)),
        "KUBETUNE_HOME": str(tmp_path / "home"),
        "KUBETUNE_RECONCILE_INTERVAL": "0.5",
        "KUBETUNE_METRICS_PORT": "0",
        "PYTHONPATH": os.pathsep.join([str(FAKE_STEPS), os.environ.get("PYTHONPATH", "")]),
        **(env or {}),
    }
    operator = subprocess.Popen(
        [sys.executable, "-m", "kubetune", "operator", "--liveness-port", "0", *args],
        env=process_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    failure: BaseException | None = None
    try:
        yield
    except BaseException as exc:
        failure = exc
    finally:
        operator.send_signal(signal.SIGINT)
        output, _ = operator.communicate(timeout=60)
    assert failure is None, f"{failure}\n--- operator output\n{output[-6000:]}"
    assert operator.returncode == 0, output


def finetunejob(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {"baseModel": {"uri": "/models/base"}, "dataset": {"uri": "/data/train.jsonl"}},
    }


def succeeded(obj: dict[str, Any]) -> bool:
    return bool(obj["status"]["phase"] == "Succeeded")


def watches(k8s: Cluster) -> list[kmock.Request]:
    return [r for r in k8s.operator_requests() if r.action == kmock.action.WATCH]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


async def test_with_namespaces_it_watches_only_those_and_serves_metrics_on_the_configured_port(
    k8s: Cluster, tmp_path: Path
) -> None:
    port = free_port()
    async with kubetune_operator(
        k8s, tmp_path, "--namespace", "default", env={"KUBETUNE_METRICS_PORT": str(port)}
    ):
        await k8s.create("finetunejobs", finetunejob("via-cli"))
        done = await k8s.wait_for("finetunejobs", "via-cli", succeeded, timeout=30)
        assert done["status"]["pipelineRun"]["backend"] == "local"
        await wait_for(
            lambda: asyncio.to_thread(scrape, port),
            lambda metrics: 'kubetune_operator_jobs{kind="FineTuneJob",state="Succeeded"} 1.0' in metrics,
        )

    watched = watches(k8s)
    assert {r.url.path for r in watched if r.url.path.startswith(FINETUNEJOBS)} >= {
        f"{FINETUNEJOBS}/namespaces/default/finetunejobs",
        f"{FINETUNEJOBS}/namespaces/default/quantizejobs",
        f"{FINETUNEJOBS}/namespaces/default/modeldeployments",
    }
    assert [r.url.path for r in watched if r.namespace != "default"] == []
    # Nothing to discover at run time: no cluster-scoped CRD or Namespace reads (least privilege).
    cluster_scoped = {"customresourcedefinitions", "namespaces"}
    assert [
        r.url.path for r in k8s.operator_requests() if r.resource and r.resource.plural in cluster_scoped
    ] == []


async def test_without_namespaces_it_watches_the_whole_cluster_and_looks_for_crds(
    k8s: Cluster, tmp_path: Path
) -> None:
    async with kubetune_operator(k8s, tmp_path):
        await k8s.create("finetunejobs", finetunejob("elsewhere"), namespace="team-a")
        await k8s.wait_for("finetunejobs", "elsewhere", succeeded, namespace="team-a", timeout=30)

    watched = {r.url.path for r in watches(k8s)}
    assert f"{FINETUNEJOBS}/finetunejobs" in watched  # every namespace, in one watch
    assert "/apis/apiextensions.k8s.io/v1/customresourcedefinitions" in watched  # CRDs appearing
