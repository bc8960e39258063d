"""The standard kubetune pipelines and component specs for the Kubeflow Pipelines UI.

The operator compiles a pipeline per resource (its resolved config and workspace are the run's
arguments). These are the same pipelines for a person in the Kubeflow UI instead: upload one, start a
run and paste a FineTuneJob and/or QuantizeJob (one-line JSON, or YAML) into its parameters. A first step
validates and resolves the job with the operator's own code (same defaults, same error messages naming
the field), then the operator's pipeline runs as a nested pipeline.

Every step mounts the PersistentVolumeClaim ``kubetune-workspace`` at /mnt/pvc/kubetune-workspace; runs
keep their workspace under ``<workspace_root>/<run id>``. ``kubetune compile --standard --out-dir
manifests/kubeflow`` writes them all (components/*.yaml, pipelines/*.yaml), byte for byte reproducibly.

No ``from __future__ import annotations`` here: kfp reads the components' annotations at compile time.
"""

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from kfp import dsl

from kubetune.config import RUNTIME_IMAGE
from kubetune.pipelines.components import STEPS, make_component
from kubetune.pipelines.finetune import PipelineOptions, build_finetune_pipeline, on_cluster
from kubetune.pipelines.quantize import build_quantize_pipeline

WORKSPACE_CLAIM = "kubetune-workspace"
DEFAULT_ARTIFACT_STORE = f"pvc://{WORKSPACE_CLAIM}/artifacts"
DEFAULT_WORKSPACE_ROOT = f"pvc://{WORKSPACE_CLAIM}/ui-runs"
# Pod label on every step of a run started from these pipelines (the operator's runs carry
# kubetune.dev/kind, name, namespace and generation instead).
UI_LABELS = {"kubetune.dev/started-by": "kubeflow-ui"}

# Examples shown as the jobs' default values. One-line JSON: the UI's parameter fields are single-line (and
# kfp writes defaults into the YAML header comment, which a multi-line default would break). The
# resolvers accept YAML too.
EXAMPLE_FINETUNE_JOB = json.dumps(
    {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "support-router"},
        "spec": {
            "baseModel": {"uri": f"pvc://{WORKSPACE_CLAIM}/models/tiny-base"},
            "dataset": {
                "uri": f"pvc://{WORKSPACE_CLAIM}/data/support-tickets.jsonl",
                "format": "instruction",
                "validationSplit": "0.1",
            },
            "method": {"type": "lora", "lora": {"r": 16, "alpha": 32}},
            "training": {"epochs": 4, "learningRate": "3e-3"},
            "evaluation": {"gates": [{"metric": "exactMatch", "minImprovement": "0.3"}]},
        },
    }
)
EXAMPLE_QUANTIZE_JOB = json.dumps(
    {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "QuantizeJob",
        "metadata": {"name": "support-router-int8"},
        "spec": {
            "model": {"uri": f"pvc://{WORKSPACE_CLAIM}/artifacts/default/support-router/v1"},
            "method": {"type": "int8-weight-only"},
            "target": "cpu",
            "evaluation": {"gates": [{"metric": "sizeRatio", "max": "0.5"}]},
        },
    }
)
EXAMPLE_CHAINED_QUANTIZE_JOB = json.dumps(
    {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "QuantizeJob",
        "metadata": {"name": "support-router-int8"},
        "spec": {
            "model": {"fineTuneJobRef": {"name": "support-router"}},
            "method": {"type": "int8-weight-only"},
            "target": "cpu",
            "evaluation": {
                "gates": [
                    {"metric": "perplexityIncrease", "max": "0.05"},
                    {"metric": "sizeRatio", "max": "0.5"},
                ]
            },
        },
    }
)


# kfp reads the outputs from the NamedTuple(...) annotation, which mypy does not accept as a type.
def resolve_finetune_job(
    job: str,
    artifact_store: str,
    workspace_root: str,
    run_id: str,
) -> NamedTuple("Outputs", [("config_json", str), ("workspace", str), ("folds", list)]):  # type: ignore[valid-type]
    """Validate a FineTuneJob (YAML or JSON) and resolve it the way the operator does; `folds` lists the
    folds of its evaluation.crossValidation ([] without), which the pipeline fans out over."""
    import json
    from pathlib import Path

    import yaml

    from kubetune.api.validation import ResourceInvalid, parse_resource
    from kubetune.config import OperatorConfig
    from kubetune.plan.finetune import resolve_config
    from kubetune_contract.finetune import FineTuneJob

    document = yaml.safe_load(job)
    if not isinstance(document, dict):
        raise ValueError("job: paste a FineTuneJob (YAML or JSON), not a scalar or a list")
    try:
        resource = parse_resource(document, FineTuneJob)
    except ResourceInvalid as invalid:
        raise ValueError("job is invalid: " + "; ".join(str(issue) for issue in invalid.issues)) from None
    settings = OperatorConfig(home=Path("/tmp/kubetune"), artifact_store=artifact_store)
    config = resolve_config(resource, settings)
    cross_validation = resource.spec.evaluation.cross_validation
    folds = cross_validation.fold_indices() if cross_validation is not None else []
    return json.dumps(config, sort_keys=True), f"{workspace_root.rstrip('/')}/{run_id}/finetune", folds


def resolve_quantize_job(
    job: str,
    artifact_store: str,
    workspace_root: str,
    run_id: str,
    source_config_json: str = "",
    source_workspace: str = "",
) -> NamedTuple("Outputs", [("config_json", str), ("workspace", str)]):  # type: ignore[valid-type]
    """Validate a QuantizeJob and resolve it the way the operator does.

    Alone, the job names its model by ``spec.model.uri``. After a fine-tune in the same run
    (``source_*`` set), it names that FineTuneJob by ``spec.model.fineTuneJobRef`` and gets the model it
    published (from the fine-tune's workspace, output.json) and, unless it has its own, its dataset.
    """
    import json
    from pathlib import Path

    import yaml

    from kubetune.api.validation import ResourceInvalid, parse_resource
    from kubetune.config import OperatorConfig
    from kubetune.plan.quantize import resolve_config
    from kubetune_components.common.storage import resolve_local_path
    from kubetune_contract.quantize import QuantizeJob

    document = yaml.safe_load(job)
    if not isinstance(document, dict):
        raise ValueError("job: paste a QuantizeJob (YAML or JSON), not a scalar or a list")
    try:
        resource = parse_resource(document, QuantizeJob)
    except ResourceInvalid as invalid:
        raise ValueError("job is invalid: " + "; ".join(str(issue) for issue in invalid.issues)) from None
    ref = resource.spec.model.fine_tune_job_ref
    source = None
    if source_config_json:
        finetune = json.loads(source_config_json)
        name = finetune["metadata"]["name"]
        if ref is None or ref.name != name:
            raise ValueError(
                f"job: spec.model must be fineTuneJobRef: {{name: {name}}} -- this pipeline quantizes what "
                f"FineTuneJob {name} publishes"
            )
        output_file = resolve_local_path(source_workspace) / "output.json"
        if not output_file.is_file():
            raise ValueError(f"FineTuneJob {name} published nothing ({output_file} is missing)")
        source = {"spec": finetune["spec"], "status": {"output": json.loads(output_file.read_text())}}
    elif ref is not None:
        raise ValueError(
            f"job: spec.model.fineTuneJobRef ({ref.name}) is resolved by the operator or by the "
            "fine-tune-then-quantize pipeline; here, give the model as spec.model.uri"
        )
    settings = OperatorConfig(home=Path("/tmp/kubetune"), artifact_store=artifact_store)
    config = resolve_config(resource, source, settings, None)
    return json.dumps(config, sort_keys=True), f"{workspace_root.rstrip('/')}/{run_id}/quantize"


RESOLVE_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "resolve-finetune-job": resolve_finetune_job,
    "resolve-quantize-job": resolve_quantize_job,
}


def component_names() -> list[str]:
    """Every kubetune kfp component: the pipeline steps and the job resolvers."""
    return sorted([*STEPS, *RESOLVE_FUNCTIONS])


def make_standard_component(name: str, image: str = RUNTIME_IMAGE) -> Any:
    """A step's component, or a job resolver: a lightweight component, since it calls the operator's own
    validation and resolution, which have no command line of their own."""
    if name in STEPS:
        return make_component(name, image)
    return dsl.component(RESOLVE_FUNCTIONS[name], base_image=image, install_kfp_package=False)


def _options(pipeline: str, image: str) -> PipelineOptions:
    return PipelineOptions(
        image=image,
        pvc_claims=(WORKSPACE_CLAIM,),
        labels={**UI_LABELS, "kubetune.dev/pipeline": pipeline},
    )


_JOB_PIPELINES: dict[str, Callable[..., Any]] = {
    "finetune": build_finetune_pipeline,
    "quantize": build_quantize_pipeline,
}


def _job_runner(kind: str, options: PipelineOptions, image: str) -> Callable[..., tuple[Any, Any]]:
    """Build the operator's pipeline for a `kind` job outside the pipeline function; call the result
    inside it to add the steps for one pasted job: ``resolve-<kind>-job`` (shown as `display`; `source`
    are its extra arguments; it waits for `after` when given), then that pipeline, nested as `kind`.
    Returns (resolver task, nested pipeline task)."""
    inner = _JOB_PIPELINES[kind](options, name=kind)

    def run(
        display: str,
        job: Any,
        artifact_store: Any,
        workspace_root: Any,
        *,
        after: Any = None,
        **source: Any,
    ) -> tuple[Any, Any]:
        resolver = make_standard_component(f"resolve-{kind}-job", image)
        resolved = on_cluster(
            resolver(
                job=job,
                artifact_store=artifact_store,
                workspace_root=workspace_root,
                run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                **source,
            ),
            options,
            display,
        )
        if after is not None:
            resolved.after(after)
        outputs = resolved.outputs
        folds = {"folds": outputs["folds"]} if kind == "finetune" else {}
        nested = inner(config_json=outputs["config_json"], workspace=outputs["workspace"], **folds)
        return resolved, nested.set_caching_options(False)

    return run


def _one_job_ui_pipeline(kind: str, example_job: str, description: str, image: str) -> Any:
    run_job = _job_runner(kind, _options(kind, image), image)

    @dsl.pipeline(name=f"kubetune-{kind}", description=description)
    def pipeline(
        job: str = example_job,
        artifact_store: str = DEFAULT_ARTIFACT_STORE,
        workspace_root: str = DEFAULT_WORKSPACE_ROOT,
    ) -> None:
        run_job("resolve-job", job, artifact_store, workspace_root)

    return pipeline


def build_finetune_ui_pipeline(image: str = RUNTIME_IMAGE) -> Any:
    return _one_job_ui_pipeline(
        "finetune",
        EXAMPLE_FINETUNE_JOB,
        "kubetune FineTuneJob from the Kubeflow UI: paste the job (JSON, or YAML); it is validated and "
        "resolved like the operator does, then curated, evaluated, fine-tuned, evaluated again and "
        "published if every gate passes. Needs the PVC kubetune-workspace.",
        image,
    )


def build_quantize_ui_pipeline(image: str = RUNTIME_IMAGE) -> Any:
    return _one_job_ui_pipeline(
        "quantize",
        EXAMPLE_QUANTIZE_JOB,
        "kubetune QuantizeJob from the Kubeflow UI: paste the job (JSON, or YAML; with spec.model.uri); "
        "it is validated and resolved like the operator does, then the source is measured, quantized, "
        "measured again and published if every gate passes. Needs the PVC kubetune-workspace.",
        image,
    )


def build_finetune_then_quantize_ui_pipeline(image: str = RUNTIME_IMAGE) -> Any:
    options = _options("finetune-then-quantize", image)
    run_finetune = _job_runner("finetune", options, image)
    run_quantize = _job_runner("quantize", options, image)

    @dsl.pipeline(
        name="kubetune-finetune-then-quantize",
        description="kubetune FineTuneJob, then a QuantizeJob of the model it publishes, from the Kubeflow "
        "UI: paste both jobs (JSON, or YAML; the QuantizeJob names the FineTuneJob in "
        "spec.model.fineTuneJobRef). Needs the PVC kubetune-workspace.",
    )
    def pipeline(
        finetune_job: str = EXAMPLE_FINETUNE_JOB,
        quantize_job: str = EXAMPLE_CHAINED_QUANTIZE_JOB,
        artifact_store: str = DEFAULT_ARTIFACT_STORE,
        workspace_root: str = DEFAULT_WORKSPACE_ROOT,
    ) -> None:
        tuned, trained = run_finetune("resolve-finetune-job", finetune_job, artifact_store, workspace_root)
        run_quantize(
            "resolve-quantize-job",
            quantize_job,
            artifact_store,
            workspace_root,
            after=trained,
            source_config_json=tuned.outputs["config_json"],
            source_workspace=tuned.outputs["workspace"],
        )

    return pipeline


STANDARD_PIPELINES: dict[str, Callable[[str], Any]] = {
    "finetune": build_finetune_ui_pipeline,
    "quantize": build_quantize_ui_pipeline,
    "finetune-then-quantize": build_finetune_then_quantize_ui_pipeline,
}


def compile_standard(out_dir: Path, image: str = RUNTIME_IMAGE) -> list[Path]:
    """Write components/<name>.yaml and pipelines/<name>.yaml under `out_dir`; returns the paths."""
    from kfp import compiler

    written = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in component_names():
            path = out_dir / "components" / f"{name}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            compiler.Compiler().compile(make_standard_component(name, image), str(path))
            written.append(path)
        for name, build in STANDARD_PIPELINES.items():
            path = out_dir / "pipelines" / f"{name}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            compiler.Compiler().compile(build(image), str(path))
            written.append(path)
    return written
