"""The FineTuneJob pipeline: curate -> (baseline eval | fine-tune | folds) -> final eval -> gates + publish.

With evaluation.crossValidation, the ``folds`` argument lists the folds (``[0, 1, ..., k - 1]``; ``[]``
without) and a ``dsl.ParallelFor`` over it runs one ``crossvalidate-fold`` task per fold beside the
fine-tune of the published model; publish waits for them all and summarizes them. On a cluster the folds
run in parallel; kfp's local runner runs them one after the other, since they share this machine.
"""

from dataclasses import dataclass, field
from typing import Any

from kfp import dsl, kubernetes

from kubetune.pipelines.components import make_component, runs_on_subprocess_runner
from kubetune_contract.workspace import PVC_MOUNT_ROOT

FINAL_TASK = "publish"
"""The last task of every kubetune pipeline: its outputs are the run's results."""


@dataclass(frozen=True)
class PipelineOptions:
    """How the steps run on Kubernetes; ignored by the local runner."""

    image: str
    pvc_claims: tuple[str, ...] = ()
    token_secret: tuple[str, str] | None = None
    labels: dict[str, str] = field(default_factory=dict)


STEP_TMP_VOLUME = "tmp"
STEP_TMP_DIR = "/tmp"


def on_cluster(task: Any, options: PipelineOptions, display_name: str) -> Any:
    task.set_display_name(display_name)
    task.set_caching_options(False)  # steps read and write the run's workspace: never skip one
    # A hardened cluster may make the root filesystem read-only: torch's import needs a writable temp
    # dir, the runtime image's HF_HOME is under /tmp and KFP's launcher writes the outputs there.
    kubernetes.empty_dir_mount(task, volume_name=STEP_TMP_VOLUME, mount_path=STEP_TMP_DIR)
    for claim in options.pvc_claims:
        kubernetes.mount_pvc(task, pvc_name=claim, mount_path=f"{PVC_MOUNT_ROOT}/{claim}")
    if options.token_secret is not None:
        secret_name, secret_key = options.token_secret
        kubernetes.use_secret_as_env(
            task, secret_name=secret_name, secret_key_to_env={secret_key: "HF_TOKEN"}
        )
    for key, value in sorted(options.labels.items()):
        kubernetes.add_pod_label(task, key, value)
    return task


def build_finetune_pipeline(options: PipelineOptions, name: str = "kubetune-finetune") -> Any:
    """A kfp pipeline taking the job's resolved config (JSON) and its workspace URI."""
    curate_op = make_component("curate-dataset", options.image)
    evaluate_op = make_component("evaluate-model", options.image)
    finetune_op = make_component("finetune-model", options.image)
    fold_op = make_component("crossvalidate-fold", options.image)
    publish_op = make_component("publish-model", options.image)
    # 0: as many at once as the cluster schedules.
    fold_parallelism = 1 if runs_on_subprocess_runner() else 0

    @dsl.pipeline(
        name=name,
        description="kubetune FineTuneJob: curate the dataset, evaluate the base model, fine-tune, "
        "evaluate the tuned model, and publish it only if every evaluation gate passes; with "
        "evaluation.crossValidation, also train and evaluate each fold (folds: [0, ..., k-1]) in parallel.",
    )
    def finetune_pipeline(config_json: str, workspace: str, folds: list[int]) -> None:
        curate = on_cluster(curate_op(config_json=config_json, workspace=workspace), options, "curate")
        baseline = on_cluster(
            evaluate_op(config_json=config_json, workspace=workspace, which="baseline"),
            options,
            "evaluate-baseline",
        ).after(curate)
        train = on_cluster(finetune_op(config_json=config_json, workspace=workspace), options, "finetune")
        train.after(curate)
        final = on_cluster(
            evaluate_op(config_json=config_json, workspace=workspace, which="final"),
            options,
            "evaluate-final",
        ).after(train)
        with dsl.ParallelFor(folds, parallelism=fold_parallelism) as fold:
            cross_validated = on_cluster(
                fold_op(config_json=config_json, workspace=workspace, fold=fold),
                options,
                "crossvalidate-fold",
            ).after(curate)
        on_cluster(publish_op(config_json=config_json, workspace=workspace), options, FINAL_TASK).after(
            final, baseline, cross_validated
        )

    return finetune_pipeline
