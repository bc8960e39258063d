"""The pipeline steps of a FineTuneJob, one function each, and the command line that runs them.

Every step takes the FineTuneJob as a wire dict (`config`), parses it with the API's models
(kubetune_contract.finetune), and the run's workspace directory (`workspace`, a path or file:// URI);
steps hand their results to each other through files in the workspace (named in
kubetune_contract.workspace.WorkspaceLayout):

    progress.json                       what is happening now (phase, step, loss, ...)
    data/train.jsonl, validation.jsonl  curated splits          (curate)
    data/curation.json                  what curation dropped   (curate)
    evaluation/baseline.json, final.json                        (evaluate)
    checkpoints/step-N/, trained/                               (finetune)
    evaluation/checkpoints.json   periodic evaluations, the one selected (finetune)
    folds/fold-N/                 fold N's own data/, trained/, evaluation/final.json (crossvalidate)
    evaluation/cross-validation.json   the folds' metrics: mean, std, per fold (publish)
    gates.json, output.json                                     (publish)
    error.json                          {step, reason, message} when a step fails

    python -m kubetune_components.finetune.steps curate   --config job.json --workspace /work/run
    python -m kubetune_components.finetune.steps evaluate --which baseline \
        --config job.json --workspace /work/run

A pipeline step passes the config as ``--config-json JSON`` and keeps the report with ``--report FILE``
(its ``report`` output); on Kubeflow, evaluate also gets ``--kfp-executor-input '{{$}}'`` and logs its
numbers (baseline.evalLoss, ...) as the task's metrics, which the Kubeflow UI shows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, cast

from kubetune_components import data
from kubetune_components.common import models, storage
from kubetune_components.common.errors import ComponentError, ConfigError
from kubetune_components.common.jobs import parse_finetune_job
from kubetune_components.common.progress import ProgressReporter
from kubetune_components.finetune import distributed, trainjob
from kubetune_components.finetune.checkpoints import list_checkpoints
from kubetune_components.finetune.crossvalidation import (
    check_fold_count,
    run_fold,
    write_cross_validation_summary,
)
from kubetune_components.finetune.evaluate import run_evaluation
from kubetune_components.finetune.loop import StepHook
from kubetune_components.finetune.publish import run_publish
from kubetune_components.finetune.signals import StopRequest, TrainingInterrupted, stop_on_sigterm
from kubetune_components.finetune.train import configuration_fingerprint, read_training_record, run_finetune
from kubetune_contract.common import as_float
from kubetune_contract.finetune import Distributed, FineTuneJobSpec
from kubetune_contract.workspace import WORKSPACE_REPORT_OUTPUT, WorkspaceLayout, WorkspaceReport

EXIT_INTERRUPTED = 143
"""128 + SIGTERM: the step stopped on request after saving a checkpoint; running it again resumes."""


def workspace_dir(workspace: str) -> Path:
    path = storage.resolve_local_path(workspace)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_jsonl(path: Path, examples: Sequence[Mapping[str, Any]]) -> None:
    storage.atomic_write_text(
        path, "".join(json.dumps(example, ensure_ascii=False) + "\n" for example in examples)
    )


def curate(config: dict[str, Any], workspace: str) -> dict[str, Any]:
    """Load the dataset, screen it for PII, dedupe and filter it, split off validation; writes data/*."""
    spec = parse_finetune_job(config).spec
    root = workspace_dir(workspace)
    ProgressReporter(root).set_phase("curating")
    dataset = spec.dataset
    tokenizer = models.load_tokenizer(spec.base_model.uri)

    def curated(examples: Sequence[dict[str, Any]], validation_split: float) -> data.CurationResult:
        return data.curate_per_spec(
            examples, tokenizer, dataset, validation_split, max_seq_length=spec.training.max_seq_length
        )

    screened = data.load_screened_examples(dataset.uri, dataset)
    examples = screened.examples
    report: dict[str, Any]
    if dataset.validation_uri:
        result = curated(examples, 0.0)
        held_out_screened = data.load_screened_examples(dataset.validation_uri, dataset)
        held_out = curated(held_out_screened.examples, 0.0)
        validation = held_out.train
        # An example in both files would be graded on what it was trained on: keep it out of training.
        held_out_keys = {data.dedupe_key(example) for example in validation}
        train = [example for example in result.train if data.dedupe_key(example) not in held_out_keys]
        report = {
            **result.report,
            "train": len(train),
            "validation": len(validation),
            "alsoInValidation": len(result.train) - len(train),
            "validationFile": {**held_out.report, "pii": held_out_screened.report},
        }
    else:
        result = curated(examples, as_float(dataset.validation_split))
        train, validation = result.train, result.validation
        report = dict(result.report)
    report["pii"] = screened.report
    if spec.evaluation.cross_validation is not None:
        check_fold_count(spec.evaluation.cross_validation.folds, len(train))
    write_jsonl(root / WorkspaceLayout.TRAIN_SPLIT, train)
    write_jsonl(root / WorkspaceLayout.VALIDATION_SPLIT, validation)
    storage.atomic_write_json(root / WorkspaceLayout.CURATION, report)
    return report


def evaluate(config: dict[str, Any], workspace: str, which: str = "final") -> dict[str, Any]:
    """Metrics of the base model (`baseline`) or the tuned one (`final`); writes evaluation/{which}.json."""
    spec = parse_finetune_job(config).spec
    root = workspace_dir(workspace)
    if which not in ("baseline", "final"):
        raise ConfigError(f"evaluate: which must be baseline or final, got {which!r}")
    return run_evaluation(
        spec, root, cast(Literal["baseline", "final"], which), progress=ProgressReporter(root)
    )


def finetune(
    config: dict[str, Any],
    workspace: str,
    on_step: StepHook | None = None,
    launcher: str = "local",
    image: str | None = None,
) -> dict[str, Any]:
    """Train (resuming from the newest checkpoint of the same configuration); writes trained/.

    With training.distributed, the `launcher` starts the training processes: ``local`` runs this step
    again under torchrun on this machine (see distributed.py), ``trainjob`` (on a cluster) runs it on
    `image` in a Kubeflow Trainer TrainJob and follows that (see trainjob.py); either way the step
    reports what rank 0 wrote.
    """
    spec = parse_finetune_job(config).spec
    root = workspace_dir(workspace)
    ranks = distributed.ranks_from_environment()
    progress = ProgressReporter(root)
    if ranks.is_main:
        progress.set_phase("training")
    wanted = spec.training.distributed
    if wanted is not None and not ranks.distributed and not is_trained(spec, root):
        if launcher == "trainjob":
            if not image:
                raise ConfigError("finetune --launcher trainjob needs --image (the image of the TrainJob)")
            return finetune_on_trainer(config, workspace, root, image)
        if distributed.needs_launch(wanted):
            return finetune_in_processes(config, root, wanted)
    return run_finetune(spec, root, progress=progress, on_step=on_step)


def is_trained(spec: FineTuneJobSpec, root: Path) -> bool:
    """Whether trained/ holds this configuration's model already (then the step only reports it)."""
    train_file = root / WorkspaceLayout.TRAIN_SPLIT
    record = read_training_record(root / WorkspaceLayout.TRAINED)
    return (
        record is not None
        and train_file.is_file()
        and record.get("fingerprint") == configuration_fingerprint(spec, train_file)
    )


def finetune_on_trainer(config: dict[str, Any], workspace: str, root: Path, image: str) -> dict[str, Any]:
    """Create the run's TrainJob (or take the one an earlier attempt created) and follow it to its end."""
    namespace = trainjob.own_namespace()
    api = trainjob.in_cluster_api()
    manifest = trainjob.render_trainjob(config, workspace, image=image, namespace=namespace)
    name = trainjob.submit(api, manifest)
    print(f"training in TrainJob {namespace}/{name}", flush=True)
    stop = StopRequest()
    with stop_on_sigterm(stop):
        trainjob.follow(api, namespace, name, stop=stop)
    record = read_training_record(root / WorkspaceLayout.TRAINED)
    if record is None:
        raise ComponentError(
            f"TrainJob {namespace}/{name} completed but {root / WorkspaceLayout.TRAINED} holds no model",
            "TrainJobFailed",
        )
    return {**record, "trainJob": name}


def finetune_in_processes(config: dict[str, Any], root: Path, settings: Distributed) -> dict[str, Any]:
    """Run the finetune step under torchrun in `settings.world_size` processes; their rank 0's summary.

    A failing process's error.json is the step's error; a stop (SIGTERM, passed on to the processes by
    torchrun) ends as TrainingInterrupted at the checkpoint rank 0 saved.
    """
    command = distributed.torchrun_command(
        settings,
        # The module by name: run as ``python -m`` (KFP, a TrainJob), this module's __name__ is __main__.
        [
            "-m",
            trainjob.STEPS_MODULE,
            "finetune",
            "--config-json",
            json.dumps(config),
            "--workspace",
            str(root),
        ],
    )
    with contextlib.suppress(FileNotFoundError):
        (root / WorkspaceLayout.ERROR).unlink()
    stop = StopRequest()
    with stop_on_sigterm(stop):
        # Output is the processes' own: torchrun prefixes nothing unless asked, so the log reads as one.
        completed = subprocess.run(command, check=False)
    if completed.returncode == 0:
        record = read_training_record(root / WorkspaceLayout.TRAINED)
        if record is None:
            raise ComponentError(f"torchrun exited 0 but {root / WorkspaceLayout.TRAINED} holds no model")
        return record
    try:
        error = json.loads((root / WorkspaceLayout.ERROR).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        error = None
    if isinstance(error, dict) and error.get("message"):
        raise ComponentError(str(error["message"]), str(error.get("reason") or "") or None)
    if stop.requested or completed.returncode in (EXIT_INTERRUPTED, -15):
        checkpoints = list_checkpoints(root / WorkspaceLayout.CHECKPOINTS)
        newest = checkpoints[-1] if checkpoints else None
        raise TrainingInterrupted(
            newest.step if newest is not None else 0,
            newest.path if newest is not None else None,
            stop.reason or "a training process stopped",
        )
    raise ComponentError(
        f"the training processes failed (torchrun exited {completed.returncode}); see the step's log",
        "TrainingProcessFailed",
    )


def crossvalidate(config: dict[str, Any], workspace: str, fold: int) -> dict[str, Any]:
    """Train fold `fold` of evaluation.crossValidation on the other parts of the curated training examples
    and evaluate it on its own part; writes folds/fold-<fold>/ (see crossvalidation.py)."""
    spec = parse_finetune_job(config).spec
    return run_fold(spec, workspace_dir(workspace), fold)


def publish(config: dict[str, Any], workspace: str) -> dict[str, Any]:
    """Summarize the folds of a cross-validation (evaluation/cross-validation.json), check the gates, then
    export and publish the model and its manifest; writes gates.json, output.json."""
    job = parse_finetune_job(config)
    root = workspace_dir(workspace)
    write_cross_validation_summary(job.spec, root)
    return run_publish(job, root, progress=ProgressReporter(root))


STEPS: dict[str, Callable[..., dict[str, Any]]] = {
    "curate": curate,
    "evaluate": evaluate,
    "finetune": finetune,
    "crossvalidate": crossvalidate,
    "publish": publish,
}


def run_step(name: str, config: dict[str, Any], workspace: str, **kwargs: Any) -> dict[str, Any]:
    """Run step `name`; when it fails, error.json says why (the exception is re-raised).

    `evaluate-baseline` and `evaluate-final` are accepted as names of the evaluate step.
    """
    if name.startswith("evaluate-"):
        kwargs.setdefault("which", name.removeprefix("evaluate-"))
        name = "evaluate"
    root = workspace_dir(workspace)
    error_path = root / WorkspaceLayout.ERROR
    with contextlib.suppress(FileNotFoundError):
        error_path.unlink()  # a stale error of an earlier attempt
    try:
        step = STEPS.get(name)
        if step is None:
            raise ConfigError(f"unknown step {name!r}; steps are {', '.join(STEPS)}")
        return step(config, workspace, **kwargs)
    except ComponentError as error:
        storage.atomic_write_json(
            error_path, {"step": name, "reason": error.reason, "message": error.message}
        )
        raise
    except TrainingInterrupted:
        raise
    except Exception as error:
        # Not a failure a user can act on, but the operator still deserves to know what happened.
        message = f"{type(error).__name__}: {error}"
        storage.atomic_write_json(error_path, {"step": name, "reason": "InternalError", "message": message})
        raise


def cpu_quota() -> int | None:
    """CPUs the container may use per its cgroup (v2 or v1) limit, or None when unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text().strip()
            period = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    if quota in ("max", "-1"):
        return None
    try:
        return max(1, math.ceil(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def match_threads_to_cpus() -> None:
    """torch starts one thread per host core; in a pod limited to fewer CPUs that oversubscribes badly.

    An explicit OMP_NUM_THREADS is left alone.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return
    import torch

    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cpu_quota()
    threads = min(available, quota) if quota is not None else available
    if threads < torch.get_num_threads():
        torch.set_num_threads(threads)


def _quiet_libraries() -> None:
    with contextlib.suppress(Exception):
        from transformers.utils import logging

        transformers_logging: Any = logging
        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()


def add_step_arguments(parser: argparse.ArgumentParser, steps: Sequence[str], kind: str) -> None:
    """The arguments every step's command line takes: the step, the `kind` job's config, the run's
    workspace and where to keep the report."""
    parser.add_argument("step", choices=steps)
    config = parser.add_mutually_exclusive_group(required=True)
    config.add_argument("--config", metavar="FILE", help=f"the {kind} as JSON: a file, or - for stdin")
    config.add_argument("--config-json", metavar="JSON", help=f"the {kind} as a JSON string")
    parser.add_argument("--workspace", required=True, help="the run's workspace directory (path or file://)")
    parser.add_argument(
        "--report", metavar="FILE", help="also write the report (printed when the step succeeds) to FILE"
    )
    parser.add_argument(
        "--workspace-report",
        metavar="FILE",
        help="when the step succeeds, write everything the workspace reports so far (progress, "
        f"evaluations, gates, output, ...) as one JSON object to FILE (the {WORKSPACE_REPORT_OUTPUT!r} "
        "output, which the operator reads from Kubeflow Pipelines)",
    )


def start_step_process(config_file: str | None, config_json: str | None = None) -> dict[str, Any] | None:
    """What every step's command line does first: quiet the ML libraries, size torch's thread pool,
    and read the job's config (`config_json`, or the file `config_file`, - for stdin). None, after
    saying why, if it can't be read."""
    _quiet_libraries()
    match_threads_to_cpus()
    source = "--config-json" if config_json is not None else str(config_file)
    try:
        if config_json is not None:
            raw = config_json
        elif config_file == "-":
            raw = sys.stdin.read()
        else:
            raw = Path(str(config_file)).read_text(encoding="utf-8")
        config = json.loads(raw)
        if not isinstance(config, dict):
            raise ValueError(f"expected a JSON object, got {type(config).__name__}")
    except (OSError, ValueError) as error:
        print(f"cannot read the config {source}: {error}", file=sys.stderr)
        return None
    return config


def finish_step(report: Mapping[str, Any], report_file: str | None) -> None:
    """Hand a successful step's report on: printed (the pod's log), and kept in `report_file` if given
    (the component's `report` output)."""
    text = json.dumps(report, indent=2, sort_keys=True) + "\n"
    if report_file is not None:
        storage.atomic_write_text(Path(report_file), text)
    print(text, end="")


def publish_workspace_report(workspace: str, workspace_report_file: str | None) -> None:
    """Keep the whole workspace report as it stands after a successful step in `workspace_report_file`:
    an operator that cannot mount the run's workspace (the claim is in another namespace) reads this."""
    if workspace_report_file is not None:
        storage.atomic_write_text(Path(workspace_report_file), WorkspaceReport.read(workspace).to_json())


def evaluation_metrics(which: str, report: Mapping[str, Any]) -> dict[str, float]:
    """Every number of an evaluation report, named as the Kubeflow UI shows it: baseline.evalLoss, ...,
    and each reference set's score: baseline.reference.<name>.<metric>."""
    numbers = {
        f"{which}.{key}": float(value)
        for key, value in report.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
    references = report.get("reference")
    for name, score in (references if isinstance(references, Mapping) else {}).items():
        value = score.get("value") if isinstance(score, Mapping) else None
        if isinstance(value, int | float) and not isinstance(value, bool):
            numbers[f"{which}.reference.{name}.{score.get('metric')}"] = float(value)
    return numbers


def evaluated_model(step: str, which: str | None) -> str:
    """The model an evaluate command line grades: --which, else the step's (evaluate-baseline), else final."""
    return which or (step.removeprefix("evaluate-") if step.startswith("evaluate-") else "final")


@dataclass(frozen=True)
class KfpMetricsOutput:
    """A KFP task's system.Metrics output artifact, which a container component logs to as kfp's Python
    executor does for a lightweight component's ``Output[Metrics]``.

    KFP's launcher hands the task its ExecutorInput (the ``{{$}}`` placeholder) and, once the command
    exits, reads the ExecutorOutput file named in it (outputs.outputFile) and merges each output
    artifact's metadata there into what it records for the run, which is what the UI's metrics show.
    """

    OUTPUT_NAME: ClassVar[str] = "metrics"

    executor_output_file: Path
    name: str
    uri: str
    metadata: Mapping[str, Any]

    @classmethod
    def from_executor_input(cls, executor_input_json: str) -> KfpMetricsOutput:
        """Raises ValueError unless `executor_input_json` is an executor input with a metrics output."""
        try:
            outputs = json.loads(executor_input_json)["outputs"]
            artifact = outputs["artifacts"][cls.OUTPUT_NAME]["artifacts"][0]
            return cls(
                Path(outputs["outputFile"]),
                artifact.get("name", ""),
                artifact.get("uri", ""),
                artifact.get("metadata", {}),
            )
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as error:
            raise ValueError(
                f"not a KFP executor input with a {cls.OUTPUT_NAME!r} output artifact "
                f"({type(error).__name__}: {error})"
            ) from None

    def log(self, metrics: Mapping[str, float]) -> None:
        logged = {"name": self.name, "uri": self.uri, "metadata": {**self.metadata, **metrics}}
        storage.atomic_write_json(
            self.executor_output_file, {"artifacts": {self.OUTPUT_NAME: {"artifacts": [logged]}}}
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kubetune_components.finetune.steps", description=__doc__.split("\n")[0]
    )
    add_step_arguments(parser, [*STEPS, "evaluate-baseline", "evaluate-final"], "FineTuneJob")
    parser.add_argument(
        "--which", choices=["baseline", "final"], help="evaluate: which model (default final)"
    )
    parser.add_argument(
        "--launcher",
        choices=["local", "trainjob"],
        default="local",
        help="finetune with training.distributed: start the training processes with torchrun here "
        "(local), or in a Kubeflow Trainer TrainJob on --image (trainjob, in a pipeline pod)",
    )
    parser.add_argument("--image", help="finetune --launcher trainjob: the image the TrainJob runs")
    parser.add_argument("--fold", type=int, help="crossvalidate: which fold (0 to folds - 1)")
    parser.add_argument(
        "--kfp-executor-input",
        metavar="JSON",
        help="evaluate on Kubeflow: the task's executor input ({{$}}); the report's numbers are logged "
        f"to its {KfpMetricsOutput.OUTPUT_NAME!r} output artifact as <which>.<field>",
    )
    args = parser.parse_args(argv)
    if args.which and args.step != "evaluate":
        parser.error("--which only applies to the evaluate step")
    metrics_output = None
    if args.kfp_executor_input is not None:
        if args.step != "evaluate" and not args.step.startswith("evaluate-"):
            parser.error("--kfp-executor-input only applies to the evaluate step")
        try:
            metrics_output = KfpMetricsOutput.from_executor_input(args.kfp_executor_input)
        except ValueError as error:
            parser.error(f"--kfp-executor-input: {error}")
    config = start_step_process(args.config, args.config_json)
    if config is None:
        return 2
    kwargs: dict[str, Any] = {"which": args.which} if args.which else {}
    if args.step == "finetune":
        kwargs.update(launcher=args.launcher, image=args.image)
    elif args.launcher != "local" or args.image:
        parser.error("--launcher and --image only apply to the finetune step")
    if args.step == "crossvalidate":
        if args.fold is None:
            parser.error("crossvalidate needs --fold")
        kwargs["fold"] = args.fold
    elif args.fold is not None:
        parser.error("--fold only applies to the crossvalidate step")
    try:
        result = run_step(args.step, config, args.workspace, **kwargs)
    except ComponentError as error:
        print(f"{args.step} failed ({error.reason}): {error.message}", file=sys.stderr)
        return 1
    except TrainingInterrupted as interrupted:
        print(str(interrupted), file=sys.stderr)
        return EXIT_INTERRUPTED
    if metrics_output is not None:
        metrics_output.log(evaluation_metrics(evaluated_model(args.step, args.which), result))
    finish_step(result, args.report)
    publish_workspace_report(args.workspace, args.workspace_report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
