"""lm-evaluation-harness tasks (`evaluation.harness`), defined locally, scored on the base and tuned model.

- Resolution (no lm-eval import): each `tasks[i]` names a task defined by a `task:` key in its `uri`, a
  task YAML or a directory of them. The task's data must be local: `dataset_path` json, csv, parquet, arrow
  or text with `dataset_kwargs.data_files` (read next to the YAML), or a directory beside the YAML. Every
  problem is a ConfigError naming `spec.evaluation.harness...` and the file. Gates are checked against the
  metrics the task declares before any model is loaded.
- Scoring: lm-eval's HFLM wraps the model the evaluate step already loaded (the base, or the tuned model with
  its LoRA/IA3 adapter), so nothing is looked up on a hub; the datasets and hub libraries are switched
  offline for the run. lm-eval is imported only here, when a job asks for it (it takes seconds to import).
- The scores, by task ({samples, metrics, higherIsBetter}), go under `harness` in the evaluation report; a
  gate's entry in gates.json is `harness:<task>/<metric>`.
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from kubetune_components.common import storage
from kubetune_components.common.errors import ComponentError, ConfigError
from kubetune_components.common.gates import evaluate_gates
from kubetune_contract.common import GateOp
from kubetune_contract.finetune import Harness, HarnessGate, HarnessTask

HARNESS_KEY = "harness"
"""Where an evaluation report keeps the harness scores: {task: {samples, metrics, higherIsBetter}}."""
HARNESS_GATE_PREFIX = "harness:"
"""A harness gate's metric in gates.json: `harness:<task>/<metric>`."""
FIELD = "spec.evaluation.harness"
LOCAL_DATASET_BUILDERS = frozenset({"json", "csv", "parquet", "arrow", "text"})
"""`dataset_path` values that the datasets library reads from local data_files."""
DEFAULT_METRICS: dict[str, tuple[str, ...]] = {
    "multiple_choice": ("acc", "acc_norm"),
    "loglikelihood": ("perplexity", "acc"),
    "loglikelihood_rolling": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
    "generate_until": ("exact_match",),
}
"""What lm-eval reports for a task without a metric_list, by output_type."""
OFFLINE_VARIABLES = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


@dataclass(frozen=True)
class ResolvedTask:
    """A harness task found in its YAML, with its data files made absolute."""

    name: str
    yaml_path: Path
    dataset_overrides: dict[str, Any]
    """Replaces the YAML's dataset_path / dataset_kwargs, so the data is read from beside the YAML."""
    metrics: tuple[str, ...]
    filters: tuple[str, ...]


class _TaskYamlLoader(yaml.SafeLoader):
    """Safe YAML plus lm-eval's `!function module.name` tag (kept as text here; lm-eval imports it)."""


def _function_tag(loader: yaml.SafeLoader, node: yaml.Node) -> str:
    return str(loader.construct_scalar(node))  # type: ignore[arg-type]


_TaskYamlLoader.add_constructor("!function", _function_tag)


def _read_yaml(path: Path, field: str, seen: frozenset[Path] = frozenset()) -> dict[str, Any]:
    """A task YAML as a dict, its `include`s merged under it as lm-eval does."""
    try:
        loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskYamlLoader)
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{field}: {path}{line}: malformed YAML ({problem})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{field}: {path}: cannot read the task YAML ({error})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{field}: {path}: a task YAML must be a mapping, not {type(loaded).__name__}")
    includes = loaded.pop("include", None)
    if includes is None:
        return loaded
    merged: dict[str, Any] = {}
    for include in includes if isinstance(includes, list) else [includes]:
        included = path.parent / str(include)
        if included.resolve() in seen:
            raise ConfigError(f"{field}: {path}: include cycle through {included}")
        if not included.is_file():
            raise ConfigError(f"{field}: {path}: included file {included} does not exist")
        merged.update(_read_yaml(included, field, seen | {path.resolve()}))
    return {**merged, **loaded}


def _task_yamls(task: HarnessTask, field: str) -> list[Path]:
    try:
        location = storage.resolve_local_path(task.uri)
    except ConfigError as error:
        raise ConfigError(f"{field}.uri: {error.message}") from None
    if location.is_file():
        return [location]
    if location.is_dir():
        found = sorted([*location.glob("*.yaml"), *location.glob("*.yml")])
        if not found:
            raise ConfigError(f"{field}.uri: {task.uri} holds no task YAML (*.yaml, *.yml)")
        return found
    raise ConfigError(f"{field}.uri: {task.uri} does not exist")


def _absolute_files(files: Any, base: Path, where: str) -> Any:
    """data_files (a path, a list, or {split: path or list}) resolved against `base`; each must exist."""
    if isinstance(files, Mapping):
        return {
            str(split): _absolute_files(paths, base, f"{where}.{split}") for split, paths in files.items()
        }
    if isinstance(files, list):
        return [_absolute_files(path, base, where) for path in files]
    if not isinstance(files, str) or not files:
        raise ConfigError(f"{where}: expected a file path, got {files!r}")
    path = Path(os.path.expanduser(files))
    path = path if path.is_absolute() else base / path
    if glob.has_magic(str(path)):
        if not glob.glob(str(path)):
            raise ConfigError(f"{where}: no file matches {path}")
    elif not path.is_file():
        raise ConfigError(f"{where}: data file {path} does not exist")
    return str(path.resolve()) if not glob.has_magic(str(path)) else str(path)


def _local_dataset(config: Mapping[str, Any], yaml_path: Path, field: str) -> dict[str, Any]:
    """The dataset_path / dataset_kwargs that read this task's data from beside its YAML, never a hub."""
    where = f"{field}: task {config['task']!r} in {yaml_path}"
    if config.get("custom_dataset") is not None:
        return {}
    dataset_path = config.get("dataset_path")
    kwargs = config.get("dataset_kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise ConfigError(f"{where}: dataset_kwargs must be a mapping")
    kwargs = dict(kwargs)
    if not isinstance(dataset_path, str) or not dataset_path:
        raise ConfigError(f"{where}: dataset_path is missing (use json with dataset_kwargs.data_files)")
    if dataset_path in LOCAL_DATASET_BUILDERS:
        if "data_files" not in kwargs and "data_dir" not in kwargs:
            raise ConfigError(
                f"{where}: dataset_path {dataset_path} needs dataset_kwargs.data_files (local files)"
            )
    else:
        beside = yaml_path.parent / dataset_path
        if not beside.is_dir():
            raise ConfigError(
                f"{where}: dataset_path {dataset_path!r} is neither a local file format ("
                f"{', '.join(sorted(LOCAL_DATASET_BUILDERS))}) nor a directory beside the YAML; nothing is "
                "downloaded here: ship the data with the task (dataset_path: json, dataset_kwargs.data_files)"
            )
        dataset_path = str(beside.resolve())
    if "data_files" in kwargs:
        kwargs["data_files"] = _absolute_files(
            kwargs["data_files"], yaml_path.parent, f"{where}: dataset_kwargs.data_files"
        )
    if isinstance(kwargs.get("data_dir"), str):
        data_dir = yaml_path.parent / kwargs["data_dir"]
        if not data_dir.is_dir():
            raise ConfigError(f"{where}: dataset_kwargs.data_dir {data_dir} is not a directory")
        kwargs["data_dir"] = str(data_dir.resolve())
    return {"dataset_path": dataset_path, "dataset_kwargs": kwargs}


def _declared_metrics(config: Mapping[str, Any]) -> tuple[str, ...]:
    listed = config.get("metric_list")
    if isinstance(listed, list):
        return tuple(
            str(entry["metric"]) for entry in listed if isinstance(entry, Mapping) and "metric" in entry
        )
    return DEFAULT_METRICS.get(str(config.get("output_type", "generate_until")), ())


def _declared_filters(config: Mapping[str, Any]) -> tuple[str, ...]:
    listed = config.get("filter_list")
    if not isinstance(listed, list):
        return ("none",)
    return tuple(str(entry["name"]) for entry in listed if isinstance(entry, Mapping) and "name" in entry)


def resolve_task(task: HarnessTask, index: int) -> ResolvedTask:
    """Find `task.name` among the task YAMLs of `task.uri` and check that its data is local."""
    field = f"{FIELD}.tasks[{index}]"
    defined: dict[str, tuple[Path, dict[str, Any]]] = {}
    for path in _task_yamls(task, field):
        config = _read_yaml(path, f"{field}.uri")
        name = config.get("task")
        if isinstance(name, str):
            defined.setdefault(name, (path, config))
    if task.name not in defined:
        known = ", ".join(sorted(defined)) or "no task"
        raise ConfigError(
            f"{field}.name: task {task.name!r} is not defined in {task.uri} (it defines {known})"
        )
    path, config = defined[task.name]
    return ResolvedTask(
        name=task.name,
        yaml_path=path,
        dataset_overrides=_local_dataset(config, path, field),
        metrics=_declared_metrics(config),
        filters=_declared_filters(config),
    )


def _check_gate(gate: HarnessGate, index: int, task: ResolvedTask) -> None:
    metric, _, filter_name = gate.metric.partition(",")
    field = f"{FIELD}.gates[{index}].metric"
    if metric not in task.metrics:
        raise ConfigError(
            f"{field}: task {task.name!r} reports {', '.join(task.metrics) or 'no metric'}, not {metric!r} "
            f"({task.yaml_path})"
        )
    if filter_name and filter_name not in task.filters:
        raise ConfigError(
            f"{field}: task {task.name!r} has filters {', '.join(task.filters)}, not {filter_name!r} "
            f"({task.yaml_path})"
        )


def resolve_harness(harness: Harness) -> list[ResolvedTask]:
    """Every task of `harness`, resolved; each gate's metric checked against its task's metrics."""
    resolved = [resolve_task(task, index) for index, task in enumerate(harness.tasks)]
    by_name = {task.name: task for task in resolved}
    for index, gate in enumerate(harness.gates):
        _check_gate(gate, index, by_name[gate.task])
    return resolved


# --------------------------------------------------------------------------------------------------
# Scoring.


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """The datasets and hub libraries offline (environment and, when already imported, their settings)."""
    saved_env = {name: os.environ.get(name) for name in OFFLINE_VARIABLES}
    patched: list[tuple[Any, str, Any]] = []
    for module_name, attributes in (
        ("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
        ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")),
    ):
        module = sys.modules.get(module_name)
        for attribute in attributes:
            if module is not None and hasattr(module, attribute):
                patched.append((module, attribute, getattr(module, attribute)))
                setattr(module, attribute, True)
    os.environ.update(dict.fromkeys(OFFLINE_VARIABLES, "1"))
    try:
        yield
    finally:
        for module, attribute, value in patched:
            setattr(module, attribute, value)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _task_config(task: ResolvedTask, cache_dir: str) -> dict[str, Any]:
    """The task's full config as lm-eval reads it (includes, `!function`s), its data read locally."""
    from lm_eval.tasks._yaml_loader import load_yaml

    config: dict[str, Any] = dict(load_yaml(task.yaml_path, resolve_func=True))
    config.update(task.dataset_overrides)
    if "dataset_kwargs" in task.dataset_overrides:
        config["dataset_kwargs"] = {**task.dataset_overrides["dataset_kwargs"], "cache_dir": cache_dir}
    return config


def _scores(task_results: Mapping[str, Any]) -> dict[str, float]:
    """{metric or metric,filter: value} of one task's lm-eval results (stderr and aliases left out)."""
    scores: dict[str, float] = {}
    for key, value in task_results.items():
        name, _, filter_name = str(key).partition(",")
        if not filter_name or "_stderr" in name or isinstance(value, bool):
            continue
        if isinstance(value, int | float) and math.isfinite(value):
            scores[name if filter_name == "none" else f"{name},{filter_name}"] = float(value)
    return scores


def run_harness(
    model: torch.nn.Module,
    tokenizer: Any,
    harness: Harness,
    *,
    limit: int,
    batch_size: int,
    seed: int,
) -> dict[str, dict[str, Any]]:
    """Score `model` on every task of `harness` (its first `limit` documents each), by task name."""
    resolved = resolve_harness(harness)
    with offline(), tempfile.TemporaryDirectory(prefix="kubetune-harness-") as cache_dir:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        language_model = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        configs = [_task_config(task, cache_dir) for task in resolved]
        try:
            output = lm_eval.simple_evaluate(
                model=language_model,
                tasks=configs,  # type: ignore[arg-type]
                task_manager=TaskManager(include_defaults=False),
                limit=limit,
                bootstrap_iters=0,
                log_samples=False,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
        except ComponentError:
            raise
        except Exception as error:  # lm-eval raises plain exceptions for bad task configs and data.
            names = ", ".join(f"{task.name} ({task.yaml_path})" for task in resolved)
            raise ConfigError(
                f"{FIELD}.tasks: lm-eval failed on {names}: {type(error).__name__}: {error}"
            ) from error
    if output is None:
        raise ComponentError(f"{FIELD}: lm-eval returned no results")
    results: dict[str, dict[str, Any]] = {}
    for task in resolved:
        higher = (output.get("higher_is_better") or {}).get(task.name) or {}
        samples = ((output.get("n-samples") or {}).get(task.name) or {}).get("effective")
        results[task.name] = {
            "samples": samples,
            "metrics": _scores((output.get("results") or {}).get(task.name) or {}),
            "higherIsBetter": {str(name): bool(value) for name, value in higher.items() if value is not None},
        }
    return results


# --------------------------------------------------------------------------------------------------
# Status rows and gates.


def harness_scores(report: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The harness scores of an evaluation report, by task ({} when it has none)."""
    scores = (report or {}).get(HARNESS_KEY)
    if not isinstance(scores, Mapping):
        return {}
    return {str(task): dict(entry) for task, entry in scores.items() if isinstance(entry, Mapping)}


def _metric_value(entry: Mapping[str, Any] | None, metric: str) -> float | None:
    value = ((entry or {}).get("metrics") or {}).get(metric)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def higher_is_better(entry: Mapping[str, Any] | None, metric: str) -> bool:
    """lm-eval's direction for `metric` (`metric,filter` looks up the metric); higher unless it says lower."""
    directions = (entry or {}).get("higherIsBetter") or {}
    return bool(directions.get(metric.partition(",")[0], True))


@dataclass(frozen=True)
class _KeyedGate:
    metric: str
    gate: HarnessGate

    def bounds(self) -> list[tuple[GateOp, float]]:
        return self.gate.bounds()


def harness_gates(
    harness: Harness | None, baseline: Mapping[str, Any] | None, final: Mapping[str, Any] | None
) -> list[dict[str, Any]]:
    """gates.json entries of `harness.gates`: one per bound; a score that was not measured fails its gate.
    For minImprovement the value is the improvement over the base model in lm-eval's better direction."""
    if harness is None:
        return []
    before, after = harness_scores(baseline), harness_scores(final)
    keyed = [_KeyedGate(f"{HARNESS_GATE_PREFIX}{gate.task}/{gate.metric}", gate) for gate in harness.gates]
    by_metric = {keyed_gate.metric: keyed_gate.gate for keyed_gate in keyed}

    def value_of(metric: str, op: GateOp) -> float | None:
        gate = by_metric[metric]
        final_value = _metric_value(after.get(gate.task), gate.metric)
        if op != "minImprovement":
            return final_value
        base_value = _metric_value(before.get(gate.task), gate.metric)
        if final_value is None or base_value is None:
            return None
        gain = final_value - base_value
        return gain if higher_is_better(after.get(gate.task), gate.metric) else -gain

    return evaluate_gates(keyed, value_of)


def describe_harness_failure(result: Mapping[str, Any]) -> str | None:
    """Why a harness gate failed, or None when `result` is not a harness gate."""
    metric = str(result["metric"])
    if not metric.startswith(HARNESS_GATE_PREFIX):
        return None
    op, threshold, value = result["op"], result["threshold"], result["value"]
    if value is None:
        return f"{metric} was not scored on both the base and the tuned model"
    if op == "minImprovement":
        return f"{metric} improved by {value:.6g} over the base model, less than minImprovement {threshold:g}"
    relation = "below min" if op == "min" else "above max"
    return f"{metric} is {value:.6g}, {relation} {threshold:g}"
