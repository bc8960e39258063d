"""kfp v2 lightweight components: the Kubeflow face of ``kubetune_components.finetune.steps``.

Each function body runs inside the pipeline step's container (the kubetune runtime image, which has
``kubetune_components`` installed), so it imports what it needs itself; kfp embeds the source.
Every step reads and writes the run's workspace; the returned JSON string is the step's report,
visible in the Kubeflow UI.
"""

from typing import Any

from kfp import dsl
from kfp.dsl import Metrics, Output


def curate_dataset(config_json: str, workspace: str) -> str:
    """Parse, validate, dedupe, length-filter and split the dataset."""
    import json

    from kubetune_components.common.storage import resolve_local_path
    from kubetune_components.finetune.steps import run_step

    report = run_step("curate", json.loads(config_json), str(resolve_local_path(workspace)))
    return json.dumps(report, sort_keys=True)


def evaluate_model(config_json: str, workspace: str, which: str, metrics: Output[Metrics]) -> str:
    """Held-out evalLoss, perplexity and exactMatch of the base (`baseline`) or tuned (`final`) model."""
    import json

    from kubetune_components.common.storage import resolve_local_path
    from kubetune_components.finetune.steps import run_step

    report = run_step("evaluate", json.loads(config_json), str(resolve_local_path(workspace)), which=which)
    for key, value in report.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.log_metric(f"{which}.{key}", float(value))
    return json.dumps(report, sort_keys=True)


def finetune_model(config_json: str, workspace: str) -> str:
    """Train with the job's method; resumes from the newest checkpoint in the workspace."""
    import json

    from kubetune_components.common.storage import resolve_local_path
    from kubetune_components.finetune.steps import run_step

    report = run_step("finetune", json.loads(config_json), str(resolve_local_path(workspace)))
    return json.dumps(report, sort_keys=True)


def publish_model(config_json: str, workspace: str) -> str:
    """Check the evaluation gates; publish the model and its lineage manifest only if all pass."""
    import json

    from kubetune_components.common.storage import resolve_local_path
    from kubetune_components.finetune.steps import run_step

    report = run_step("publish", json.loads(config_json), str(resolve_local_path(workspace)))
    return json.dumps(report, sort_keys=True)


def measure_source_model(config_json: str, workspace: str) -> str:
    """Size, latency per generated token and held-out quality of the model before quantization."""
    import json

    from kubetune_components.common.storage import resolve_local_path
    from kubetune_components.quantize.steps import run_quantize_step

    report = run_quantize_step("measure-source", json.loads(config_json), str(resolve_local_path(workspace)))
    return json.dumps(report, sort_keys=True)


def quantize_model(config_json: str, workspace: str) -> str:
    """Apply the job's method (PTQ, QAT, pruning or mixed precision) and save the result."""
    import json

    from kubetune_components.common.storage import resolve_local_path
    from kubetune_components.quantize.steps import run_quantize_step

    report = run_quantize_step("quantize", json.loads(config_json), str(resolve_local_path(workspace)))
    return json.dumps(report, sort_keys=True)


def measure_quantized_model(config_json: str, workspace: str) -> str:
    """The same measurements on the quantized model, reloaded the way serving loads it."""
    import json

    from kubetune_components.common.storage import resolve_local_path
    from kubetune_components.quantize.steps import run_quantize_step

    report = run_quantize_step(
        "measure-quantized", json.loads(config_json), str(resolve_local_path(workspace))
    )
    return json.dumps(report, sort_keys=True)


def publish_quantized_model(config_json: str, workspace: str) -> str:
    """Check the quality gates; publish the quantized model with its lineage only if all pass."""
    import json

    from kubetune_components.common.storage import resolve_local_path
    from kubetune_components.quantize.steps import run_quantize_step

    report = run_quantize_step(
        "publish-quantized", json.loads(config_json), str(resolve_local_path(workspace))
    )
    return json.dumps(report, sort_keys=True)


STEP_FUNCTIONS = {
    "curate-dataset": curate_dataset,
    "evaluate-model": evaluate_model,
    "finetune-model": finetune_model,
    "publish-model": publish_model,
    "measure-source-model": measure_source_model,
    "quantize-model": quantize_model,
    "measure-quantized-model": measure_quantized_model,
    "publish-quantized-model": publish_quantized_model,
}


def make_component(step: str, image: str) -> Any:
    """The kfp component for a step, bound to the runtime image that has kubetune_components."""
    return dsl.component(STEP_FUNCTIONS[step], base_image=image, install_kfp_package=False)
