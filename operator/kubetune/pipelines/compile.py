"""`kubetune compile`: a job as a Kubeflow Pipelines package a user can upload in the UI."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from kubetune.config import OperatorConfig
from kubetune_contract.finetune import FineTuneJob


def compile_resource(resource: Any, settings: OperatorConfig, output: Path) -> None:
    from kfp import compiler

    from kubetune.pipelines.registry import build_pipeline, options_from_dict
    from kubetune.plan.finetune import build_request

    if not isinstance(resource, FineTuneJob):
        raise ValueError(f"{type(resource).__name__} has no pipeline")
    request = build_request(resource, settings)
    pipeline = build_pipeline(request.kind, options_from_dict(request.pipeline_options))
    output.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiler.Compiler().compile(
            pipeline,
            str(output),
            pipeline_name=f"kubetune-finetune-{resource.metadata.name}",
            pipeline_parameters={
                "config_json": json.dumps(request.config, sort_keys=True),
                "workspace": request.workspace,
            },
        )
