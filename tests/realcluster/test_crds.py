"""The generated CRDs on a real kube-apiserver: they install, their CEL rules refuse what ``kubetune
validate`` refuses with the same field path and words, the server's defaulting fills in exactly the
pydantic models' defaults, and ``kubectl get`` prints the printer columns."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from lightkube import Client, KubeConfig
from lightkube.resources.apiextensions_v1 import CustomResourceDefinition

from kubetune.api.definition import ResourceDefinition
from kubetune.api.registry import all_definitions, get_definition
from kubetune.api.validation import parse_resource, read_manifests, validate_documents
from kubetune.local.store import ApplyError, LocalStore
from kubetune_contract import deployment, finetune, guardrails, quantize
from realcluster.control_plane import FIELD_MANAGER, ControlPlane

pytestmark = pytest.mark.realcluster

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "quickstart"
Manifest = dict[str, Any]


def quickstart(kind: str) -> Manifest:
    """The quickstart's manifest of ``kind`` (a fresh copy)."""
    (found,) = [doc for doc in read_manifests(QUICKSTART) if doc["kind"] == kind]
    return copy.deepcopy(found)


def in_namespace(doc: Manifest, namespace: str) -> Manifest:
    doc = copy.deepcopy(doc)
    doc["metadata"]["namespace"] = namespace
    return doc


def apply(plane: ControlPlane, doc: Manifest, *, check: bool = True) -> tuple[int, str]:
    """Server-side apply of one document as kubectl does it: (exit status, kubectl's stderr)."""
    result = plane.kubectl(
        "apply",
        "--server-side",
        f"--field-manager={FIELD_MANAGER}",
        "-f",
        "-",
        stdin=json.dumps(doc),
        check=check,
    )
    return result.returncode, result.stderr


def stored(plane: ControlPlane, doc: Manifest) -> Manifest:
    meta = doc["metadata"]
    definition = get_definition(doc["kind"])
    out = plane.kubectl("get", definition.crd_name, meta["name"], "-n", meta["namespace"], "-o", "json")
    result: Manifest = json.loads(out.stdout)
    return result


# -- the CRDs install ---------------------------------------------------------------------------------


def test_crds_apply_server_side_and_are_established(
    control_plane: ControlPlane, kubetune_crds: list[str]
) -> None:
    client = Client(config=KubeConfig.from_file(control_plane.kubeconfig))
    assert kubetune_crds == sorted(d.crd_name for d in all_definitions())
    for name in kubetune_crds:
        crd = client.get(CustomResourceDefinition, name)
        assert crd.status is not None and crd.status.conditions is not None
        conditions = {c.type: c.status for c in crd.status.conditions}
        assert conditions["Established"] == "True", name
        assert conditions["NamesAccepted"] == "True", name
        assert crd.metadata is not None and crd.metadata.managedFields is not None
        appliers = {(f.manager, f.operation) for f in crd.metadata.managedFields}
        assert (FIELD_MANAGER, "Apply") in appliers, appliers
    # Applying the same files again changes nothing.
    again = control_plane.kubectl(
        "apply", "--server-side", f"--field-manager={FIELD_MANAGER}", "-f", str(REPO / "manifests" / "crds")
    )
    assert again.stdout.count("serverside-applied") == len(kubetune_crds)


def test_authorization_is_rbac(control_plane: ControlPlane, kubetune_crds: list[str], namespace: str) -> None:
    """A ServiceAccount bound to nothing may not even list jobs: the API server enforces RBAC."""
    nobody = control_plane.service_account_kubeconfig(namespace, "nobody")
    result = control_plane.kubectl("get", "finetunejobs", "-n", namespace, kubeconfig=nobody, check=False)
    assert result.returncode != 0
    assert f'"system:serviceaccount:{namespace}:nobody" cannot list resource "finetunejobs"' in result.stderr


# -- the CEL rules refuse what kubetune validate refuses ----------------------------------------------


@dataclass(frozen=True)
class Refusal:
    """A document that breaks one CEL rule, and what both `kubetune validate` and the API server say."""

    kind: str
    change: Callable[[Manifest], None]
    path: str  # the field both name
    says: str  # the message validate prints after the path (and the API server, unless server_says)
    rule: tuple[str, str]  # the CEL rule broken: its (path, message) in the kind's definition
    server_says: str | None = None
    """Where the rule's message cannot show the values (a number or a list: see CelRule.message_expression),
    the API server states the rule alone, and validate's message is that plus the values."""


def _set(path: str, value: Any) -> Callable[[Manifest], None]:
    def change(doc: Manifest) -> None:
        *parents, leaf = path.split(".")
        node: Any = doc
        for part in parents:
            node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
        node[leaf] = value

    return change


def _drop(path: str) -> Callable[[Manifest], None]:
    def change(doc: Manifest) -> None:
        *parents, leaf = path.split(".")
        node: Any = doc
        for part in parents:
            node = node[part]
        node.pop(leaf, None)

    return change


def _changes(*changes: Callable[[Manifest], None]) -> Callable[[Manifest], None]:
    def change(doc: Manifest) -> None:
        for one in changes:
            one(doc)

    return change


FTJ, QJ, MD = "FineTuneJob", "QuantizeJob", "ModelDeployment"
SPLIT = ("spec.dataset", "must be above 0 and below 1 when validationUri is not set")
POSITIVE = "must be longer than 0s"
ONE_VERSION = [{"name": "tuned", "model": {"fineTuneJobRef": {"name": "support-router"}}, "weight": 100}]
SKIP_ANALYSIS = {"skip": True}


def _rollout(
    steps: list[dict[str, Any]], analysis: dict[str, Any] | None = None
) -> Callable[[Manifest], None]:
    return _set("spec.rollout", {"steps": steps, "analysis": analysis or SKIP_ANALYSIS})


def _metric(metric: dict[str, Any]) -> Callable[[Manifest], None]:
    return _rollout([{"weight": 10, "pause": "1m"}], {"metrics": [metric]})


TEACHER = {"uri": "models/teacher"}
HARNESS_TASK = {"name": "ticket-routing", "uri": "examples/harness/tasks"}


def _without_exact_match(doc: Manifest) -> None:
    """The quickstart computes exactMatch and gates on it: compute evalLoss alone, and gate on it."""
    doc["spec"]["evaluation"]["metrics"] = ["evalLoss"]
    doc["spec"]["evaluation"]["gates"] = [{"metric": "evalLoss", "minImprovement": "0.5"}]


def _preference(method: str, options: dict[str, Any] | None = None) -> Callable[[Manifest], None]:
    """Preference tuning on the rows it needs (dpo: preference, kto: feedback), gated on evalLoss alone."""

    def change(doc: Manifest) -> None:
        _without_exact_match(doc)
        doc["spec"]["dataset"]["format"] = finetune.PREFERENCE_FORMATS[method]
        doc["spec"]["method"] = {"type": method, **({method: options} if options is not None else {})}

    return change


def _moderation(categories: list[dict[str, Any]]) -> Callable[[Manifest], None]:
    return _set("spec.guardrails", {"moderation": {"categories": categories}})


def _ftj_block(block: str, method_type: str) -> Refusal:
    return Refusal(
        FTJ,
        _set("spec.method", {"type": method_type, block: {}}),
        "spec.method",
        f"{block} is set but type is '{method_type}'; only {finetune.METHOD_BLOCKS[method_type]} may be set",
        (
            "spec.method",
            f"method.{block} may only be set when method.type is {_owner(finetune.METHOD_BLOCKS, block)}",
        ),
    )


def _qj_block(block: str, method_type: str) -> Refusal:
    owned = quantize.METHOD_BLOCKS[method_type]
    allowed = f"only {owned} may be set" if owned else "it takes no options block"
    return Refusal(
        QJ,
        _set("spec.method", {"type": method_type, block: {}}),
        "spec.method",
        f"{block} is set but type is '{method_type}'; {allowed}",
        (
            "spec.method",
            f"method.{block} may only be set when method.type is {_owner(quantize.METHOD_BLOCKS, block)}",
        ),
    )


def _owner(blocks: dict[str, str | None] | dict[str, str], block: str) -> str:
    return next(method_type for method_type, owned in blocks.items() if owned == block)


REFUSALS = {
    # FineTuneJob
    "ftj name too long": Refusal(
        FTJ,
        _set("metadata.name", "a" * 70),
        "metadata.name",
        "must be at most 63 characters long (got 70)",
        ("", "must be at most 63 characters long"),
        server_says="must be at most 63 characters long",
    ),
    "ftj lora block with type full": _ftj_block("lora", "full"),
    "ftj prefixTuning block with type lora": _ftj_block("prefixTuning", "lora"),
    "ftj promptTuning block with type ia3": _ftj_block("promptTuning", "ia3"),
    "ftj ia3 block with type prompt-tuning": _ftj_block("ia3", "prompt-tuning"),
    "ftj full block with type prefix-tuning": _ftj_block("full", "prefix-tuning"),
    "ftj merging a prefix-tuning adapter": Refusal(
        FTJ,
        _changes(_set("spec.method", {"type": "prefix-tuning"}), _set("spec.output.mergeAdapter", True)),
        "spec",
        "output.mergeAdapter: a prefix-tuning adapter cannot be merged into the base weights; "
        "only lora and ia3 can",
        ("spec", "output.mergeAdapter: only lora and ia3 adapters can be merged into the base weights"),
    ),
    "ftj qlora on a cpu target": Refusal(
        FTJ,
        _set("spec.method", {"type": "lora", "lora": {"quantization": {"bits": 4, "type": "nf4"}}}),
        "spec.method.lora.quantization",
        "4-bit QLoRA (bitsandbytes) needs target gpu; target is cpu",
        ("spec", "4-bit QLoRA (bitsandbytes) needs target gpu"),
    ),
    "ftj fsdp for a lora adapter": Refusal(
        FTJ,
        _changes(
            _set("spec.method", {"type": "lora"}),
            _set("spec.training.distributed", {"workers": 2, "strategy": "fsdp"}),
        ),
        "spec.training.distributed.strategy",
        "fsdp shards the weights of method full; a lora adapter trains with ddp",
        ("spec", "fsdp shards the weights of method full; an adapter trains with ddp"),
    ),
    "ftj fsdp with periodic evaluations": Refusal(
        FTJ,
        _changes(
            _set("spec.method", {"type": "full"}),
            _set("spec.training.distributed", {"workers": 2, "strategy": "fsdp"}),
            _set("spec.training.evalEverySteps", 5),
        ),
        "spec.training.distributed.strategy",
        "fsdp does not run the periodic evaluations of training.evalEverySteps (they read whole weights); "
        "use ddp or unset evalEverySteps",
        (
            "spec",
            "fsdp does not run the periodic evaluations of training.evalEverySteps "
            "(they read whole weights); use ddp or unset evalEverySteps",
        ),
    ),
    "ftj packing with prefix tuning": Refusal(
        FTJ,
        _changes(
            _set("spec.method", {"type": "prefix-tuning"}),
            _set("spec.training.packing", True),
        ),
        "spec.training.packing",
        "packing keeps examples apart by their position ids, which the virtual tokens of prefix-tuning do "
        "not follow; use lora, ia3 or full",
        ("spec", "packing keeps examples apart by their position ids, which virtual tokens do not follow"),
    ),
    "ftj cross-validation with distributed training": Refusal(
        FTJ,
        _changes(
            _set("spec.evaluation.crossValidation", {"folds": 3}),
            _set("spec.training.distributed", {"workers": 2}),
        ),
        "spec.evaluation.crossValidation",
        finetune.CROSS_VALIDATION_NOT_DISTRIBUTED,
        ("spec", finetune.CROSS_VALIDATION_NOT_DISTRIBUTED),
    ),
    "ftj dpo block with type lora": _ftj_block("dpo", "lora"),
    "ftj kto block with type full": _ftj_block("kto", "full"),
    "ftj dpo on instruction data": Refusal(
        FTJ,
        _set("spec.method", {"type": "dpo"}),
        "spec.dataset.format",
        "method.type dpo trains on format preference, not instruction",
        ("spec", "method.type dpo trains on format preference, kto on format feedback"),
    ),
    "ftj feedback data with lora": Refusal(
        FTJ,
        _set("spec.dataset.format", "feedback"),
        "spec.method.type",
        "dataset.format feedback trains with method kto, not lora",
        ("spec", "dataset.format preference trains with method dpo, feedback with method kto"),
    ),
    "ftj dpo with packing": Refusal(
        FTJ,
        _changes(_preference("dpo"), _set("spec.training.packing", True)),
        "spec.training.packing",
        "dpo compares whole completions; it cannot pack them",
        ("spec", "dpo and kto compare whole completions; they cannot pack them"),
    ),
    "ftj kto with replay": Refusal(
        FTJ,
        _changes(_preference("kto"), _set("spec.training.replay", {"uri": "data/general.jsonl"})),
        "spec.training.replay",
        "kto learns from feedback rows; replayed examples have none",
        ("spec", "dpo and kto learn from preference or feedback rows; replayed examples have none"),
    ),
    "ftj preferenceAccuracy on instruction data": Refusal(
        FTJ,
        _set("spec.evaluation.metrics", ["evalLoss", "exactMatch", "preferenceAccuracy"]),
        "spec.evaluation.metrics",
        "preferenceAccuracy needs dataset.format preference or feedback, not instruction",
        ("spec", "preferenceAccuracy needs dataset.format preference or feedback"),
    ),
    **{
        f"ftj {method} lora options with weights full": Refusal(
            FTJ,
            _preference(method, {"weights": "full", "lora": {"r": 4}}),
            f"spec.method.{method}",
            "lora is set but weights is 'full'; it needs weights lora",
            (f"spec.method.{method}", "lora is set but weights is not lora; it needs weights lora"),
        )
        for method in ("dpo", "kto")
    },
    **{
        f"ftj {method} on a 4-bit base": Refusal(
            FTJ,
            _preference(method, {"lora": {"quantization": {"bits": 4}}}),
            f"spec.method.{method}",
            "lora.quantization: 4-bit bases are not supported with preference tuning",
            (
                f"spec.method.{method}",
                "lora.quantization: 4-bit bases are not supported with preference tuning",
            ),
        )
        for method in ("dpo", "kto")
    },
    **{
        f"ftj a {method} {option} of {value}": Refusal(
            FTJ,
            _preference(method, {option: value}),
            f"spec.method.{method}.{option}",
            f'must be greater than 0 and at most 100 (got "{value}")',
            (f"spec.method.{method}.{option}", "must be greater than 0 and at most 100"),
        )
        for method, option, value in (
            ("dpo", "beta", "0"),
            ("kto", "beta", "101"),
            ("kto", "desirableWeight", "0"),
            ("kto", "undesirableWeight", "-1"),
        )
    },
    "ftj curation minTokens > maxTokens": Refusal(
        FTJ,
        _set("spec.dataset.curation", {"minTokens": 4096}),
        "spec.dataset.curation",
        "minTokens must not exceed maxTokens",
        ("spec.dataset.curation", "minTokens must not exceed maxTokens"),
    ),
    "ftj gate without a bound": Refusal(
        FTJ,
        _set("spec.evaluation.gates", [{"metric": "evalLoss"}]),
        "spec.evaluation.gates[0]",
        "a gate needs min, max or minImprovement",
        ("spec.evaluation.gates[*]", "a gate needs min, max or minImprovement"),
    ),
    "ftj validationSplit 0": Refusal(
        FTJ,
        _changes(_drop("spec.dataset.validationUri"), _set("spec.dataset.validationSplit", "0")),
        "spec.dataset.validationSplit",
        'must be above 0 when validationUri is not set (got "0")',
        SPLIT,
    ),
    "ftj validationSplit 1": Refusal(
        FTJ,
        _changes(_drop("spec.dataset.validationUri"), _set("spec.dataset.validationSplit", "1")),
        "spec.dataset.validationSplit",
        'must be below 1 when validationUri is not set, to leave examples to train on (got "1")',
        SPLIT,
    ),
    "ftj distillation block with type lora": Refusal(
        FTJ,
        _set("spec.method", {"type": "lora", "distillation": {"teacher": TEACHER}}),
        "spec.method",
        "distillation is set but type is 'lora'; only lora may be set",
        ("spec.method", "method.distillation may only be set when method.type is distillation"),
    ),
    "ftj distillation without a teacher": Refusal(
        FTJ,
        _set("spec.method", {"type": "distillation"}),
        "spec.method",
        "type distillation needs distillation (it names the teacher)",
        ("spec.method", "type distillation needs distillation (it names the teacher)"),
    ),
    "ftj a teacher by job and by uri": Refusal(
        FTJ,
        _set(
            "spec.method",
            {
                "type": "distillation",
                "distillation": {"teacher": {**TEACHER, "fineTuneJobRef": {"name": "t"}}},
            },
        ),
        "spec.method.distillation.teacher",
        "set exactly one of fineTuneJobRef and uri",
        ("spec.method.distillation.teacher", "set exactly one of fineTuneJobRef and uri"),
    ),
    "ftj a distillation temperature of 0": Refusal(
        FTJ,
        _set(
            "spec.method", {"type": "distillation", "distillation": {"teacher": TEACHER, "temperature": "0"}}
        ),
        "spec.method.distillation.temperature",
        'must be greater than 0 and at most 100 (got "0")',
        ("spec.method.distillation.temperature", "must be greater than 0 and at most 100"),
    ),
    "ftj a replay ratio above 10": Refusal(
        FTJ,
        _set("spec.training.replay", {"uri": "replay.jsonl", "ratio": "11"}),
        "spec.training.replay.ratio",
        'must be greater than 0 and at most 10 (got "11")',
        ("spec.training.replay.ratio", "must be greater than 0 and at most 10"),
    ),
    "ftj select best without periodic evaluation": Refusal(
        FTJ,
        _set("spec.output.select", "best"),
        "spec.output.select",
        "best needs training.evalEverySteps",
        ("spec", "best needs training.evalEverySteps"),
    ),
    "ftj select best on exactMatch that is not computed": Refusal(
        FTJ,
        _changes(
            _set("spec.output", {"select": "best", "selectMetric": "exactMatch"}),
            _set("spec.training.evalEverySteps", 10),
            _without_exact_match,
        ),
        "spec.output.selectMetric",
        "exactMatch is not in evaluation.metrics",
        ("spec", "exactMatch is not in evaluation.metrics"),
    ),
    "ftj earlyStopping without periodic evaluation": Refusal(
        FTJ,
        _set("spec.training.earlyStopping", {"patience": 2}),
        "spec.training.earlyStopping",
        "needs training.evalEverySteps",
        ("spec", "needs training.evalEverySteps"),
    ),
    "ftj earlyStopping on exactMatch that is not computed": Refusal(
        FTJ,
        _changes(
            _set("spec.training.earlyStopping", {"metric": "exactMatch"}),
            _set("spec.training.evalEverySteps", 10),
            _without_exact_match,
        ),
        "spec.training.earlyStopping.metric",
        "exactMatch is not in evaluation.metrics",
        ("spec", "exactMatch is not in evaluation.metrics"),
    ),
    "ftj maxReferenceDrop without reference sets": Refusal(
        FTJ,
        _changes(_drop("spec.evaluation.reference"), _set("spec.evaluation.maxReferenceDrop", "0.1")),
        "spec.evaluation.maxReferenceDrop",
        "needs at least one set in evaluation.reference to apply to",
        ("spec.evaluation", "needs at least one set in evaluation.reference to apply to"),
    ),
    "ftj repeated reference set names": Refusal(
        FTJ,
        _set(
            "spec.evaluation.reference",
            [{"name": "general-text", "uri": "a.jsonl"}, {"name": "general-text", "uri": "b.jsonl"}],
        ),
        "spec.evaluation.reference",
        "reference names must be unique (duplicate 'general-text')",
        ("spec.evaluation.reference", "reference names must be unique"),
        server_says="reference names must be unique",
    ),
    "ftj repeated harness task names": Refusal(
        FTJ,
        _set("spec.evaluation.harness", {"tasks": [HARNESS_TASK, {**HARNESS_TASK, "uri": "other/tasks"}]}),
        "spec.evaluation.harness.tasks",
        "task names must be unique (duplicate 'ticket-routing')",
        ("spec.evaluation.harness.tasks", "task names must be unique"),
        server_says="task names must be unique",
    ),
    "ftj harness gate on an unlisted task": Refusal(
        FTJ,
        _set(
            "spec.evaluation.harness",
            {"tasks": [HARNESS_TASK], "gates": [{"task": "hellaswag", "metric": "acc", "min": "0.5"}]},
        ),
        "spec.evaluation.harness.gates",
        "a gate's task must be one of evaluation.harness.tasks (not 'hellaswag')",
        ("spec.evaluation.harness", "a gate's task must be one of evaluation.harness.tasks"),
        server_says="a gate's task must be one of evaluation.harness.tasks",
    ),
    "ftj harness gate without a bound": Refusal(
        FTJ,
        _set(
            "spec.evaluation.harness",
            {"tasks": [HARNESS_TASK], "gates": [{"task": "ticket-routing", "metric": "acc"}]},
        ),
        "spec.evaluation.harness.gates[0]",
        "a gate needs min, max or minImprovement",
        ("spec.evaluation.harness.gates[*]", "a gate needs min, max or minImprovement"),
    ),
    "ftj exactMatch on a text reference set": Refusal(
        FTJ,
        _set(
            "spec.evaluation.reference", [{"name": "general-text", "uri": "a.jsonl", "metric": "exactMatch"}]
        ),
        "spec.evaluation.reference[0].metric",
        "exactMatch needs responses to compare: format instruction or chat",
        ("spec.evaluation.reference[*]", "exactMatch needs responses to compare: format instruction or chat"),
    ),
    # QuantizeJob
    "qj name too long": Refusal(
        QJ,
        _set("metadata.name", "q" * 64),
        "metadata.name",
        "must be at most 63 characters long (got 64)",
        ("", "must be at most 63 characters long"),
        server_says="must be at most 63 characters long",
    ),
    "qj both a job and a uri": Refusal(
        QJ,
        _set("spec.model.uri", "models/base"),
        "spec.model",
        "set exactly one of fineTuneJobRef and uri",
        ("spec.model", "set exactly one of fineTuneJobRef and uri"),
    ),
    "qj int4WeightOnly block with type int8-dynamic": _qj_block("int4WeightOnly", "int8-dynamic"),
    "qj qat block with type pruning": _qj_block("qat", "pruning"),
    "qj pruning block with type qat": _qj_block("pruning", "qat"),
    "qj mixedPrecision block with type int4-weight-only": _qj_block("mixedPrecision", "int4-weight-only"),
    "qj 2:4 pruning on cpu": Refusal(
        QJ,
        _set("spec.method", {"type": "pruning", "pruning": {"pattern": "2:4"}}),
        "spec",
        "pruning pattern 2:4 does not support target cpu (GPU only)",
        ("spec", "pruning pattern 2:4 does not support target cpu (GPU only)"),
    ),
    "qj fp16 on cpu": Refusal(
        QJ,
        _set("spec.method", {"type": "mixed-precision", "mixedPrecision": {"dtype": "fp16"}}),
        "spec",
        "mixed-precision fp16 does not support target cpu; use bf16",
        ("spec", "mixed-precision fp16 does not support target cpu; use bf16"),
    ),
    "qj qat without data": Refusal(
        QJ,
        _changes(_set("spec.model", {"uri": "models/base"}), _set("spec.method", {"type": "qat"})),
        "spec",
        "qat trains: set dataset (or take the model from a fineTuneJobRef)",
        ("spec", "qat trains: set dataset (or take the model from a fineTuneJobRef)"),
    ),
    "qj curation minTokens > maxTokens": Refusal(
        QJ,
        _set("spec.dataset", {"uri": "data.jsonl", "curation": {"minTokens": 9, "maxTokens": 8}}),
        "spec.dataset.curation",
        "minTokens must not exceed maxTokens",
        ("spec.dataset.curation", "minTokens must not exceed maxTokens"),
    ),
    "qj preference rows as calibration data": Refusal(
        QJ,
        _set("spec.dataset", {"uri": "data.jsonl", "format": "preference"}),
        "spec.dataset.format",
        quantize.PAIR_FORMATS_NOT_CALIBRATION,
        ("spec.dataset", quantize.PAIR_FORMATS_NOT_CALIBRATION),
    ),
    "qj gate without a bound": Refusal(
        QJ,
        _set("spec.evaluation.gates", [{"metric": "sizeRatio"}]),
        "spec.evaluation.gates[0]",
        "a gate needs min or max",
        ("spec.evaluation.gates[*]", "a gate needs min or max"),
    ),
    "qj validationSplit 0": Refusal(
        QJ,
        _set("spec.dataset", {"uri": "data.jsonl", "validationSplit": "0"}),
        "spec.dataset.validationSplit",
        'must be above 0 when validationUri is not set (got "0")',
        SPLIT,
    ),
    # ModelDeployment
    "mdep name too long for its children's names": Refusal(
        MD,
        _set("metadata.name", "m" * 41),
        "metadata.name",
        "must be at most 40 characters long (got 41)",
        ("", "must be at most 40 characters long"),
        server_says="must be at most 40 characters long",
    ),
    "mdep weights not summing to 100": Refusal(
        MD,
        _set("spec.versions.1.weight", 30),
        "spec",
        "versions weights must sum to 100, got 110",
        ("spec", "versions weights must sum to 100"),
        server_says="versions weights must sum to 100",
    ),
    "mdep a repeated version name": Refusal(
        MD,
        _changes(_set("spec.versions.1.name", "tuned"), _drop("spec.fallback")),
        "spec",
        "versions names must be unique; repeated: tuned",
        ("spec", "versions names must be unique"),
        server_says="versions names must be unique",
    ),
    "mdep repeated prompt names": Refusal(
        MD,
        _set("spec.prompts", [{"name": "b"}, {"name": "a"}, {"name": "a"}, {"name": "b"}, {"name": "c"}]),
        "spec",
        "prompts names must be unique; repeated: a, b",
        ("spec", "prompts names must be unique"),
        server_says="prompts names must be unique",
    ),
    "mdep repeated prompt part names": Refusal(
        MD,
        _set("spec.promptParts", [{"name": "role", "text": "a"}, {"name": "role", "text": "b"}]),
        "spec",
        f"{deployment.PROMPT_PARTS_UNIQUE}; repeated: role",
        ("spec", deployment.PROMPT_PARTS_UNIQUE),
        server_says=deployment.PROMPT_PARTS_UNIQUE,
    ),
    "mdep a prompt part named like a generated one": Refusal(
        MD,
        _set("spec.promptParts", [{"name": "safety-preamble", "text": "a"}]),
        "spec.promptParts[0]",
        f"{deployment.GENERATED_NAME_TAKEN} (got 'safety-preamble')",
        ("spec.promptParts[*]", deployment.GENERATED_NAME_TAKEN),
        server_says=deployment.GENERATED_NAME_TAKEN,
    ),
    "mdep a system part that is not defined": Refusal(
        MD,
        _set("spec.prompts", [{"name": "p", "systemParts": ["role"]}]),
        "spec",
        f"{deployment.SYSTEM_PARTS_RESOLVE}: prompts[0].systemParts[0] is 'role' "
        "(known: format-instructions, safety-preamble)",
        ("spec", deployment.SYSTEM_PARTS_RESOLVE),
        server_says=deployment.SYSTEM_PARTS_RESOLVE,
    ),
    "mdep repeated principle names": Refusal(
        MD,
        _set(
            "spec.prompts",
            [
                {
                    "name": "p",
                    "constitution": {"principles": [{"name": "a", "text": "x"}, {"name": "a", "text": "z"}]},
                }
            ],
        ),
        "spec.prompts[0].constitution",
        f"{deployment.PRINCIPLES_UNIQUE}; repeated: a",
        ("spec.prompts[*].constitution", deployment.PRINCIPLES_UNIQUE),
        server_says=deployment.PRINCIPLES_UNIQUE,
    ),
    "mdep a version with two models": Refusal(
        MD,
        _set("spec.versions.0.model.uri", "models/base"),
        "spec.versions[0].model",
        "set exactly one of fineTuneJobRef, quantizeJobRef and uri",
        ("spec.versions[*].model", "set exactly one of fineTuneJobRef, quantizeJobRef and uri"),
    ),
    "mdep a prompt that is not defined": Refusal(
        MD,
        _set("spec.versions.0.prompt", "concise"),
        "spec",
        "a version's prompt must name an entry of prompts: version tuned names 'concise'",
        ("spec", "a version's prompt must name an entry of prompts"),
        server_says="a version's prompt must name an entry of prompts",
    ),
    "mdep a fallback that is not a version": Refusal(
        MD,
        _set("spec.fallback.version", "base"),
        "spec",
        "fallback.version 'base' is not one of the versions",
        ("spec", "fallback.version must be one of the versions"),
    ),
    "mdep a fallback to the only version": Refusal(
        MD,
        _set("spec.versions", ONE_VERSION),
        "spec",
        "fallback.version must name another version: 'tuned' is the only one, so a failed request would be "
        "retried on the version that just failed",
        (
            "spec",
            "fallback.version must name another version: a failed request would be retried on the version "
            "that just failed",
        ),
    ),
    "mdep a rollout with one version": Refusal(
        MD,
        _changes(
            _set("spec.versions", ONE_VERSION),
            _drop("spec.fallback"),
            _rollout([{"weight": 10, "pause": "1m"}]),
        ),
        "spec",
        "rollout needs at least two versions: the last one is the canary",
        ("spec", "rollout needs at least two versions: the last one is the canary"),
    ),
    "mdep canary steps that do not increase": Refusal(
        MD,
        _rollout(
            [{"weight": 10, "pause": "1m"}, {"weight": 50, "pause": "1m"}, {"weight": 50, "pause": "1m"}]
        ),
        "spec.rollout",
        "steps weights must increase, got [10, 50, 50]",
        ("spec.rollout", "steps weights must increase"),
        server_says="steps weights must increase",
    ),
    "mdep stickyBy header without header": Refusal(
        MD,
        _set("spec.routing", {"stickyBy": "header"}),
        "spec.routing",
        "header is required when stickyBy is header",
        ("spec.routing", "header is required when stickyBy is header"),
    ),
    "mdep a metric without bounds": Refusal(
        MD,
        _metric({"name": "errorRate"}),
        "spec.rollout.analysis.metrics[0]",
        "a metric needs min or max",
        ("spec.rollout.analysis.metrics[*]", "a metric needs min or max"),
    ),
    "mdep an unknown metric without a query": Refusal(
        MD,
        _metric({"name": "errors", "max": "0.1"}),
        "spec.rollout.analysis.metrics[0]",
        "'errors' is not a built-in metric (errorRate, p95Latency, timeToFirstToken, feedback); "
        "set query for a custom one",
        (
            "spec.rollout.analysis.metrics[*]",
            "name is not a built-in metric (errorRate, p95Latency, timeToFirstToken, feedback); set query",
        ),
    ),
    "mdep an analysis without metrics": Refusal(
        MD,
        _rollout([{"weight": 10, "pause": "1m"}], {"interval": "30s"}),
        "spec.rollout.analysis",
        deployment.METRICS_OR_SKIP,
        ("spec.rollout.analysis", deployment.METRICS_OR_SKIP),
    ),
    "mdep a skipped analysis with metrics": Refusal(
        MD,
        _rollout(
            [{"weight": 10, "pause": "1m"}], {"skip": True, "metrics": [{"name": "errorRate", "max": "1"}]}
        ),
        "spec.rollout.analysis",
        deployment.SKIP_WITHOUT_METRICS,
        ("spec.rollout.analysis", deployment.SKIP_WITHOUT_METRICS),
    ),
    "mdep a template without the input": Refusal(
        MD,
        _set("spec.prompts", [{"name": "p", "template": "answer briefly"}]),
        "spec.prompts[0]",
        "template must contain {{input}} (the user's message)",
        ("spec.prompts[*]", "template must contain {{input}} (the user's message)"),
    ),
    "mdep autoscaling min above max": Refusal(
        MD,
        _set("spec.serving.autoscaling", {"minReplicas": 3, "maxReplicas": 2}),
        "spec.serving.autoscaling",
        "minReplicas must not exceed maxReplicas",
        ("spec.serving.autoscaling", "minReplicas must not exceed maxReplicas"),
    ),
    "mdep scaleToZeroAfter without minReplicas 0": Refusal(
        MD,
        _set("spec.serving.autoscaling", {"minReplicas": 1, "scaleToZeroAfter": "10m"}),
        "spec.serving.autoscaling",
        "scaleToZeroAfter only applies with minReplicas 0",
        ("spec.serving.autoscaling", "scaleToZeroAfter only applies with minReplicas 0"),
    ),
    "mdep a zero scaleToZeroAfter": Refusal(
        MD,
        _set("spec.serving.autoscaling", {"minReplicas": 0, "scaleToZeroAfter": "0s"}),
        "spec.serving.autoscaling.scaleToZeroAfter",
        f"'0s' {POSITIVE}",
        ("spec.serving.autoscaling.scaleToZeroAfter", POSITIVE),
    ),
    "mdep engine vllm on a cpu target": Refusal(
        MD,
        _set("spec.serving.engine", "vllm"),
        "spec.serving.engine",
        "engine vllm needs target gpu; target is cpu",
        ("spec.serving", deployment.VLLM_NEEDS_GPU),
    ),
    "mdep vllm options with engine transformers": Refusal(
        MD,
        _set("spec.serving.vllm", {"dtype": "bfloat16"}),
        "spec.serving.vllm",
        "vllm only applies with engine vllm; engine is transformers",
        ("spec.serving", deployment.VLLM_OPTIONS_NEED_VLLM),
    ),
    "mdep a gpuMemoryUtilization above 1": Refusal(
        MD,
        _changes(
            _set("spec.serving.target", "gpu"),
            _set("spec.serving.engine", "vllm"),
            _set("spec.serving.vllm", {"gpuMemoryUtilization": "1.5"}),
        ),
        "spec.serving.vllm.gpuMemoryUtilization",
        'must be greater than 0 and at most 1 (got "1.5")',
        ("spec.serving.vllm.gpuMemoryUtilization", "must be greater than 0 and at most 1"),
    ),
    "mdep a zero holdTimeout": Refusal(
        MD,
        _set("spec.serving.autoscaling", {"minReplicas": 0, "holdTimeout": "0s"}),
        "spec.serving.autoscaling.holdTimeout",
        f"'0s' {POSITIVE}",
        ("spec.serving.autoscaling.holdTimeout", POSITIVE),
    ),
    "mdep a Redis password without a Redis": Refusal(
        MD,
        _set("spec.access", {"store": {"passwordSecretRef": {"name": "redis"}}}),
        "spec.access.store",
        deployment.PASSWORD_NEEDS_REDIS_URL,
        ("spec.access.store", deployment.PASSWORD_NEEDS_REDIS_URL),
    ),
    "mdep default temperature above its limit": Refusal(
        MD,
        _set("spec.generation", {"defaults": {"temperature": "1.5"}, "limits": {"maxTemperature": "1"}}),
        "spec.generation",
        "defaults.temperature must not be above limits.maxTemperature, got 1.5 > 1",
        ("spec.generation", "defaults.temperature must not be above limits.maxTemperature"),
    ),
    "mdep default topP above its limit": Refusal(
        MD,
        _set("spec.generation", {"defaults": {"topP": "0.9"}, "limits": {"maxTopP": "0.5"}}),
        "spec.generation",
        "defaults.topP must not be above limits.maxTopP, got 0.9 > 0.5",
        ("spec.generation", "defaults.topP must not be above limits.maxTopP"),
    ),
    "mdep default maxTokens above its limit": Refusal(
        MD,
        _set("spec.generation.defaults.maxTokens", 300),
        "spec.generation",
        "defaults.maxTokens must not be above limits.maxTokens, got 300 > 256",
        ("spec.generation", "defaults.maxTokens must not be above limits.maxTokens"),
        server_says="defaults.maxTokens must not be above limits.maxTokens",
    ),
    "mdep a zero pause": Refusal(
        MD,
        _rollout([{"weight": 10, "pause": "0s"}]),
        "spec.rollout.steps[0].pause",
        f"'0s' {POSITIVE}",
        ("spec.rollout.steps[*].pause", POSITIVE),
    ),
    "mdep a zero analysis interval": Refusal(
        MD,
        _rollout(
            [{"weight": 10, "pause": "1m"}],
            {"interval": "0m", "metrics": [{"name": "errorRate", "max": "0.1"}]},
        ),
        "spec.rollout.analysis.interval",
        f"'0m' {POSITIVE}",
        ("spec.rollout.analysis.interval", POSITIVE),
    ),
    "mdep a zero analysis window": Refusal(
        MD,
        _rollout(
            [{"weight": 10, "pause": "1m"}],
            {"window": "0s", "metrics": [{"name": "errorRate", "max": "0.1"}]},
        ),
        "spec.rollout.analysis.window",
        f"'0s' {POSITIVE}",
        ("spec.rollout.analysis.window", POSITIVE),
    ),
    "mdep a zero cache ttl": Refusal(
        MD,
        _set("spec.cache.ttl", "0s"),
        "spec.cache.ttl",
        f"'0s' {POSITIVE}",
        ("spec.cache.ttl", POSITIVE),
    ),
    "mdep a zero fallback timeout": Refusal(
        MD,
        _set("spec.fallback.timeout", "0ms"),
        "spec.fallback.timeout",
        f"'0ms' {POSITIVE}",
        ("spec.fallback.timeout", POSITIVE),
    ),
    "mdep a default temperature above 2": Refusal(
        MD,
        _set("spec.generation.defaults.temperature", "7"),
        "spec.generation.defaults.temperature",
        'must be between 0 and 2 (got "7")',
        ("spec.generation.defaults.temperature", "must be between 0 and 2"),
    ),
    "mdep a default topP of 0": Refusal(
        MD,
        _set("spec.generation.defaults.topP", "0"),
        "spec.generation.defaults.topP",
        'must be greater than 0 and at most 1 (got "0")',
        ("spec.generation.defaults.topP", "must be greater than 0 and at most 1"),
    ),
    "mdep a maxTemperature above 2": Refusal(
        MD,
        _set("spec.generation.limits.maxTemperature", "2.5"),
        "spec.generation.limits.maxTemperature",
        'must be between 0 and 2 (got "2.5")',
        ("spec.generation.limits.maxTemperature", "must be between 0 and 2"),
    ),
    "mdep a maxTopP above 1": Refusal(
        MD,
        _set("spec.generation.limits.maxTopP", "1.5"),
        "spec.generation.limits.maxTopP",
        'must be between 0 and 1 (got "1.5")',
        ("spec.generation.limits.maxTopP", "must be between 0 and 1"),
    ),
    "mdep a perKey costPerDay of 0": Refusal(
        MD,
        _set("spec.access.limits.perKey.costPerDay", "0"),
        "spec.access.limits.perKey.costPerDay",
        'must be greater than 0 (got "0")',
        ("spec.access.limits.perKey.costPerDay", "must be greater than 0"),
    ),
    "mdep a perKey costPerMonth of 0": Refusal(
        MD,
        _set("spec.access.limits.perKey.costPerMonth", "0"),
        "spec.access.limits.perKey.costPerMonth",
        'must be greater than 0 (got "0")',
        ("spec.access.limits.perKey.costPerMonth", "must be greater than 0"),
    ),
    "mdep a perTenant costPerDay of 0": Refusal(
        MD,
        _set("spec.access.limits.perTenant.costPerDay", "0"),
        "spec.access.limits.perTenant.costPerDay",
        'must be greater than 0 (got "0")',
        ("spec.access.limits.perTenant.costPerDay", "must be greater than 0"),
    ),
    "mdep a perTenant costPerMonth of 0": Refusal(
        MD,
        _set("spec.access.limits.perTenant.costPerMonth", "0"),
        "spec.access.limits.perTenant.costPerMonth",
        'must be greater than 0 (got "0")',
        ("spec.access.limits.perTenant.costPerMonth", "must be greater than 0"),
    ),
    "mdep a tenant's costPerDay of 0": Refusal(
        MD,
        _set("spec.access.limits.tenants", [{"tenant": "team-a", "limits": {"costPerDay": "0"}}]),
        "spec.access.limits.tenants[0].limits.costPerDay",
        'must be greater than 0 (got "0")',
        ("spec.access.limits.tenants[*].limits.costPerDay", "must be greater than 0"),
    ),
    "mdep a tenant's costPerMonth of 0": Refusal(
        MD,
        _set("spec.access.limits.tenants", [{"tenant": "team-a", "limits": {"costPerMonth": "0"}}]),
        "spec.access.limits.tenants[0].limits.costPerMonth",
        'must be greater than 0 (got "0")',
        ("spec.access.limits.tenants[*].limits.costPerMonth", "must be greater than 0"),
    ),
    "mdep a negative input price": Refusal(
        MD,
        _set("spec.versions.0.pricing", {"inputPerMillion": "-1"}),
        "spec.versions[0].pricing.inputPerMillion",
        'must not be negative (got "-1")',
        ("spec.versions[*].pricing.inputPerMillion", "must not be negative"),
    ),
    "mdep a negative output price": Refusal(
        MD,
        _set("spec.versions.0.pricing", {"outputPerMillion": "-1"}),
        "spec.versions[0].pricing.outputPerMillion",
        'must not be negative (got "-1")',
        ("spec.versions[*].pricing.outputPerMillion", "must not be negative"),
    ),
    "mdep a zero feedback maxAge": Refusal(
        MD,
        _set("spec.feedback", {"maxAge": "0s"}),
        "spec.feedback.maxAge",
        f"'0s' {POSITIVE}",
        ("spec.feedback.maxAge", POSITIVE),
    ),
    "mdep a zero feedback window": Refusal(
        MD,
        _set("spec.feedback", {"window": "0m"}),
        "spec.feedback.window",
        f"'0m' {POSITIVE}",
        ("spec.feedback.window", POSITIVE),
    ),
    "mdep repeated moderation categories": Refusal(
        MD,
        _moderation([{"name": "hate"}, {"name": "violence"}, {"name": "hate"}]),
        "spec.guardrails.moderation",
        "categories names must be unique; repeated: hate",
        ("spec.guardrails.moderation", "categories names must be unique"),
        server_says="categories names must be unique",
    ),
    "mdep a new moderation category without keywords or patterns": Refusal(
        MD,
        _moderation([{"name": "spam"}]),
        "spec.guardrails.moderation.categories[0]",
        f"{guardrails.UNSHIPPED_CATEGORY_NEEDS_LISTS}; 'spam' is not shipped",
        ("spec.guardrails.moderation.categories[*]", guardrails.UNSHIPPED_CATEGORY_NEEDS_LISTS),
        server_says=guardrails.UNSHIPPED_CATEGORY_NEEDS_LISTS,
    ),
}


def _rule_keys(definition: ResourceDefinition) -> set[tuple[str, str]]:
    """Every CEL rule of a kind by (path, message), but the immutability rule (tested on its own below)."""
    return {(rule.path, rule.message) for rule in definition.all_rules if "oldSelf" not in rule.rule}


def test_every_cel_rule_has_a_refusal_case() -> None:
    for definition in all_definitions():
        covered = {refusal.rule for refusal in REFUSALS.values() if refusal.kind == definition.kind}
        assert covered == _rule_keys(definition), definition.kind


@pytest.mark.parametrize("case", list(REFUSALS))
def test_the_api_server_refuses_what_kubetune_validate_refuses(
    control_plane: ControlPlane, kubetune_crds: list[str], namespace: str, case: str
) -> None:
    refusal = REFUSALS[case]
    doc = in_namespace(quickstart(refusal.kind), namespace)
    refusal.change(doc)

    offline = [(issue.path, issue.message) for issue in validate_documents([doc])]
    assert offline == [(refusal.path, refusal.says)]

    server_message = refusal.server_says or refusal.says
    assert refusal.says.startswith(server_message)
    status, server_says = apply(control_plane, doc, check=False)
    assert status != 0
    said = rf'{re.escape(refusal.path)}: Invalid value: (?:"[^"]*": )?{re.escape(server_message)}(?:$|, |\])'
    assert re.search(said, server_says, re.MULTILINE), server_says


def test_a_job_spec_is_immutable_there_as_in_local_mode(
    control_plane: ControlPlane, kubetune_crds: list[str], namespace: str, tmp_path: Path
) -> None:
    doc = in_namespace(quickstart("FineTuneJob"), namespace)
    changed = copy.deepcopy(doc)
    changed["spec"]["training"]["epochs"] = 5

    apply(control_plane, doc)
    status, server_says = apply(control_plane, changed, check=False)
    assert status != 0
    assert "spec: Invalid value" in server_says, server_says
    assert "spec is immutable; create a new FineTuneJob" in server_says, server_says

    store = LocalStore(tmp_path)
    definition = get_definition("FineTuneJob")
    store.apply(definition.plural, doc, immutable_spec=definition.immutable_spec)
    with pytest.raises(ApplyError, match="spec: spec is immutable"):
        store.apply(definition.plural, changed, immutable_spec=definition.immutable_spec)


# -- valid manifests: accepted, and defaulted as the models default -----------------------------------


@pytest.fixture(scope="module")
def quickstart_namespace(control_plane: ControlPlane, kubetune_crds: list[str]) -> str:
    """The quickstart's three resources, applied into a namespace of their own."""
    namespace = control_plane.create_namespace()
    for kind in ("FineTuneJob", "QuantizeJob", "ModelDeployment"):
        apply(control_plane, in_namespace(quickstart(kind), namespace))
    return namespace


@pytest.mark.parametrize("kind", ["FineTuneJob", "QuantizeJob", "ModelDeployment"])
def test_the_api_server_fills_in_the_models_defaults(
    control_plane: ControlPlane, quickstart_namespace: str, kind: str
) -> None:
    doc = in_namespace(quickstart(kind), quickstart_namespace)
    spec = stored(control_plane, doc)["spec"]
    model = parse_resource(doc)
    expected = model.model_dump(mode="json", by_alias=True, exclude_none=True)["spec"]
    assert spec == expected
    assert spec != doc["spec"]  # the quickstart leaves defaults out: the server wrote them


def test_a_rollout_on_timing_alone_is_accepted(
    control_plane: ControlPlane, kubetune_crds: list[str], namespace: str
) -> None:
    """``analysis: {skip: true}`` leaves metrics out; the rule ``size(self.metrics) == 0`` reads the
    schema's ``[]`` default (without it the API server reports "no such key: metrics")."""
    doc = in_namespace(quickstart("ModelDeployment"), namespace)
    doc["spec"]["rollout"] = {"steps": [{"weight": 10, "pause": "1m"}], "analysis": {"skip": True}}
    assert validate_documents([doc]) == []
    apply(control_plane, doc)
    assert stored(control_plane, doc)["spec"]["rollout"]["analysis"]["metrics"] == []


# -- kubectl get prints the printer columns -----------------------------------------------------------


def _headers(table: str) -> list[list[str]]:
    """The header row of each table kubectl printed (columns are separated by two or more spaces)."""
    return [re.split(r"\s{2,}", line.strip()) for line in table.splitlines() if line.startswith("NAME")]


def _columns(definition: ResourceDefinition, *, wide: bool) -> list[str]:
    return ["NAME"] + [
        column.name.upper() for column in definition.printer_columns if wide or column.priority == 0
    ]


def test_kubectl_get_kubetune_prints_every_kinds_columns(
    control_plane: ControlPlane, quickstart_namespace: str
) -> None:
    table = control_plane.kubectl("get", "kubetune", "-n", quickstart_namespace).stdout
    assert sorted(_headers(table)) == sorted(_columns(d, wide=False) for d in all_definitions())
    assert _columns(get_definition("FineTuneJob"), wide=False) == [
        "NAME",
        "STATUS",
        "PROGRESS %",
        "BASE MODEL",
        "AGE",
    ]


def test_kubectl_get_ftj_wide_prints_the_wide_columns(
    control_plane: ControlPlane, quickstart_namespace: str
) -> None:
    table = control_plane.kubectl("get", "ftj", "-o", "wide", "-n", quickstart_namespace).stdout
    assert _headers(table) == [
        ["NAME", "STATUS", "PROGRESS %", "BASE MODEL", "AGE", "METHOD", "EVAL LOSS", "OUTPUT", "REASON"]
    ]
    assert "support-router" in table and "./.kubetune/models/tiny-base" in table and "lora" in table
