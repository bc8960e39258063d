"""The QuantizeJob pipeline: measure the source -> quantize -> measure the result -> gates + publish."""

from typing import Any

from kfp import dsl

from kubetune.pipelines.components import make_component
from kubetune.pipelines.finetune import FINAL_TASK, PipelineOptions, on_cluster


def build_quantize_pipeline(options: PipelineOptions, name: str = "kubetune-quantize") -> Any:
    """A kfp pipeline taking the job's resolved config (JSON) and its workspace URI."""
    measure_source_op = make_component("measure-source-model", options.image)
    quantize_op = make_component("quantize-model", options.image)
    measure_quantized_op = make_component("measure-quantized-model", options.image)
    publish_op = make_component("publish-quantized-model", options.image)

    @dsl.pipeline(
        name=name,
        description="kubetune QuantizeJob: measure the source model, quantize it, measure the reloaded "
        "result on the same prompts and data, and publish it only if every quality gate passes.",
    )
    def quantize_pipeline(config_json: str, workspace: str) -> None:
        before = on_cluster(
            measure_source_op(config_json=config_json, workspace=workspace), options, "measure-source"
        )
        quantized = on_cluster(quantize_op(config_json=config_json, workspace=workspace), options, "quantize")
        quantized.after(before)
        after = on_cluster(
            measure_quantized_op(config_json=config_json, workspace=workspace), options, "measure-quantized"
        ).after(quantized)
        on_cluster(publish_op(config_json=config_json, workspace=workspace), options, FINAL_TASK).after(after)

    return quantize_pipeline
