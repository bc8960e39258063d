"""The pipeline steps as kfp components, each running its step's own command line.

The runtime image has ``kubetune_components``, whose step modules have a command line::

    python -m kubetune_components.finetune.steps curate --config-json JSON --workspace DIR --report FILE
    python -m kubetune_components.quantize.steps quantize --config-json JSON --workspace DIR --report FILE

so on Kubeflow each step is a container component running that command line on the runtime image:
nothing is embedded in the pipeline but the command. Its inputs are the job's resolved config
(``config_json``), the run's workspace and, for ``evaluate-model``, ``which`` model (for
``crossvalidate-fold``, which ``fold``); its output
``report`` is what the step prints when it succeeds (shown in the Kubeflow UI and in the pod log), and
``workspace_report`` everything the workspace reports once it is done (progress, evaluations, gates,
output: a :class:`~kubetune_contract.workspace.WorkspaceReport` as JSON), which the operator reads from
the run's details, since it cannot mount a workspace claim in the user's namespace.
``evaluate-model`` also has a ``metrics`` output (kfp's system.Metrics: ``baseline.evalLoss``,
``final.exactMatch``, ... in the UI): the step gets the task's executor input (``{{$}}``) and writes the
artifact's metadata into the executor output file named there, which KFP's launcher reads back.

Local mode (``kubetune up``) runs the same pipelines with kfp's ``SubprocessRunner``, since there is no
Docker; that runner refuses container components ("only supports running Lightweight Python
Components", kfp 2.17). So a pipeline built after ``kfp.local.init(runner=SubprocessRunner(...))`` gets,
for each step, a stand-in with the same inputs and ``report`` output: one generic lightweight component
that runs the same command line (from the same :class:`StepCommand`) in a child process. (It has no
``metrics`` output: nothing shows kfp's local artifacts, and the evaluation is in the workspace.) Each
step's command line and each pipeline are thus written once, and the choice is read from kfp's own
local configuration, the one thing that decides how the tasks will run, rather than from a flag every
caller must remember. Rejected: a local worker that reads the commands out of the compiled spec and
orders the tasks itself (a pipeline engine of our own), and lightweight components on the cluster too
(source the image has).

No ``from __future__ import annotations`` here: kfp reads the stand-in's annotations at run time.
"""

import inspect
from dataclasses import dataclass
from functools import partial
from typing import Any

from kfp import dsl, local
from kfp.dsl.placeholders import CommandLineElement
from kfp.local.config import LocalExecutionConfig

from kubetune_contract.workspace import WORKSPACE_REPORT_OUTPUT

FINETUNE_STEPS_MODULE = "kubetune_components.finetune.steps"
QUANTIZE_STEPS_MODULE = "kubetune_components.quantize.steps"


@dataclass(frozen=True)
class StepCommand:
    """One pipeline step: its component name and the command line that carries it out."""

    component: str
    module: str
    step: str
    description: str
    takes_which: bool = False
    takes_fold: bool = False
    """The step works on one fold of evaluation.crossValidation: a ``fold`` input, ``--fold`` on its line."""
    logs_metrics: bool = False
    launches_trainjobs: bool = False
    """On a cluster the step runs training.distributed as a Kubeflow Trainer TrainJob on its own image."""

    def command_line(
        self,
        config_json: CommandLineElement,
        workspace: CommandLineElement,
        report: CommandLineElement,
        which: CommandLineElement | None = None,
        executor_input: CommandLineElement | None = None,
        workspace_report: CommandLineElement | None = None,
        trainjob_image: str | None = None,
        fold: CommandLineElement | None = None,
    ) -> list[CommandLineElement]:
        """The step's command line. Its arguments are values, or kfp placeholders when the command line
        is a container component's; `executor_input` (KFP's ``{{$}}``) is where metrics are logged,
        `workspace_report` where the step publishes the workspace's report for the operator;
        `trainjob_image` (on a cluster) the image of the TrainJob a distributed finetune creates."""
        which_flag: list[CommandLineElement] = ["--which", which] if which is not None else []
        fold_flag: list[CommandLineElement] = ["--fold", fold] if self.takes_fold and fold is not None else []
        workspace_report_flag: list[CommandLineElement] = (
            ["--workspace-report", workspace_report] if workspace_report is not None else []
        )
        metrics_flag: list[CommandLineElement] = (
            ["--kfp-executor-input", executor_input] if executor_input is not None else []
        )
        launcher_flags: list[CommandLineElement] = (
            ["--launcher", "trainjob", "--image", trainjob_image]
            if self.launches_trainjobs and trainjob_image is not None
            else []
        )
        return [
            "python",
            "-m",
            self.module,
            self.step,
            "--config-json",
            config_json,
            "--workspace",
            workspace,
            "--report",
            report,
            *workspace_report_flag,
            *which_flag,
            *fold_flag,
            *metrics_flag,
            *launcher_flags,
        ]


STEPS: dict[str, StepCommand] = {
    step.component: step
    for step in (
        StepCommand(
            "curate-dataset",
            FINETUNE_STEPS_MODULE,
            "curate",
            "Parse, validate, dedupe, length-filter and split the dataset.",
        ),
        StepCommand(
            "evaluate-model",
            FINETUNE_STEPS_MODULE,
            "evaluate",
            "Held-out evalLoss, perplexity and exactMatch of the base (`baseline`) or tuned (`final`) model.",
            takes_which=True,
            logs_metrics=True,
        ),
        StepCommand(
            "finetune-model",
            FINETUNE_STEPS_MODULE,
            "finetune",
            "Train with the job's method; resumes from the newest checkpoint in the workspace. With "
            "training.distributed it trains in a Kubeflow Trainer TrainJob and follows it.",
            launches_trainjobs=True,
        ),
        StepCommand(
            "crossvalidate-fold",
            FINETUNE_STEPS_MODULE,
            "crossvalidate",
            "One fold of evaluation.crossValidation: train on the other parts of the curated training "
            "examples, evaluate on this fold's own part.",
            takes_fold=True,
        ),
        StepCommand(
            "publish-model",
            FINETUNE_STEPS_MODULE,
            "publish",
            "Check the evaluation gates; publish the model and its lineage manifest only if all pass.",
        ),
        StepCommand(
            "measure-source-model",
            QUANTIZE_STEPS_MODULE,
            "measure-source",
            "Size, latency per generated token and held-out quality of the model before quantization.",
        ),
        StepCommand(
            "quantize-model",
            QUANTIZE_STEPS_MODULE,
            "quantize",
            "Apply the job's method (PTQ, QAT, pruning or mixed precision) and save the result.",
        ),
        StepCommand(
            "measure-quantized-model",
            QUANTIZE_STEPS_MODULE,
            "measure-quantized",
            "The same measurements on the quantized model, reloaded the way serving loads it.",
        ),
        StepCommand(
            "publish-quantized-model",
            QUANTIZE_STEPS_MODULE,
            "publish-quantized",
            "Check the quality gates; publish the quantized model with its lineage only if all pass.",
        ),
    )
}


def container_component(step: StepCommand, image: str) -> Any:
    """The step as a kfp container component running its command line on `image`."""
    # The component's inputs and outputs, in the order kfp passes their placeholders to `container`.
    annotations: dict[str, Any] = {
        "config_json": str,
        "workspace": str,
        **({"which": str} if step.takes_which else {}),
        **({"fold": int} if step.takes_fold else {}),
        "report": dsl.OutputPath(str),
        WORKSPACE_REPORT_OUTPUT: dsl.OutputPath(str),
        **({"metrics": dsl.Output[dsl.Metrics]} if step.logs_metrics else {}),
    }
    parameters = [
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=annotation)
        for name, annotation in annotations.items()
    ]

    def container(*placeholders: Any) -> Any:
        given = dict(zip(annotations, placeholders, strict=True))
        return dsl.ContainerSpec(
            image=image,
            command=step.command_line(
                given["config_json"],
                given["workspace"],
                given["report"],
                given.get("which"),
                dsl.PIPELINE_TASK_EXECUTOR_INPUT_PLACEHOLDER if step.logs_metrics else None,
                given[WORKSPACE_REPORT_OUTPUT],
                image,
                given.get("fold"),
            ),
        )

    container.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    container.__name__ = step.component.replace("-", "_")
    container.__doc__ = step.description
    return dsl.container_component(container)


def run_step_command(
    step: str,
    config_json: str,
    workspace: str,
    which: str,
    report: dsl.OutputPath(str),  # type: ignore[valid-type]
    fold: int = -1,
) -> None:
    """A step's command line in a child process: its container component's stand-in locally. `fold` is
    the crossvalidate-fold step's (the other steps take none)."""
    import shlex
    import signal
    import subprocess
    import sys

    from kubetune.pipelines.components import STEPS

    command = STEPS[step].command_line(config_json, workspace, report, which or None, fold=str(fold))
    # The config is a page of JSON: the log line names it instead.
    shown = STEPS[step].command_line("CONFIG_JSON", workspace, report, which or None, fold=str(fold))
    print("running", shlex.join(str(part) for part in shown), flush=True)
    # `kubetune up` stops a run with SIGTERM to the worker's process group, which the step gets too: wait
    # for it to save a checkpoint and exit rather than die first. (A Python handler, unlike SIG_IGN, is
    # not inherited by the child.)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    # The image's `python` is this interpreter here, as kfp's own SubprocessRunner does it.
    completed = subprocess.run([sys.executable, *(str(part) for part in command[1:])], check=False)
    if completed.returncode != 0:
        sys.exit(completed.returncode)


def local_stand_in(step: StepCommand) -> Any:
    """The step as kfp's SubprocessRunner can run it: :func:`run_step_command` bound to the step."""
    component = dsl.component(run_step_command, install_kfp_package=False)
    # Named for its step, so that kfp's local logs and output folders say which step a task is.
    component.component_spec.name = component.name = step.component
    if step.takes_which:
        return partial(component, step=step.component)
    return partial(component, step=step.component, which="")


def runs_on_subprocess_runner() -> bool:
    """Whether kfp.local was initialised in this process with the SubprocessRunner."""
    config = LocalExecutionConfig.instance
    return config is not None and isinstance(config.runner, local.SubprocessRunner)


def make_component(name: str, image: str) -> Any:
    """The kfp component of step `name`: a container component on `image`, or its local stand-in."""
    step = STEPS[name]
    if runs_on_subprocess_runner():
        return local_stand_in(step)
    return container_component(step, image)
