"""The CRD's CEL rules (x-kubernetes-validations), evaluated with cel-python the way the API server does.

The API server first applies schema defaults, then checks the schema, then evaluates each rule with
``self`` bound to the node it is attached to (and ``oldSelf`` to the stored value on updates; rules that
use ``oldSelf`` are skipped on create). This file mimics that, and shows that schema + CEL and the
pydantic models accept and reject the same documents.
"""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

import celpy
import jsonschema
import pytest
from celpy.adapter import json_to_cel
from celpy.evaluation import CELEvalError

from kubetune.api.crd import all_crds, build_crd
from kubetune.api.definition import ResourceDefinition
from kubetune.api.kinds import FINETUNEJOB
from kubetune.api.registry import all_definitions
from kubetune.api.validation import ResourceInvalid, parse_resource, validate_documents

_ENV = celpy.Environment()


def quickstart() -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "tiny-sql", "namespace": "kubetune-demo"},
        "spec": {
            "baseModel": {"uri": "hf://sshleifer/tiny-gpt2@5f91d94bd9cd7190a9f3216ff93cd1dd95f2c7be"},
            "dataset": {"uri": "file:///data/sql.jsonl", "validationSplit": "0.2"},
            "method": {"type": "lora", "lora": {"r": 8, "alpha": 16}},
            "training": {"epochs": 2, "learningRate": "3e-4"},
            "evaluation": {"gates": [{"metric": "evalLoss", "minImprovement": "0.01"}]},
        },
    }


def schema() -> dict[str, Any]:
    result: dict[str, Any] = build_crd(FINETUNEJOB)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return result


def _list_sum(values: Any) -> Any:
    """Kubernetes' CEL lists library `sum()` (not in cel-python): integers stay integers."""
    items = list(values)
    if all(isinstance(item, celpy.celtypes.IntType) for item in items):
        return celpy.celtypes.IntType(sum(int(item) for item in items))
    return celpy.celtypes.DoubleType(sum(float(item) for item in items))


# The functions of the Kubernetes CEL libraries that kubetune's rules use on top of standard CEL.
KUBERNETES_CEL_FUNCTIONS = {"sum": _list_sum}


@cache
def _program(rule: str) -> Any:
    return _ENV.program(_ENV.compile(rule), functions=KUBERNETES_CEL_FUNCTIONS)


def apply_defaults(node: dict[str, Any], value: Any) -> Any:
    """Structural defaulting: fill missing properties from `default`, then recurse (top-down)."""
    if isinstance(value, dict):
        props = node.get("properties", {})
        for name, prop in props.items():
            if name not in value and "default" in prop:
                value[name] = copy.deepcopy(prop["default"])
        for name, sub in value.items():
            if name in props:
                apply_defaults(props[name], sub)
    elif isinstance(value, list) and "items" in node:
        for item in value:
            apply_defaults(node["items"], item)
    return value


def _field(path: str, field_path: str | None) -> str:
    """The field the API server names: the rule's node, or the field its ``fieldPath`` points at."""
    full = f"{path}{field_path or ''}".lstrip(".")
    return full or "<root>"


def _message(rule: dict[str, Any], activation: dict[str, Any]) -> str:
    """``messageExpression`` evaluated, as the API server does; ``message`` when it cannot be."""
    if "messageExpression" in rule:
        try:
            return str(_program(rule["messageExpression"]).evaluate(activation))
        except CELEvalError:
            pass
    return str(rule["message"])


def rule_failures(node: dict[str, Any], value: Any, old: Any = None, path: str = "") -> list[str]:
    """`path: message` for every rule that evaluates to false (or errors) on `value`."""
    failures = []
    for rule in node.get("x-kubernetes-validations", []):
        if "oldSelf" in rule["rule"] and old is None:
            continue  # transition rules only run on updates
        activation = {"self": json_to_cel(value)}
        if old is not None:
            activation["oldSelf"] = json_to_cel(old)
        try:
            ok = _program(rule["rule"]).evaluate(activation)
        except CELEvalError as exc:  # the API server reports evaluation errors as invalid too
            failures.append(f"{path or '<root>'}: error evaluating {rule['rule']!r}: {exc}")
            continue
        if not ok:
            failures.append(f"{_field(path, rule.get('fieldPath'))}: {_message(rule, activation)}")
    if isinstance(value, dict):
        for name, sub in node.get("properties", {}).items():
            if name in value:
                old_sub = old.get(name) if isinstance(old, dict) else None
                failures += rule_failures(sub, value[name], old_sub, f"{path}.{name}".lstrip("."))
    elif isinstance(value, list) and "items" in node:
        for i, item in enumerate(value):
            failures += rule_failures(node["items"], item, None, f"{path}[{i}]")
    return failures


def admit(doc: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    """What the API server would say to a FineTuneJob (empty list: admitted)."""
    return admit_to(schema(), doc, old)


def admit_to(s: dict[str, Any], doc: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    """What the API server would say: defaulting, then the schema ``s``, then CEL (empty list: admitted)."""
    doc = apply_defaults(s, copy.deepcopy(doc))
    old = apply_defaults(s, copy.deepcopy(old)) if old is not None else None
    plain = _strip_extensions(s)
    errors = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in jsonschema.Draft4Validator(plain).iter_errors(doc)
    ]
    return errors or rule_failures(s, doc, old)


def finetune_job(spec: dict[str, Any]) -> dict[str, Any]:
    """A FineTuneJob ``demo`` in namespace default with ``spec``."""
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "demo", "namespace": "default"},
        "spec": spec,
    }


def tiny_job(**spec: Any) -> dict[str, Any]:
    """A 20-step FineTuneJob of tiny-base; each keyword is merged into the spec's block of that name."""
    base: dict[str, Any] = {
        "baseModel": {"uri": "./models/tiny-base"},
        "dataset": {"uri": "data/tickets.jsonl", "validationSplit": "0.2"},
        "training": {"maxSteps": 20},
    }
    for key, value in spec.items():
        base[key] = {**base.get(key, {}), **value}
    return finetune_job(base)


def validate(doc: dict[str, Any]) -> list[str]:
    """What `kubetune validate` says about a document (empty list: valid)."""
    return [str(issue) for issue in validate_documents([copy.deepcopy(doc)])]


def _strip_extensions(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_extensions(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if isinstance(node, list):
        return [_strip_extensions(v) for v in node]
    return node


def edit(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    *parents, leaf = path.split(".")
    node: Any = doc
    for part in parents:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    if value is None:
        node.pop(leaf, None)
    else:
        node[leaf] = value
    return doc


# -- the rules -----------------------------------------------------------------------------------------


def all_rules(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [r["rule"] for r in node.get("x-kubernetes-validations", [])]
        return found + [r for v in node.values() for r in all_rules(v)]
    if isinstance(node, list):
        return [r for v in node for r in all_rules(v)]
    return []


def all_message_expressions(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [
            r["messageExpression"]
            for r in node.get("x-kubernetes-validations", [])
            if "messageExpression" in r
        ]
        return found + [r for v in node.values() for r in all_message_expressions(v)]
    if isinstance(node, list):
        return [r for v in node for r in all_message_expressions(v)]
    return []


def test_every_rule_compiles() -> None:
    rules = all_rules(schema())
    # distillation: its block, its teacher, the temperature range; dpo and kto: their blocks, the
    # method/format pairing both ways, packing, replay, preferenceAccuracy, the lora options, 4 ranges (15)
    assert len(rules) == 46
    for rule in rules:
        _program(rule)
    for crd in all_crds():
        for message_expression in all_message_expressions(crd):
            _program(message_expression)


@pytest.mark.parametrize("definition", all_definitions(), ids=lambda d: d.kind)
def test_every_default_passes_the_rules_of_its_node(definition: ResourceDefinition) -> None:
    """The API server checks each `default` against the CEL rules of its node, without filling in the
    nested defaults first: `default: {}` on a node whose rule reads `self.minTokens` is refused."""

    def failures(node: dict[str, Any], path: str) -> list[str]:
        found = rule_failures(node, node["default"], path=path) if "default" in node else []
        for name, sub in node.get("properties", {}).items():
            found += failures(sub, f"{path}.{name}".lstrip("."))
        if "items" in node:
            found += failures(node["items"], f"{path}[*]")
        return found

    root = build_crd(definition)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert failures(root, "") == []


def test_an_empty_default_would_be_refused() -> None:
    """The check above is not vacuous: a rule reading a field the default lacks fails, as on the server."""
    curation = copy.deepcopy(
        schema()["properties"]["spec"]["properties"]["dataset"]["properties"]["curation"]
    )
    assert rule_failures(curation, {}, path="spec.dataset.curation")[0].startswith(
        "spec.dataset.curation: error evaluating 'self.minTokens <= self.maxTokens'"
    )


def test_quickstart_is_admitted() -> None:
    assert admit(quickstart()) == []


def test_spec_is_immutable() -> None:
    old = quickstart()
    assert admit(old, old=old) == []  # no-op update
    relabelled = edit(old, "metadata.labels", {"team": "nlp"})
    assert admit(relabelled, old=old) == []
    with_status = edit(old, "status", {"phase": "Running", "progress": {"percent": 40}})
    assert admit(with_status, old=old) == []
    changed = edit(old, "spec.training.epochs", 3)
    assert admit(changed, old=old) == ["spec: spec is immutable; create a new FineTuneJob"]


def test_defaults_do_not_count_as_a_change() -> None:
    """The stored object carries the defaults; re-applying the same manifest without them is no change."""
    stored = apply_defaults(schema(), quickstart())
    assert stored["spec"]["training"]["batchSize"] == 8
    assert admit(quickstart(), old=stored) == []


def test_only_the_block_named_by_type() -> None:
    doc = quickstart()
    wrong = edit(doc, "spec.method", {"type": "lora", "prefixTuning": {"numVirtualTokens": 8}})
    assert admit(wrong) == ["spec.method: prefixTuning is set but type is 'lora'; only lora may be set"]
    both = edit(doc, "spec.method", {"type": "ia3", "ia3": {}, "lora": {}})
    assert admit(both) == ["spec.method: lora is set but type is 'ia3'; only ia3 may be set"]
    assert admit(edit(doc, "spec.method", {"type": "ia3", "ia3": {"targetModules": ["q"]}})) == []
    assert admit(edit(doc, "spec.method", {"type": "prefix-tuning"})) == []  # own block is optional
    # type defaults to lora, so a bare lora block is fine and a bare ia3 block is not
    assert admit(edit(doc, "spec.method", {"lora": {"r": 4}})) == []
    assert admit(edit(doc, "spec.method", {"ia3": {}})) == [
        "spec.method: ia3 is set but type is 'lora'; only lora may be set"
    ]


def test_curation_bounds() -> None:
    doc = quickstart()
    assert admit(edit(doc, "spec.dataset.curation", {"minTokens": 10, "maxTokens": 5})) == [
        "spec.dataset.curation: minTokens must not exceed maxTokens"
    ]
    # maxTokens defaults to 2048: the rule sees it
    assert admit(edit(doc, "spec.dataset.curation", {"minTokens": 4096})) == [
        "spec.dataset.curation: minTokens must not exceed maxTokens"
    ]
    assert admit(edit(doc, "spec.dataset.curation", {"minTokens": 5, "maxTokens": 5})) == []


def test_gate_needs_a_bound() -> None:
    gates = [{"metric": "evalLoss", "max": "2.5"}, {"metric": "exactMatch"}]
    assert admit(edit(quickstart(), "spec.evaluation.gates", gates)) == [
        "spec.evaluation.gates[1]: a gate needs min, max or minImprovement"
    ]


def test_a_split_holds_something_out_unless_a_validation_file_is_given() -> None:
    """Evaluation needs held-out examples: a split of 0 (or 1) used to train fully and fail at evaluation."""
    assert admit(edit(quickstart(), "spec.dataset.validationSplit", "0")) == [
        'spec.dataset.validationSplit: must be above 0 when validationUri is not set (got "0")'
    ]
    assert admit(edit(quickstart(), "spec.dataset.validationSplit", "1.0")) == [
        "spec.dataset.validationSplit: must be below 1 when validationUri is not set, to leave examples to "
        'train on (got "1.0")'
    ]
    with_file = edit(quickstart(), "spec.dataset.validationUri", "file:///data/held-out.jsonl")
    assert admit(edit(with_file, "spec.dataset.validationSplit", "0")) == []


def test_name_length() -> None:
    assert admit(edit(quickstart(), "metadata.name", "x" * 64)) == [
        "metadata.name: must be at most 63 characters long"
    ]


def test_packing_refuses_the_virtual_tokens_of_prefix_and_prompt_tuning() -> None:
    packing = edit(quickstart(), "spec.training.packing", True)
    assert admit(packing) == []
    for method in ("prefix-tuning", "prompt-tuning"):
        doc = edit(packing, "spec.method", {"type": method})
        says = (
            "packing keeps examples apart by their position ids, which the virtual tokens of "
            f"{method} do not follow; use lora, ia3 or full"
        )
        assert admit(doc) == [f"spec.training.packing: {says}"]
        with pytest.raises(ResourceInvalid, match=r"spec\.training\.packing"):
            parse_resource(doc)


# -- schema + CEL agree with pydantic ------------------------------------------------------------------

CASES: dict[str, tuple[str, Any]] = {
    "quickstart": ("spec.executor", "kfp"),
    "wrong block": ("spec.method", {"type": "full", "lora": {}}),
    "own block": ("spec.method", {"type": "full", "full": {"freezeEmbeddings": True}}),
    "no method": ("spec.method", None),
    "min > max tokens": ("spec.dataset.curation", {"minTokens": 3000}),
    "gate without bound": ("spec.evaluation.gates", [{"metric": "perplexity"}]),
    "gate with min": ("spec.evaluation.gates", [{"metric": "exactMatch", "min": "0.5"}]),
    "no epochs nor maxSteps": ("spec.training", {"learningRate": "1e-4"}),
    "long name": ("metadata.name", "n" * 64),
    "ratio 1.5": ("spec.dataset.validationSplit", "1.5"),
    "nothing held out": ("spec.dataset.validationSplit", "0"),
    "nothing left to train on": ("spec.dataset.validationSplit", "1"),
    "tiny split": ("spec.dataset.validationSplit", "1e-3"),
    "no split with a validation file": (
        "spec.dataset",
        {"uri": "file:///d.jsonl", "validationUri": "file:///v.jsonl", "validationSplit": "0"},
    ),
    "warmup ratio": ("spec.training.scheduler", {"warmupRatio": "0.03"}),
    "bad learning rate": ("spec.training.learningRate", "fast"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_api_server_and_pydantic_agree(case: str) -> None:
    doc = edit(quickstart(), *CASES[case])
    try:
        parse_resource(doc)
        pydantic_ok = True
    except ResourceInvalid:
        pydantic_ok = False
    verdict = admit(doc)
    assert (verdict == []) == pydantic_ok, (
        f"{case}: API server says {verdict or 'ok'}, pydantic {pydantic_ok}"
    )
