"""`kubetune compile`: a job as a Kubeflow Pipelines package a user can upload in the UI."""

from __future__ import annotations

import warnings
from pathlib import Path

from pydantic import BaseModel

from kubetune.config import OperatorConfig
from kubetune_contract.finetune import FineTuneJob


class NotCompilable(ValueError):
    """Only a FineTuneJob runs as one pipeline; the other kinds have none to compile."""


def compile_resource(resource: BaseModel, settings: OperatorConfig, output: Path) -> None:
    """Write `resource`'s pipeline to `output`; raises :class:`NotCompilable` for a kind without one and
    ``OSError`` when `output` cannot be written."""
    if not isinstance(resource, FineTuneJob):
        kind = type(resource).__name__
        raise NotCompilable(f"a {kind} has no pipeline to compile; only a FineTuneJob has one")

    from kfp import compiler

    from kubetune.pipelines.registry import build_pipeline, options_from_dict, pipeline_arguments
    from kubetune.plan.finetune import build_request

    request = build_request(resource, settings)
    pipeline = build_pipeline(request.kind, options_from_dict(request.pipeline_options))
    output.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiler.Compiler().compile(
            pipeline,
            str(output),
            pipeline_name=f"kubetune-finetune-{resource.metadata.name}",
            pipeline_parameters=pipeline_arguments(request.kind, request.config, request.workspace),
        )
