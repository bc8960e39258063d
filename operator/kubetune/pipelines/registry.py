"""Which pipeline carries out which kind of job, and with which arguments."""

import json
from typing import Any

from kubetune.pipelines.finetune import PipelineOptions, build_finetune_pipeline
from kubetune.pipelines.quantize import build_quantize_pipeline
from kubetune_contract.finetune import FineTuneJob


def options_from_dict(raw: dict[str, Any]) -> PipelineOptions:
    secret = raw.get("token_secret")
    return PipelineOptions(
        image=str(raw.get("image", "kubetune-runtime")),
        pvc_claims=tuple(raw.get("pvc_claims", ())),
        token_secret=(str(secret[0]), str(secret[1])) if secret else None,
        labels=dict(raw.get("labels", {})),
    )


def pipeline_arguments(kind: str, config: dict[str, Any], workspace: str) -> dict[str, Any]:
    """The arguments of a run of `kind`'s pipeline for the job's resolved `config`: the config as JSON and
    the workspace, and for a FineTuneJob the folds of its evaluation.crossValidation ([] without)."""
    arguments: dict[str, Any] = {"config_json": json.dumps(config, sort_keys=True), "workspace": workspace}
    if kind == "FineTuneJob":
        cross_validation = FineTuneJob.model_validate(config).spec.evaluation.cross_validation
        arguments["folds"] = cross_validation.fold_indices() if cross_validation is not None else []
    return arguments


def build_pipeline(kind: str, options: PipelineOptions) -> Any:
    if kind == "FineTuneJob":
        return build_finetune_pipeline(options)
    if kind == "QuantizeJob":
        return build_quantize_pipeline(options)
    raise ValueError(f"no pipeline for kind {kind!r}")
