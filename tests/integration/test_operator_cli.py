"""`kubetune operator`, the command the Helm chart runs, as a process against the emulated API server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from fixtures.cluster import Cluster

FAKE_STEPS = Path(__file__).parent / "fake_steps"


async def test_kubetune_operator_reconciles_and_stops_cleanly(k8s: Cluster, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "emulator", "cluster": {"server": k8s.url}}],
                "users": [{"name": "tester", "user": {"token": "test"}}],
                "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "tester"}}],
                "current-context": "emulator",
            }
        )
    )
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "KUBETUNE_HOME": str(tmp_path / "home"),
        "KUBETUNE_RECONCILE_INTERVAL": "0.5",
        "PYTHONPATH": os.pathsep.join([str(FAKE_STEPS), os.environ.get("PYTHONPATH", "")]),
    }
    operator = subprocess.Popen(
        [sys.executable, "-m", "kubetune", "operator", "--namespace", "default", "--liveness-port", "0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    failure: BaseException | None = None
    try:
        await k8s.create(
            "finetunejobs",
            {
                "apiVersion": "kubetune.dev/v1alpha1",
                "kind": "FineTuneJob",
                "metadata": {"name": "via-cli"},
                "spec": {"baseModel": {"uri": "/models/base"}, "dataset": {"uri": "/data/train.jsonl"}},
            },
        )
        done = await k8s.wait_for(
            "finetunejobs",
            "via-cli",
            lambda o: o["status"]["phase"] == "Succeeded",
            timeout=30,
        )
        assert done["status"]["pipelineRun"]["backend"] == "local"
    except BaseException as exc:
        failure = exc
    finally:
        operator.send_signal(signal.SIGINT)
        output, _ = operator.communicate(timeout=60)
    assert failure is None, f"{failure}\n--- operator output\n{output[-6000:]}"
    assert operator.returncode == 0, output
