"""`kubetune compile` output is pinned: a change to the pipeline shows up as a golden-file diff.

Regenerate after an intended change with: UPDATE_GOLDEN=1 pytest tests/unit/pipelines/test_compile_golden.py
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from kubetune.api.validation import parse_resource
from kubetune.config import OperatorConfig
from kubetune.pipelines.compile import compile_resource
from kubetune_contract.finetune import FineTuneJob

GOLDEN = Path(__file__).parents[2] / "golden" / "finetune-pipeline.yaml"

JOB = {
    "apiVersion": "kubetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "support-router", "namespace": "ml", "uid": "6d1c2f0e-aaaa", "generation": 3},
    "spec": {
        "baseModel": {"uri": "pvc://models/tiny-base", "tokenSecretRef": {"name": "hf-token"}},
        "dataset": {"uri": "s3://datasets/support.jsonl", "format": "instruction"},
        "method": {"type": "lora", "lora": {"r": 8}},
        "training": {"epochs": 2, "learningRate": "3e-3"},
        "evaluation": {
            "gates": [{"metric": "exactMatch", "minImprovement": "0.3"}],
            "crossValidation": {"folds": 3},
        },
        "executor": "kfp",
    },
}


def test_compiled_pipeline_matches_golden(tmp_path: Path) -> None:
    settings = OperatorConfig(
        home=Path("/var/lib/kubetune"),
        artifact_store="s3://artifacts/kubetune",
        workspace_root="pvc://kubetune-workspace/runs",
        runtime_image="ghcr.io/kubetune/runtime:0.1.0",
    )
    out = tmp_path / "pipeline.yaml"
    compile_resource(parse_resource(JOB, FineTuneJob), settings, out)
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(out.read_text())
    assert out.read_text() == GOLDEN.read_text(), (
        "the compiled pipeline changed; if intended, run UPDATE_GOLDEN=1 pytest " + __file__
    )


def test_compiled_pipeline_is_runnable_on_a_cluster(tmp_path: Path) -> None:
    settings = OperatorConfig(home=tmp_path, workspace_root="pvc://kubetune-workspace/runs")
    out = tmp_path / "pipeline.yaml"
    compile_resource(parse_resource(JOB, FineTuneJob), settings, out)
    docs = list(yaml.safe_load_all(out.read_text()))
    spec, platform = docs[0], docs[1]
    tasks = spec["root"]["dag"]["tasks"]
    assert {t["taskInfo"]["name"] for t in tasks.values()} == {
        "curate",
        "evaluate-baseline",
        "finetune",
        "evaluate-final",
        "for-loop-1",
        "publish",
    }
    assert all(not t.get("cachingOptions", {}).get("enableCache") for t in tasks.values())
    assert set(tasks["publish-model"]["dependentTasks"]) == {
        "evaluate-model",
        "evaluate-model-2",
        "for-loop-1",
    }
    # evaluation.crossValidation: one crossvalidate-fold task per fold, in parallel (no parallelism limit)
    loop = tasks["for-loop-1"]
    assert loop["dependentTasks"] == ["curate-dataset"]
    assert loop["parameterIterator"]["items"] == {"inputParameter": "pipelinechannel--folds"}
    assert "iteratorPolicy" not in loop
    assert list(spec["components"]["comp-for-loop-1"]["dag"]["tasks"]) == ["crossvalidate-fold"]
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["folds"]["defaultValue"] == [0, 1, 2]
    assert params["workspace"]["defaultValue"].startswith(
        "pvc://kubetune-workspace/runs/ml/support-router/g3-"
    )
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for executor in executors.values():
        assert {m["mountPath"] for m in executor["pvcMount"]} == {
            "/mnt/pvc/models",
            "/mnt/pvc/kubetune-workspace",
        }
        assert executor["secretAsEnv"][0]["keyToEnv"] == [{"envVar": "HF_TOKEN", "secretKey": "token"}]
        # writable /tmp under a read-only root filesystem (torch's import, HF_HOME, KFP's outputs)
        assert executor["emptyDirMounts"] == [{"mountPath": "/tmp", "volumeName": "tmp"}]
        assert executor["podMetadata"]["labels"]["kubetune.dev/name"] == "support-router"
