"""The three kinds kubetune serves: FineTuneJob, QuantizeJob and ModelDeployment.

Each definition names the kind's models (kubetune_contract), its ``kubectl get`` columns and the CEL
rules that mirror its pydantic cross-field checks, with the same messages. Adding a kind: write its
models in kubetune_contract, add a definition here and to :data:`BUILTIN_KINDS`, run
``kubetune crds --out-dir manifests/crds`` and commit the new file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Set
from typing import Any, get_args

from pydantic import BaseModel

from kubetune.api.definition import CelRule, PrinterColumn, ResourceDefinition
from kubetune_contract import deployment, finetune, guardrails, quantize
from kubetune_contract.common import DecimalRange

# Shared by the kinds: the columns and rules every job has, and the age column of every kind.
JOB_STATUS_COLUMN = PrinterColumn(
    "Status", ".status.phase", description="Pending, Running, Succeeded or Failed (status.phase)."
)
JOB_REASON_COLUMN = PrinterColumn(
    "Reason",
    '.status.conditions[?(@.type=="Succeeded")].reason',
    description="Why the job is in its phase (reason of the Succeeded condition).",
    priority=1,
)
AGE_COLUMN = PrinterColumn("Age", ".metadata.creationTimestamp", "date")


def _text(value: str) -> str:
    """A CEL string literal (JSON's escapes are CEL's)."""
    return json.dumps(value)


def _quoted(expression: str) -> str:
    """CEL: a string value in double quotes, as ``kubetune validate`` shows one (``"7"``)."""
    return f'"\\"" + {expression} + "\\""'


def _python_repr(expression: str) -> str:
    """CEL: a string value in single quotes, as the models' messages show a name (``'tuned'``)."""
    return f'"\'" + {expression} + "\'"'


def _indices(limit: int) -> str:
    """CEL: ``[0, 1, ..., limit - 1]`` (standard CEL has no range; the schema bounds every list)."""
    return "[" + ", ".join(str(i) for i in range(limit)) + "]"


def _range_rule(path: str, bounds: DecimalRange) -> CelRule:
    """A decimal string within ``bounds``, compared as a double (as the code reads it, a float)."""
    low = f"double(self) {'>' if bounds.above_minimum else '>='} {float(bounds.minimum)!r}"
    high = f" && double(self) <= {float(bounds.maximum)!r}" if bounds.maximum is not None else ""
    return CelRule(
        path,
        low + high,
        bounds.describe(),
        message_expression=f'{_text(bounds.describe() + " (got ")} + {_quoted("self")} + ")"',
    )


def _schema_nodes(
    node: Mapping[str, Any], defs: Mapping[str, Any], path: str
) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Every (path, node) of a model's JSON schema, ``$ref`` and optionals followed, list items as ``[*]``."""
    while True:
        if "$ref" in node:
            node = {
                **defs[str(node["$ref"]).rsplit("/", 1)[-1]],
                **{k: v for k, v in node.items() if k != "$ref"},
            }
        elif "anyOf" in node:
            members = [member for member in node["anyOf"] if member != {"type": "null"}]
            node = {**members[0], **{k: v for k, v in node.items() if k != "anyOf"}}
        else:
            break
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from _schema_nodes(sub, defs, f"{path}.{name}".lstrip("."))
    if isinstance(node.get("items"), Mapping):
        yield from _schema_nodes(node["items"], defs, f"{path}[*]")


def _field_rules(model: type[BaseModel]) -> tuple[CelRule, ...]:
    """The rules a field's pattern cannot express: a decimal string's range (``DecimalRange``) and a
    duration above 0 (``PositiveDuration``)."""
    schema = model.model_json_schema(by_alias=True, mode="validation")
    rules: list[CelRule] = []
    for path, node in _schema_nodes(schema, schema.get("$defs", {}), ""):
        if (bounds := DecimalRange.from_schema(node)) is not None:
            rules.append(_range_rule(path, bounds))
        if node.get(deployment.POSITIVE_DURATION_KEY):
            rules.append(
                CelRule(
                    path,
                    'duration(self) > duration("0s")',
                    "must be longer than 0s",
                    message_expression=f'{_python_repr("self")} + " must be longer than 0s"',
                )
            )
    return tuple(rules)


SPLIT_RULE = CelRule(
    "spec.dataset",
    "has(self.validationUri) || (double(self.validationSplit) > 0.0 && double(self.validationSplit) < 1.0)",
    "must be above 0 and below 1 when validationUri is not set",
    message_expression=(
        'double(self.validationSplit) <= 0.0 ? "must be above 0 when validationUri is not set (got " + '
        f'{_quoted("self.validationSplit")} + ")" : "must be below 1 when validationUri is not set, to '
        f'leave examples to train on (got " + {_quoted("self.validationSplit")} + ")"'
    ),
    field_path=".validationSplit",
)


def _block_rules(blocks: Mapping[str, str | None]) -> tuple[CelRule, ...]:
    """Mirror the methods' ``_own_block_only``: only the block named by ``type`` may be set (it is
    optional); a method without options (no block) refuses every block. Messages as the models word them."""
    allowed = {
        method_type: f"only {block} may be set" if block else "it takes no options block"
        for method_type, block in blocks.items()
    }
    return tuple(
        CelRule(
            "spec.method",
            f'!has(self.{block}) || self.type == "{method_type}"',
            f"method.{block} may only be set when method.type is {method_type}",
            message_expression=(
                f'"{block} is set but type is " + {_python_repr("self.type")} + "; " + '
                f"{json.dumps(allowed)}[self.type]"
            ),
        )
        for method_type, block in blocks.items()
        if block is not None
    )


def _method_block_rules() -> tuple[CelRule, ...]:
    return _block_rules(finetune.METHOD_BLOCKS)


def _distillation_rules() -> tuple[CelRule, ...]:
    """Mirror ``Method._own_block_only`` for blocks without defaults, and
    ``DistillationTeacher._exactly_one``."""
    required = tuple(
        CelRule(
            "spec.method",
            f'self.type != "{method_type}" || has(self.{block})',
            f"type {method_type} needs {block} ({finetune.BLOCKS_REQUIRED[block]})",
        )
        for method_type, block in finetune.METHOD_BLOCKS.items()
        if block in finetune.BLOCKS_REQUIRED
    )
    teacher = CelRule(
        "spec.method.distillation.teacher",
        "has(self.fineTuneJobRef) != has(self.uri)",
        "set exactly one of fineTuneJobRef and uri",
    )
    return (*required, teacher)


def _merge_rule() -> CelRule:
    """Mirror ``FineTuneJobSpec._mergeable``: only some adapters can be folded into the base weights."""
    unmergeable = sorted(finetune.PEFT_METHODS - finetune.MERGEABLE_METHODS)
    return CelRule(
        "spec",
        f"!self.output.mergeAdapter || !(self.method.type in {json.dumps(unmergeable)})",
        "output.mergeAdapter: only lora and ia3 adapters can be merged into the base weights",
        message_expression=(
            '"output.mergeAdapter: a " + self.method.type + " adapter cannot be merged into the base '
            'weights; only lora and ia3 can"'
        ),
    )


def _periodic_evaluation_rules() -> tuple[CelRule, ...]:
    """Mirror ``FineTuneJobSpec._periodic_evaluation`` and the evaluation's reference-set rules."""
    return (
        CelRule(
            "spec",
            'self.output.select != "best" || has(self.training.evalEverySteps)',
            "best needs training.evalEverySteps",
            field_path=".output.select",
        ),
        CelRule(
            "spec",
            'self.output.select != "best" || self.output.selectMetric != "exactMatch" || '
            '"exactMatch" in self.evaluation.metrics',
            "exactMatch is not in evaluation.metrics",
            field_path=".output.selectMetric",
        ),
        CelRule(
            "spec",
            "!has(self.training.earlyStopping) || has(self.training.evalEverySteps)",
            "needs training.evalEverySteps",
            field_path=".training.earlyStopping",
        ),
        CelRule(
            "spec",
            '!has(self.training.earlyStopping) || self.training.earlyStopping.metric != "exactMatch" || '
            '"exactMatch" in self.evaluation.metrics',
            "exactMatch is not in evaluation.metrics",
            field_path=".training.earlyStopping.metric",
        ),
        CelRule(
            "spec.evaluation",
            "!has(self.maxReferenceDrop) || size(self.reference) > 0",
            "needs at least one set in evaluation.reference to apply to",
            field_path=".maxReferenceDrop",
        ),
        CelRule(
            "spec.evaluation.reference",
            "self.all(x, self.exists_one(y, y.name == x.name))",
            "reference names must be unique",
        ),
        CelRule(
            "spec.evaluation.reference[*]",
            'self.metric != "exactMatch" || self.format != "text"',
            "exactMatch needs responses to compare: format instruction or chat",
            field_path=".metric",
        ),
    )


def _harness_rules() -> tuple[CelRule, ...]:
    """Mirror ``finetune._harness_rules_broken``: unique task names, gates on declared tasks."""
    return (
        CelRule(
            "spec.evaluation.harness.gates[*]",
            "has(self.min) || has(self.max) || has(self.minImprovement)",
            "a gate needs min, max or minImprovement",
        ),
        CelRule(
            "spec.evaluation.harness.tasks",
            "self.all(x, self.exists_one(y, y.name == x.name))",
            finetune.HARNESS_TASKS_UNIQUE,
        ),
        CelRule(
            "spec.evaluation.harness",
            "self.gates.all(g, self.tasks.exists(t, t.name == g.task))",
            finetune.HARNESS_GATE_TASK_UNKNOWN,
            field_path=".gates",
        ),
    )


def _training_target_rules() -> tuple[CelRule, ...]:
    """Mirror ``finetune._training_rules_broken``: QLoRA needs a GPU target; fsdp shards full fine-tuning;
    packing refuses virtual-token adapters."""
    targets = sorted(finetune.QUANTIZED_TRAINING_TARGETS)
    return (
        CelRule(
            "spec",
            "!has(self.method.lora) || !has(self.method.lora.quantization) || "
            f"self.target in {json.dumps(targets)}",
            "4-bit QLoRA (bitsandbytes) needs target gpu",
            message_expression='"4-bit QLoRA (bitsandbytes) needs target gpu; target is " + self.target',
            field_path=".method.lora.quantization",
        ),
        CelRule(
            "spec",
            '!has(self.training.distributed) || self.training.distributed.strategy != "fsdp" || '
            'self.method.type == "full"',
            "fsdp shards the weights of method full; an adapter trains with ddp",
            message_expression=(
                '"fsdp shards the weights of method full; a " + self.method.type + " adapter trains with ddp"'
            ),
            field_path=".training.distributed.strategy",
        ),
        CelRule(
            "spec",
            '!has(self.training.distributed) || self.training.distributed.strategy != "fsdp" || '
            "!has(self.training.evalEverySteps)",
            finetune.FSDP_WITHOUT_PERIODIC_EVALUATION,
            field_path=".training.distributed.strategy",
        ),
        CelRule(
            "spec",
            "!self.training.packing || "
            f"!(self.method.type in {json.dumps(sorted(finetune.VIRTUAL_TOKEN_METHODS))})",
            "packing keeps examples apart by their position ids, which virtual tokens do not follow",
            message_expression=(
                '"packing keeps examples apart by their position ids, which the virtual tokens of " + '
                'self.method.type + " do not follow; use lora, ia3 or full"'
            ),
            field_path=".training.packing",
        ),
    )


def _preference_rules() -> tuple[CelRule, ...]:
    """Mirror ``finetune._preference_rules_broken`` and ``PreferenceOptions._adapter_options``."""
    methods = json.dumps(sorted(finetune.PREFERENCE_FORMATS))
    formats = json.dumps(sorted(finetune.PREFERENCE_FORMATS.values()))
    format_of = json.dumps(finetune.PREFERENCE_FORMATS)
    method_of = json.dumps({fmt: method for method, fmt in finetune.PREFERENCE_FORMATS.items()})
    options = tuple(
        rule
        for block in sorted(finetune.PREFERENCE_FORMATS)
        for rule in (
            CelRule(
                f"spec.method.{block}",
                '!has(self.lora) || self.weights == "lora"',
                "lora is set but weights is not lora; it needs weights lora",
                message_expression=(
                    '"lora is set but weights is \'" + self.weights + "\'; it needs weights lora"'
                ),
            ),
            CelRule(
                f"spec.method.{block}",
                "!has(self.lora) || !has(self.lora.quantization)",
                "lora.quantization: 4-bit bases are not supported with preference tuning",
            ),
        )
    )
    return (
        CelRule(
            "spec",
            f"!(self.method.type in {methods}) || self.dataset.format == {format_of}[self.method.type]",
            "method.type dpo trains on format preference, kto on format feedback",
            message_expression=(
                '"method.type " + self.method.type + " trains on format " + '
                f'{format_of}[self.method.type] + ", not " + self.dataset.format'
            ),
            field_path=".dataset.format",
        ),
        CelRule(
            "spec",
            f"!(self.dataset.format in {formats}) || self.method.type == {method_of}[self.dataset.format]",
            "dataset.format preference trains with method dpo, feedback with method kto",
            message_expression=(
                '"dataset.format " + self.dataset.format + " trains with method " + '
                f'{method_of}[self.dataset.format] + ", not " + self.method.type'
            ),
            field_path=".method.type",
        ),
        CelRule(
            "spec",
            f"!self.training.packing || !(self.method.type in {methods})",
            "dpo and kto compare whole completions; they cannot pack them",
            message_expression='self.method.type + " compares whole completions; it cannot pack them"',
            field_path=".training.packing",
        ),
        CelRule(
            "spec",
            f"!has(self.training.replay) || !(self.method.type in {methods})",
            "dpo and kto learn from preference or feedback rows; replayed examples have none",
            message_expression=(
                'self.method.type + " learns from " + '
                f'{format_of}[self.method.type] + " rows; replayed examples have none"'
            ),
            field_path=".training.replay",
        ),
        CelRule(
            "spec",
            f'!("preferenceAccuracy" in self.evaluation.metrics) || self.dataset.format in {formats}',
            "preferenceAccuracy needs dataset.format preference or feedback",
            message_expression=(
                '"preferenceAccuracy needs dataset.format preference or feedback, not " + self.dataset.format'
            ),
            field_path=".evaluation.metrics",
        ),
        *options,
    )


CROSS_VALIDATION_RULE = CelRule(
    "spec",
    "!has(self.evaluation.crossValidation) || !has(self.training.distributed)",
    finetune.CROSS_VALIDATION_NOT_DISTRIBUTED,
    field_path=".evaluation.crossValidation",
)
"""Mirror ``FineTuneJobSpec._cross_validation``."""


FINETUNEJOB = ResourceDefinition(
    kind=finetune.KIND,
    plural=finetune.PLURAL,
    singular=finetune.KIND.lower(),
    short_names=tuple(finetune.SHORT_NAMES),
    model=finetune.FineTuneJob,
    spec_model=finetune.FineTuneJobSpec,
    status_model=finetune.FineTuneJobStatus,
    description=(
        "FineTuneJob adapts a base model to a domain: it curates and splits a JSONL dataset, trains "
        "with LoRA, prefix/prompt tuning, IA3 or full fine-tuning, evaluates the tuned model against "
        "the base model, and publishes it if every gate passes. The spec is immutable: to change a "
        "run, create a new FineTuneJob."
    ),
    printer_columns=(
        JOB_STATUS_COLUMN,
        PrinterColumn(
            "Progress %", ".status.progress.percent", "integer", "Training steps done, in percent."
        ),
        PrinterColumn("Base Model", ".spec.baseModel.uri", description="The model being adapted."),
        AGE_COLUMN,
        PrinterColumn("Method", ".spec.method.type", description="Adaptation method.", priority=1),
        PrinterColumn(
            "Eval Loss", ".status.evaluation.final.evalLoss", "number", "Held-out loss of the tuned model.", 1
        ),
        PrinterColumn(
            "Output", ".status.output.uri", description="Where the tuned model was published.", priority=1
        ),
        JOB_REASON_COLUMN,
    ),
    rules=(
        *_method_block_rules(),
        *_distillation_rules(),
        _merge_rule(),
        CelRule(
            "spec.dataset.curation", "self.minTokens <= self.maxTokens", "minTokens must not exceed maxTokens"
        ),
        CelRule(
            "spec.evaluation.gates[*]",
            "has(self.min) || has(self.max) || has(self.minImprovement)",
            "a gate needs min, max or minImprovement",
        ),
        SPLIT_RULE,
        *_periodic_evaluation_rules(),
        *_training_target_rules(),
        *_preference_rules(),
        CROSS_VALIDATION_RULE,
        *_harness_rules(),
        *_field_rules(finetune.FineTuneJob),
    ),
)


def _quantize_block_rules() -> tuple[CelRule, ...]:
    """Mirror ``QuantizeMethod._own_block_only``: only the block named by ``type`` may be set.

    Methods without options (``int8-weight-only``, ``int8-dynamic``) own no block, so every block is refused.
    """
    return _block_rules(quantize.METHOD_BLOCKS)


def _cel_list(values: Set[str]) -> str:
    return "[" + ", ".join(f'"{v}"' for v in sorted(values)) + "]"


def _target_in(allowed: Set[str]) -> str:
    """CEL: ``self.target`` is one of ``allowed`` (``spec`` is ``self``; ``target`` has a default)."""
    if len(allowed) == 1:
        return f'self.target == "{next(iter(allowed))}"'
    return f"self.target in {_cel_list(allowed)}"


def _refused(allowed: Set[str]) -> str:
    """The targets outside ``allowed``, for messages: ``cpu`` or ``cpu or tpu``."""
    return " or ".join(sorted(set(get_args(quantize.Target)) - set(allowed)))


def _quantize_target_rules(
    supported: Mapping[str, Set[str]] = quantize.SUPPORTED_TARGETS,
) -> tuple[CelRule, ...]:
    """Mirror ``QuantizeJobSpec._target_supported``: unsupported method/target pairs, naming both.

    One rule per method that does not run on every target (none today), plus the finer GPU-only options:
    2:4 semi-structured pruning and fp16 mixed precision. Messages repeat the pydantic ones.
    """
    every_target = set(get_args(quantize.Target))
    rules = [
        CelRule(
            "spec",
            f'self.method.type != "{method}" || {_target_in(targets)}',
            f"method {method} does not support target {_refused(targets)}",
        )
        for method, targets in supported.items()
        if set(targets) != every_target
    ]
    semi = quantize.SEMI_STRUCTURED_TARGETS
    fp16 = quantize.FP16_TARGETS
    rules += [
        CelRule(
            "spec",
            f'!(has(self.method.pruning) && self.method.pruning.pattern == "2:4") || {_target_in(semi)}',
            f"pruning pattern 2:4 does not support target {_refused(semi)} (GPU only)",
        ),
        CelRule(
            "spec",
            f'!(has(self.method.mixedPrecision) && self.method.mixedPrecision.dtype == "fp16") || '
            f"{_target_in(fp16)}",
            f"mixed-precision fp16 does not support target {_refused(fp16)}; use bf16",
        ),
    ]
    return tuple(rules)


QUANTIZEJOB = ResourceDefinition(
    kind=quantize.KIND,
    plural=quantize.PLURAL,
    singular=quantize.KIND.lower(),
    short_names=tuple(quantize.SHORT_NAMES),
    model=quantize.QuantizeJob,
    spec_model=quantize.QuantizeJobSpec,
    status_model=quantize.QuantizeJobStatus,
    description=(
        "QuantizeJob shrinks a model (a FineTuneJob's published output, or any model URI) for a CPU or "
        "GPU target: int8 or int4 weight-only or int8 dynamic quantization, quantization-aware "
        "training, pruning or mixed precision. It measures size, latency and quality before and after, "
        "and publishes the result if every gate passes. The spec is immutable: to change a run, create "
        "a new QuantizeJob."
    ),
    printer_columns=(
        JOB_STATUS_COLUMN,
        PrinterColumn("Method", ".spec.method.type", description="Quantization method."),
        PrinterColumn("Target", ".spec.target", description="Where the model will be served (cpu or gpu)."),
        PrinterColumn(
            "Size Ratio", ".status.report.sizeRatio", "number", "Size of the result / size of the source."
        ),
        AGE_COLUMN,
        PrinterColumn(
            "Source",
            ".status.source.uri",
            description="The model being shrunk, as resolved (a FineTuneJob's output or spec.model.uri).",
            priority=1,
        ),
        PrinterColumn(
            "Output", ".status.output.uri", description="Where the shrunk model was published.", priority=1
        ),
        JOB_REASON_COLUMN,
    ),
    rules=(
        CelRule(
            "spec.model",
            "has(self.fineTuneJobRef) != has(self.uri)",
            "set exactly one of fineTuneJobRef and uri",
        ),
        *_quantize_block_rules(),
        *_quantize_target_rules(),
        CelRule(
            "spec",
            'self.method.type != "qat" || has(self.dataset) || has(self.model.fineTuneJobRef)',
            "qat trains: set dataset (or take the model from a fineTuneJobRef)",
        ),
        CelRule(
            "spec.dataset.curation", "self.minTokens <= self.maxTokens", "minTokens must not exceed maxTokens"
        ),
        CelRule(
            "spec.dataset",
            f"!(self.format in {json.dumps(sorted(finetune.PREFERENCE_FORMATS.values()))})",
            quantize.PAIR_FORMATS_NOT_CALIBRATION,
            field_path=".format",
        ),
        CelRule("spec.evaluation.gates[*]", "has(self.min) || has(self.max)", "a gate needs min or max"),
        SPLIT_RULE,
        *_field_rules(quantize.QuantizeJob),
    ),
)


_BUILTIN_METRICS = ", ".join(deployment.BUILTIN_METRICS)
MAX_CANARY_STEPS: int = deployment.Rollout.model_json_schema()["properties"]["steps"]["maxItems"]


def _default_within_limit_rules() -> tuple[CelRule, ...]:
    """Mirror ``Generation``'s rule: a default above its limit would make requests that omit it fail."""
    rules = []
    for default, limit in deployment.DEFAULTS_AND_LIMITS:
        # maxTokens are integers, which a message cannot show (see CelRule.message_expression); the
        # sampling parameters are decimal strings, which it can.
        integers = default == "maxTokens"
        number = "{}" if integers else "double({})"
        rule = f"defaults.{default} must not be above limits.{limit}"
        rules.append(
            CelRule(
                "spec.generation",
                f"!has(self.defaults.{default}) || !has(self.limits.{limit}) || "
                f"{number.format(f'self.defaults.{default}')} <= {number.format(f'self.limits.{limit}')}",
                rule,
                message_expression=None
                if integers
                else f'"{rule}, got " + self.defaults.{default} + " > " + self.limits.{limit}',
            )
        )
    return tuple(rules)


def _moderation_rules() -> tuple[CelRule, ...]:
    """Mirror ``guardrails.ModerationCategory`` and ``Moderation``: a category that is not shipped needs
    keywords or patterns; category names are unique. On the paths the models name: the category, and
    the moderation block."""
    shipped = _cel_list(set(guardrails.MODERATION_CATEGORIES))
    return (
        CelRule(
            "spec.guardrails.moderation.categories[*]",
            f"self.name in {shipped} || (has(self.keywords) && size(self.keywords) > 0) || "
            "(has(self.patterns) && size(self.patterns) > 0)",
            guardrails.UNSHIPPED_CATEGORY_NEEDS_LISTS,
        ),
        CelRule(
            "spec.guardrails.moderation",
            "self.categories.all(c, self.categories.exists_one(d, d.name == c.name))",
            "categories names must be unique",
        ),
    )


def _serving_engine_rules() -> tuple[CelRule, ...]:
    """Mirror ``deployment._serving_rules_broken``: vllm needs a GPU target; its options need it."""
    return (
        CelRule(
            "spec.serving",
            f'self.engine != "vllm" || self.target in {json.dumps(sorted(deployment.VLLM_TARGETS))}',
            deployment.VLLM_NEEDS_GPU,
            message_expression=f"{_text(deployment.VLLM_NEEDS_GPU + '; target is ')} + self.target",
            field_path=".engine",
        ),
        CelRule(
            "spec.serving",
            '!has(self.vllm) || self.engine == "vllm"',
            deployment.VLLM_OPTIONS_NEED_VLLM,
            message_expression=f"{_text(deployment.VLLM_OPTIONS_NEED_VLLM + '; engine is ')} + self.engine",
            field_path=".vllm",
        ),
    )


MODELDEPLOYMENT = ResourceDefinition(
    kind=deployment.KIND,
    plural=deployment.PLURAL,
    singular=deployment.KIND.lower(),
    short_names=tuple(deployment.SHORT_NAMES),
    model=deployment.ModelDeployment,
    spec_model=deployment.ModelDeploymentSpec,
    status_model=deployment.ModelDeploymentStatus,
    immutable_spec=False,
    description=(
        "ModelDeployment serves model versions (FineTuneJob or QuantizeJob outputs, or model URIs) as "
        "BentoML services behind one OpenAI-compatible gateway: weighted sticky A/B routing, prompt "
        "templates, generation limits, caching and fallback, and canary rollouts judged by Prometheus "
        "metrics with automatic rollback. The spec is mutable: weight changes apply in place."
    ),
    printer_columns=(
        PrinterColumn(
            "Ready", '.status.conditions[?(@.type=="Ready")].status', description="Every version serving."
        ),
        PrinterColumn("Versions", ".status.readyVersions", description="Ready versions / all versions."),
        PrinterColumn("Weights", ".status.weights", description="Traffic split now, in percent."),
        PrinterColumn("Rollout", ".status.rollout.state", description="Canary rollout state, if any."),
        AGE_COLUMN,
        PrinterColumn("Endpoint", ".status.endpoint", description="OpenAI-compatible base URL.", priority=1),
        PrinterColumn(
            "Reason",
            '.status.conditions[?(@.type=="Ready")].reason',
            description="Why the deployment is (not) ready.",
            priority=1,
        ),
    ),
    max_name_length=40,  # its children are named <name>-<version>-..., which must fit in 63
    rules=(
        CelRule(
            "spec",
            "self.versions.map(v, v.weight).sum() == 100",
            "versions weights must sum to 100",
        ),
        CelRule(
            "spec",
            "self.versions.all(v, self.versions.exists_one(w, w.name == v.name))",
            "versions names must be unique",
        ),
        CelRule(
            "spec",
            "self.prompts.all(p, self.prompts.exists_one(q, q.name == p.name))",
            "prompts names must be unique",
        ),
        CelRule(
            "spec.versions[*].model",
            "(has(self.fineTuneJobRef) ? 1 : 0) + (has(self.quantizeJobRef) ? 1 : 0) + "
            "(has(self.uri) ? 1 : 0) == 1",
            "set exactly one of fineTuneJobRef, quantizeJobRef and uri",
        ),
        CelRule(
            "spec",
            "self.versions.all(v, !has(v.prompt) || self.prompts.exists(p, p.name == v.prompt))",
            "a version's prompt must name an entry of prompts",
        ),
        CelRule(
            "spec",
            "self.promptParts.all(p, self.promptParts.exists_one(q, q.name == p.name))",
            deployment.PROMPT_PARTS_UNIQUE,
        ),
        CelRule(
            "spec.promptParts[*]",
            f"!(self.name in {json.dumps(list(deployment.GENERATED_PROMPT_PARTS))})",
            deployment.GENERATED_NAME_TAKEN,
        ),
        CelRule(
            "spec",
            "self.prompts.all(p, p.systemParts.all(n, "
            f"n in {json.dumps(list(deployment.GENERATED_PROMPT_PARTS))} || "
            "self.promptParts.exists(q, q.name == n)))",
            deployment.SYSTEM_PARTS_RESOLVE,
        ),
        CelRule(
            "spec.prompts[*].constitution",
            "self.principles.all(p, self.principles.exists_one(q, q.name == p.name))",
            deployment.PRINCIPLES_UNIQUE,
        ),
        CelRule(
            "spec",
            "!has(self.fallback) || self.versions.exists(v, v.name == self.fallback.version)",
            "fallback.version must be one of the versions",
            message_expression=(
                f'"fallback.version " + {_python_repr("self.fallback.version")} + '
                '" is not one of the versions"'
            ),
        ),
        CelRule(
            "spec",
            "!has(self.fallback) || self.versions.exists(v, v.name != self.fallback.version)",
            "fallback.version must name another version: a failed request would be retried on the "
            "version that just failed",
            message_expression=(
                f'"fallback.version must name another version: " + {_python_repr("self.fallback.version")} + '
                '" is the only one, so a failed request would be retried on the version that just failed"'
            ),
        ),
        CelRule(
            "spec",
            "!has(self.rollout) || self.versions.size() >= 2",
            "rollout needs at least two versions: the last one is the canary",
        ),
        CelRule(
            "spec.rollout",
            f"{_indices(MAX_CANARY_STEPS - 1)}.all(i, i + 1 >= size(self.steps) || "
            "self.steps[i].weight < self.steps[i + 1].weight)",
            "steps weights must increase",
        ),
        CelRule(
            "spec.routing",
            'self.stickyBy != "header" || has(self.header)',
            "header is required when stickyBy is header",
        ),
        CelRule(
            "spec.rollout.analysis.metrics[*]",
            "has(self.min) || has(self.max)",
            "a metric needs min or max",
        ),
        CelRule(
            "spec.rollout.analysis.metrics[*]",
            f"has(self.query) || self.name in {json.dumps(list(deployment.BUILTIN_METRICS))}",
            f"name is not a built-in metric ({_BUILTIN_METRICS}); set query",
            message_expression=(
                f"{_python_repr('self.name')} + "
                f"{_text(f' is not a built-in metric ({_BUILTIN_METRICS}); set query for a custom one')}"
            ),
        ),
        CelRule("spec.rollout.analysis", "self.skip || size(self.metrics) > 0", deployment.METRICS_OR_SKIP),
        CelRule(
            "spec.rollout.analysis", "!self.skip || size(self.metrics) == 0", deployment.SKIP_WITHOUT_METRICS
        ),
        CelRule(
            "spec.prompts[*]",
            'self.template.contains("{{input}}")',
            "template must contain {{input}} (the user's message)",
        ),
        CelRule(
            "spec.serving.autoscaling",
            "self.minReplicas <= self.maxReplicas",
            "minReplicas must not exceed maxReplicas",
        ),
        CelRule(
            "spec.serving.autoscaling",
            "!has(self.scaleToZeroAfter) || self.minReplicas == 0",
            deployment.SCALE_TO_ZERO_AFTER_NEEDS_ZERO,
        ),
        CelRule(
            "spec.access.store",
            "!has(self.passwordSecretRef) || has(self.redisUrl)",
            deployment.PASSWORD_NEEDS_REDIS_URL,
        ),
        *_serving_engine_rules(),
        *_default_within_limit_rules(),
        *_moderation_rules(),
        *_field_rules(deployment.ModelDeployment),
    ),
)


BUILTIN_KINDS: tuple[ResourceDefinition, ...] = (FINETUNEJOB, QUANTIZEJOB, MODELDEPLOYMENT)
