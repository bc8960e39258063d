"""A FineTuneJob's pipeline steps, run from the pipeline ``kubetune compile`` writes (what KFP runs).

Every task's container runs its command from the compiled spec, with the claims and Secret of the
platform spec, as the runtime image's user (KFP sets no securityContext), on a read-only root where
only the pipeline's claims and /tmp (where KFP's launcher writes outputs) are writable (kfp_pods.py),
on the tiny model: the five steps curate, evaluate the base, fine-tune, evaluate the tuned model and
publish.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from kubetune.api.validation import parse_resource
from kubetune.config import OperatorConfig
from kubetune.pipelines.compile import compile_resource
from kubetune_contract.finetune import FineTuneJob
from sandbox.harness import SandboxCluster
from sandbox.kfp_pods import task_pods
from tiny_adapter import ROUTING_ROWS

pytestmark = pytest.mark.slow

RUNTIME_IMAGE = "ghcr.io/kubetune/runtime:0.1.0"
WORKSPACE_CLAIM = "kubetune-workspace"
JOB = {
    "apiVersion": "kubetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "router", "namespace": "team-a", "uid": "6d1c2f0e-aaaa", "generation": 1},
    "spec": {
        "baseModel": {"uri": "pvc://models/tiny-base", "tokenSecretRef": {"name": "hf-token"}},
        "dataset": {"uri": "pvc://datasets/support.jsonl", "format": "instruction"},
        "method": {"type": "lora", "lora": {"r": 4}},
        "training": {"maxSteps": 2, "batchSize": 4, "learningRate": "5e-2", "maxSeqLength": 64},
        "evaluation": {"gates": [], "maxSamples": 4, "maxNewTokens": 4},
        "executor": "kfp",
    },
}
STEP_TIMEOUT_S = 240


def test_the_compiled_finetune_pipeline_runs_step_by_step_as_its_pods(
    cluster: SandboxCluster, tiny_model: Path, tmp_path: Path
) -> None:
    settings = OperatorConfig(
        home=tmp_path / "operator-home",
        artifact_store="pvc://artifacts/kubetune",
        workspace_root=f"pvc://{WORKSPACE_CLAIM}/runs",
        runtime_image=RUNTIME_IMAGE,
    )
    compiled = tmp_path / "pipeline.yaml"
    compile_resource(parse_resource(JOB, FineTuneJob), settings, compiled)
    pods = task_pods(list(yaml.safe_load_all(compiled.read_text(encoding="utf-8"))))
    assert [pod.task for pod in pods][:3] == ["curate", "evaluate-baseline", "finetune"]

    shutil.copytree(tiny_model, cluster.claim("models") / "tiny-base")
    dataset = "".join(json.dumps(row) + "\n" for row in ROUTING_ROWS * 2)
    (cluster.claim("datasets") / "support.jsonl").write_text(dataset, encoding="utf-8")
    for claim in (WORKSPACE_CLAIM, "artifacts"):
        cluster.claim(claim)
    cluster.apply({"kind": "Secret", "metadata": {"name": "hf-token"}, "stringData": {"token": "hf_unused"}})

    for pod in pods:
        assert "securityContext" not in pod.spec["containers"][0]
        output = cluster.run_to_completion(pod.task, pod.spec, timeout_s=STEP_TIMEOUT_S)
        report_file = (
            cluster.root / "pods" / pod.task / "volumes" / "tmp" / pod.outputs["report"][len("/tmp/") :]
        )
        assert report_file.is_file(), f"{pod.task} wrote no report output:\n{output[-3000:]}"

    workspace = cluster.claim(WORKSPACE_CLAIM) / "runs" / "team-a" / "router"
    (run,) = list(workspace.iterdir())
    written = {path.relative_to(run).as_posix() for path in run.rglob("*") if path.is_file()}
    assert any(name.startswith("data/") for name in written), written
    assert any("eval" in name and "baseline" in name for name in written), written
    assert any("eval" in name and "final" in name for name in written), written
    published = cluster.claim("artifacts") / "kubetune"
    manifests = list(published.rglob("kubetune-manifest.json"))
    assert len(manifests) == 1, sorted(str(path) for path in published.rglob("*"))
    manifest = json.loads(manifests[0].read_text(encoding="utf-8"))
    assert manifest["baseModel"]["uri"] == "pvc://models/tiny-base"
