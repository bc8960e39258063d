"""Which pipeline carries out which kind of job."""

from typing import Any

from kubetune.pipelines.finetune import PipelineOptions, build_finetune_pipeline
from kubetune.pipelines.quantize import build_quantize_pipeline


def options_from_dict(raw: dict[str, Any]) -> PipelineOptions:
    secret = raw.get("token_secret")
    return PipelineOptions(
        image=str(raw.get("image", "kubetune-runtime")),
        pvc_claims=tuple(raw.get("pvc_claims", ())),
        token_secret=(str(secret[0]), str(secret[1])) if secret else None,
        labels=dict(raw.get("labels", {})),
    )


def build_pipeline(kind: str, options: PipelineOptions) -> Any:
    if kind == "FineTuneJob":
        return build_finetune_pipeline(options)
    if kind == "QuantizeJob":
        return build_quantize_pipeline(options)
    raise ValueError(f"no pipeline for kind {kind!r}")
