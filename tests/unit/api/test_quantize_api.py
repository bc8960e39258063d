"""QuantizeJob's API: the generated CRD, its CEL rules, offline validation messages, schema vs pydantic.

CEL rules run in cel-python the way the API server runs them (defaults first, then the schema, then the
rules); the helpers come from ``test_cel`` and ``test_crd`` next to this file.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import pytest
import yaml
from celpy.adapter import json_to_cel
from test_cel import _program, admit_to, all_rules, apply_defaults
from test_crd import for_jsonschema, structural_problems

from kubetune.api.crd import _node_at, build_crd, check_crds, render_crd_yaml
from kubetune.api.kinds import FINETUNEJOB, QUANTIZEJOB, _quantize_target_rules
from kubetune.api.registry import all_definitions, find_definition, get_definition
from kubetune.api.validation import ResourceInvalid, load_documents, parse_resource, validate_documents
from kubetune_contract import quantize as q
from kubetune_contract.quantize import QuantizeJob

REPO = Path(__file__).resolve().parents[3]
CRD_FILE = REPO / "manifests" / "crds" / "quantizejobs.kubetune.dev.yaml"
MODEL = "hf://sshleifer/tiny-gpt2@5f91d94bd9cd7190a9f3216ff93cd1dd95f2c7be"


def sample() -> dict[str, Any]:
    """A valid QuantizeJob: int8 dynamic quantization of a model URI for a CPU."""
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "QuantizeJob",
        "metadata": {"name": "tiny-int8", "namespace": "kubetune-demo"},
        "spec": {
            "model": {"uri": MODEL},
            "method": {"type": "int8-dynamic"},
            "target": "cpu",
            "dataset": {"uri": "file:///data/sql.jsonl", "validationSplit": "0.2"},
            "evaluation": {
                "maxSamples": 20,
                "gates": [
                    {"metric": "sizeRatio", "max": "0.5"},
                    {"metric": "perplexityIncrease", "max": "0.1"},
                ],
            },
        },
    }


def edit(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of ``doc`` with ``path`` (dotted, list indexes as numbers) set; ``None`` removes it."""
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


def crd() -> dict[str, Any]:
    return build_crd(QUANTIZEJOB)


def schema() -> dict[str, Any]:
    result: dict[str, Any] = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return result


def schema_errors(doc: dict[str, Any]) -> list[str]:
    """The schema alone (no defaults, no CEL), as JSON Schema draft 4."""
    validator = jsonschema.Draft4Validator(for_jsonschema(schema()))
    return sorted(
        ".".join(str(p) for p in e.absolute_path) + ": " + e.message for e in validator.iter_errors(doc)
    )


def admit(doc: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    """What the API server would say: defaulting, then the schema, then CEL (empty list: admitted)."""
    return admit_to(schema(), doc, old)


def messages(doc: dict[str, Any]) -> list[str]:
    return [str(issue) for issue in validate_documents([doc])]


def pydantic_ok(doc: dict[str, Any]) -> bool:
    try:
        parse_resource(doc, QuantizeJob)
    except ResourceInvalid:
        return False
    return True


# -- registry, names, golden file ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["qj", "QJ", "QuantizeJob", "quantizejob", "quantizejobs", "quantizejobs.kubetune.dev"]
)
def test_registry_lookup(name: str) -> None:
    assert get_definition(name) is QUANTIZEJOB
    assert find_definition(name) is QUANTIZEJOB


def test_registered_next_to_finetunejob() -> None:
    assert [d.kind for d in all_definitions()] == ["FineTuneJob", "ModelDeployment", "QuantizeJob"]
    assert get_definition("ftj") is FINETUNEJOB
    assert QUANTIZEJOB.model is QuantizeJob
    assert (QUANTIZEJOB.spec_model, QUANTIZEJOB.status_model) == (q.QuantizeJobSpec, q.QuantizeJobStatus)


def test_crd_names_and_version() -> None:
    c = crd()
    assert c["metadata"]["name"] == "quantizejobs.kubetune.dev"
    assert c["metadata"]["labels"] == {"app.kubernetes.io/part-of": "kubetune"}
    spec = c["spec"]
    assert spec["group"] == "kubetune.dev" and spec["scope"] == "Namespaced"
    assert spec["names"] == {
        "kind": "QuantizeJob",
        "listKind": "QuantizeJobList",
        "plural": "quantizejobs",
        "singular": "quantizejob",
        "shortNames": ["qj"],
        "categories": ["kubetune"],
    }
    [version] = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}


def test_committed_file_is_current() -> None:
    """The golden check (test_crd) covers every kind; this one names the QuantizeJob file."""
    assert CRD_FILE.read_text(encoding="utf-8") == render_crd_yaml(crd())
    [(doc, _)] = load_documents(CRD_FILE)  # read as kubectl reads it
    assert doc == crd()
    assert check_crds(CRD_FILE.parent) == []


# -- printer columns -----------------------------------------------------------------------------------


def test_printer_columns() -> None:
    columns = crd()["spec"]["versions"][0]["additionalPrinterColumns"]
    default = [(c["name"], c["type"], c["jsonPath"]) for c in columns if not c.get("priority")]
    assert default == [
        ("Status", "string", ".status.phase"),
        ("Method", "string", ".spec.method.type"),
        ("Target", "string", ".spec.target"),
        ("Size Ratio", "number", ".status.report.sizeRatio"),
        ("Age", "date", ".metadata.creationTimestamp"),
    ]
    wide = [(c["name"], c["type"], c["jsonPath"]) for c in columns if c.get("priority") == 1]
    assert wide == [
        ("Source", "string", ".status.source.uri"),
        ("Output", "string", ".status.output.uri"),
        ("Reason", "string", '.status.conditions[?(@.type=="Succeeded")].reason'),
    ]
    reason = next(c for c in FINETUNEJOB.printer_columns if c.name == "Reason")
    assert columns[-1] == reason.to_crd()  # the same Reason column as FineTuneJob's


def test_source_column_points_at_both_source_fields() -> None:
    """The generator checks simple column paths; the JSONPath union is checked here, member by member."""
    s = schema()
    assert _node_at(s, "spec.model.fineTuneJobRef.name")["type"] == "string"
    assert _node_at(s, "spec.model.uri")["type"] == "string"
    assert _node_at(s, "status.report.sizeRatio")["type"] == "number"


# -- the schema ----------------------------------------------------------------------------------------


def test_schema_is_structural() -> None:
    s = schema()
    assert structural_problems(s) == []
    text = yaml.safe_dump(s)
    for forbidden in ("$ref", "$defs", "anyOf", "oneOf", "allOf", "title:", "additionalProperties: false"):
        assert forbidden not in text, forbidden
    assert "x-kubetune" not in text


def test_defaults_validate_against_their_schema() -> None:
    def walk(node: dict[str, Any]) -> None:
        if "default" in node:
            jsonschema.Draft4Validator(for_jsonschema(node)).validate(node["default"])
        for sub in node.get("properties", {}).values():
            walk(sub)
        if "items" in node:
            walk(node["items"])

    walk(schema())


def test_schema_shape() -> None:
    props = schema()["properties"]
    spec = props["spec"]
    assert spec["required"] == ["model", "method"]
    fields = spec["properties"]
    assert fields["target"]["enum"] == ["cpu", "gpu"] and fields["target"]["default"] == "cpu"
    assert fields["method"]["required"] == ["type"]
    method = fields["method"]["properties"]
    assert set(method) == {"type", "int4WeightOnly", "qat", "pruning", "mixedPrecision"}
    assert method["pruning"]["properties"]["pattern"]["enum"] == ["unstructured", "2:4"]
    assert method["int4WeightOnly"]["properties"]["groupSize"] == {
        "description": "Weights sharing one scale.",
        "type": "integer",
        "enum": [32, 64, 128, 256],
        "default": 128,
    }
    assert method["qat"]["properties"]["learningRate"]["default"] == "1e-5"
    # the evaluation's defaults, written out whole: the stored object shows what the job measures
    assert fields["evaluation"]["default"] == q.QuantizeEvaluation().model_dump(
        mode="json", by_alias=True, exclude_none=True
    )
    assert fields["dataset"]["required"] == ["uri"]
    gates = fields["evaluation"]["properties"]["gates"]
    assert gates["items"]["required"] == ["metric"]
    assert gates["items"]["x-kubernetes-validations"] == [
        {"rule": "has(self.min) || has(self.max)", "message": "a gate needs min or max"}
    ]
    assert fields["model"]["x-kubernetes-validations"] == [
        {
            "rule": "has(self.fineTuneJobRef) != has(self.uri)",
            "message": "set exactly one of fineTuneJobRef and uri",
        }
    ]
    assert spec["x-kubernetes-validations"][0] == {
        "rule": "self == oldSelf",
        "message": "spec is immutable; create a new QuantizeJob",
    }
    conditions = props["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert props["status"]["properties"]["report"]["properties"]["sizeRatio"]["type"] == "number"


def test_every_field_in_the_spec_is_described() -> None:
    """kubectl explain shows these; a field without one is a gap in the model."""
    missing: list[str] = []

    def walk(node: dict[str, Any], path: str) -> None:
        for name, sub in node.get("properties", {}).items():
            if "description" not in sub:
                missing.append(f"{path}.{name}")
            walk(sub, f"{path}.{name}")
        if "items" in node:
            walk(node["items"], f"{path}[*]")

    walk(schema()["properties"]["spec"], "spec")
    assert missing == []


# -- CEL rules -----------------------------------------------------------------------------------------


def test_every_rule_compiles() -> None:
    rules = all_rules(schema())
    assert len(rules) == len(QUANTIZEJOB.all_rules) == 14
    for rule in rules:
        _program(rule)


def test_sample_is_admitted() -> None:
    assert admit(sample()) == []
    assert admit(edit(sample(), "spec.target", None)) == []  # target defaults to cpu


def test_exactly_one_source() -> None:
    both = edit(sample(), "spec.model.fineTuneJobRef", {"name": "tiny-sql"})
    assert admit(both) == ["spec.model: set exactly one of fineTuneJobRef and uri"]
    neither = edit(sample(), "spec.model", {})
    assert admit(neither) == ["spec.model: set exactly one of fineTuneJobRef and uri"]
    assert admit(edit(sample(), "spec.model", {"fineTuneJobRef": {"name": "tiny-sql"}})) == []


def test_gpu_only_pairs() -> None:
    pruning_24 = edit(sample(), "spec.method", {"type": "pruning", "pruning": {"pattern": "2:4"}})
    assert admit(pruning_24) == ["spec: pruning pattern 2:4 does not support target cpu (GPU only)"]
    assert admit(edit(pruning_24, "spec.target", None)) == [  # the default target is cpu
        "spec: pruning pattern 2:4 does not support target cpu (GPU only)"
    ]
    assert admit(edit(pruning_24, "spec.target", "gpu")) == []
    assert admit(edit(sample(), "spec.method", {"type": "pruning", "pruning": {"sparsity": "0.3"}})) == []
    assert admit(edit(sample(), "spec.method", {"type": "pruning"})) == []

    fp16 = edit(sample(), "spec.method", {"type": "mixed-precision", "mixedPrecision": {"dtype": "fp16"}})
    assert admit(fp16) == ["spec: mixed-precision fp16 does not support target cpu; use bf16"]
    assert admit(edit(fp16, "spec.target", "gpu")) == []
    assert admit(edit(sample(), "spec.method", {"type": "mixed-precision"})) == []  # bf16 runs on cpu


def test_only_the_method_s_own_block() -> None:
    doc = sample()
    assert admit(edit(doc, "spec.method", {"type": "int8-dynamic", "pruning": {}})) == [
        "spec.method: pruning is set but type is 'int8-dynamic'; it takes no options block"
    ]
    assert admit(edit(doc, "spec.method", {"type": "qat", "int4WeightOnly": {"groupSize": 64}})) == [
        "spec.method: int4WeightOnly is set but type is 'qat'; only qat may be set"
    ]
    assert admit(edit(doc, "spec.method", {"type": "int8-weight-only", "mixedPrecision": {}})) == [
        "spec.method: mixedPrecision is set but type is 'int8-weight-only'; it takes no options block"
    ]
    assert (
        admit(edit(doc, "spec.method", {"type": "int4-weight-only", "int4WeightOnly": {"groupSize": 64}}))
        == []
    )
    assert admit(edit(doc, "spec.method", {"type": "qat", "qat": {"steps": 10}})) == []


def test_qat_needs_data_unless_the_source_is_a_finetunejob() -> None:
    qat = edit(edit(sample(), "spec.method", {"type": "qat"}), "spec.dataset", None)
    assert admit(qat) == ["spec: qat trains: set dataset (or take the model from a fineTuneJobRef)"]
    assert admit(edit(qat, "spec.model", {"fineTuneJobRef": {"name": "tiny-sql"}})) == []
    assert admit(edit(sample(), "spec.dataset", None)) == []  # other methods may go without


def test_gate_needs_a_bound() -> None:
    gates = [{"metric": "sizeRatio", "max": "0.5"}, {"metric": "latencyRatio"}]
    assert admit(edit(sample(), "spec.evaluation.gates", gates)) == [
        "spec.evaluation.gates[1]: a gate needs min or max"
    ]


def test_name_length_and_curation() -> None:
    assert admit(edit(sample(), "metadata.name", "q" * 64)) == [
        "metadata.name: must be at most 63 characters long"
    ]
    assert admit(edit(sample(), "spec.dataset.curation", {"minTokens": 4096})) == [
        "spec.dataset.curation: minTokens must not exceed maxTokens"
    ]


def test_spec_is_immutable() -> None:
    old = sample()
    assert admit(old, old=old) == []
    assert admit(edit(old, "status", {"phase": "Running"}), old=old) == []
    assert admit(edit(old, "spec.target", "gpu"), old=old) == [
        "spec: spec is immutable; create a new QuantizeJob"
    ]


def test_target_rules_follow_supported_targets() -> None:
    """Should a method lose a target in SUPPORTED_TARGETS, the CRD refuses the pair too, naming both."""
    assert all(targets == {"cpu", "gpu"} for targets in q.SUPPORTED_TARGETS.values())  # no such rule today
    rules = _quantize_target_rules({**q.SUPPORTED_TARGETS, "qat": frozenset({"gpu"})})
    assert [r.rule for r in rules[1:]] == [r.rule for r in _quantize_target_rules()]  # the GPU-only options
    rule = rules[0]
    assert (rule.path, rule.rule, rule.message) == (
        "spec",
        'self.method.type != "qat" || self.target == "gpu"',
        "method qat does not support target cpu",
    )
    spec = apply_defaults(schema()["properties"]["spec"], {"model": _FTJ_REF, "method": {"type": "qat"}})
    assert _program(rule.rule).evaluate({"self": json_to_cel(spec)}) == celpy.celtypes.BoolType(False)
    on_gpu = {**spec, "target": "gpu"}
    assert _program(rule.rule).evaluate({"self": json_to_cel(on_gpu)}) == celpy.celtypes.BoolType(True)


# -- offline validation messages -----------------------------------------------------------------------

MESSAGES: dict[str, tuple[str, Any, str]] = {
    "both sources": (
        "spec.model.fineTuneJobRef",
        {"name": "tiny-sql"},
        "spec.model: set exactly one of fineTuneJobRef and uri",
    ),
    "neither source": ("spec.model", {}, "spec.model: set exactly one of fineTuneJobRef and uri"),
    "2:4 on cpu": (
        "spec.method",
        {"type": "pruning", "pruning": {"pattern": "2:4"}},
        "spec: pruning pattern 2:4 does not support target cpu (GPU only)",
    ),
    "fp16 on cpu": (
        "spec.method",
        {"type": "mixed-precision", "mixedPrecision": {"dtype": "fp16"}},
        "spec: mixed-precision fp16 does not support target cpu; use bf16",
    ),
    "block for a method without options": (
        "spec.method",
        {"type": "int8-dynamic", "pruning": {}},
        "spec.method: pruning is set but type is 'int8-dynamic'; it takes no options block",
    ),
    "another method's block": (
        "spec.method",
        {"type": "qat", "int4WeightOnly": {}},
        "spec.method: int4WeightOnly is set but type is 'qat'; only qat may be set",
    ),
    "gate without bound": (
        "spec.evaluation.gates",
        [{"metric": "sizeRatio"}],
        "spec.evaluation.gates[0]: a gate needs min or max",
    ),
    "bad target": ("spec.target", "tpu", 'spec.target: must be one of: cpu, gpu (got "tpu")'),
    "bad method": (
        "spec.method.type",
        "int3",
        "spec.method.type: must be one of: int8-weight-only, int8-dynamic, int4-weight-only, qat, pruning, "
        'mixed-precision (got "int3")',
    ),
    "bad group size": (
        "spec.method",
        {"type": "int4-weight-only", "int4WeightOnly": {"groupSize": 100}},
        "spec.method.int4WeightOnly.groupSize: must be one of: 32, 64, 128, 256 (got the number 100)",
    ),
    "sparsity above 1": (
        "spec.method",
        {"type": "pruning", "pruning": {"sparsity": "1.5"}},
        'spec.method.pruning.sparsity: must be a ratio between 0 and 1 as a string, e.g. "0.1" (got "1.5")',
    ),
    "no method type": ("spec.method", {}, "spec.method.type: required field is missing"),
}


@pytest.mark.parametrize("case", sorted(MESSAGES))
def test_messages(case: str) -> None:
    path, value, expected = MESSAGES[case]
    assert messages(edit(sample(), path, value)) == [f"QuantizeJob/tiny-int8: {expected}"]


def test_qat_without_data_message() -> None:
    doc = edit(edit(sample(), "spec.method", {"type": "qat"}), "spec.dataset", None)
    assert messages(doc) == [
        "QuantizeJob/tiny-int8: spec: qat trains: set dataset (or take the model from a fineTuneJobRef)"
    ]


def test_valid_sample_parses() -> None:
    assert validate_documents([sample()]) == []
    job = parse_resource(sample(), QuantizeJob)
    assert job.spec.target == "cpu" and job.spec.model.uri == MODEL
    pruned = parse_resource(edit(sample(), "spec.method", {"type": "pruning"}), QuantizeJob)
    assert pruned.spec.method.pruning == q.PruningOptions()  # the own block is filled with its defaults


# -- the API server (schema + CEL) and pydantic agree --------------------------------------------------

_FTJ_REF = {"fineTuneJobRef": {"name": "tiny-sql"}}

# (path, value) edits of sample(); the verdicts must match, whatever they are.
CASES: dict[str, tuple[str, Any]] = {
    "valid": ("spec.executor", "local"),
    "finetunejob source": ("spec.model", _FTJ_REF),
    "both sources": ("spec.model", {"uri": MODEL, **_FTJ_REF}),
    "neither source": ("spec.model", {}),
    "2:4 on cpu": ("spec.method", {"type": "pruning", "pruning": {"pattern": "2:4"}}),
    "unstructured on cpu": ("spec.method", {"type": "pruning", "pruning": {"pattern": "unstructured"}}),
    "fp16 on cpu": ("spec.method", {"type": "mixed-precision", "mixedPrecision": {"dtype": "fp16"}}),
    "bf16 on cpu": ("spec.method", {"type": "mixed-precision", "mixedPrecision": {"dtype": "bf16"}}),
    "wrong block": ("spec.method", {"type": "int8-weight-only", "qat": {}}),
    "other method's block": ("spec.method", {"type": "pruning", "mixedPrecision": {}}),
    "own block": ("spec.method", {"type": "qat", "qat": {"scheme": "int4-weight-only", "groupSize": 32}}),
    "no block": ("spec.method", {"type": "int4-weight-only"}),
    "qat without data": ("spec.dataset", None),  # applied to a qat sample below
    "gate without bound": ("spec.evaluation.gates", [{"metric": "exactMatchDrop"}]),
    "gate with min": ("spec.evaluation.gates", [{"metric": "exactMatch", "min": "0.5"}]),
    "long name": ("metadata.name", "q" * 64),
    "min > max tokens": ("spec.dataset.curation", {"minTokens": 3000}),
    "bad target": ("spec.target", "tpu"),
    "bad method": ("spec.method.type", "int3"),
    "no method": ("spec.method", None),
    "no model": ("spec.model", None),
    "empty job name": ("spec.model", {"fineTuneJobRef": {"name": ""}}),
    "bad group size": ("spec.method", {"type": "int4-weight-only", "int4WeightOnly": {"groupSize": 100}}),
    "sparsity 1.5": ("spec.method", {"type": "pruning", "pruning": {"sparsity": "1.5"}}),
    "qat steps zero": ("spec.method", {"type": "qat", "qat": {"steps": 0}}),
    "qat learning rate as a number": ("spec.method", {"type": "qat", "qat": {"learningRate": 1e-5}}),
    "bad gate metric": ("spec.evaluation.gates", [{"metric": "bleu", "max": "1"}]),
    "gate max as a number": ("spec.evaluation.gates", [{"metric": "sizeRatio", "max": 0.5}]),
    "latency prompts zero": ("spec.evaluation.latencyPrompts", 0),
    "bad executor": ("spec.executor", "slurm"),
}
EXPECTED_VALID = {
    "valid",
    "finetunejob source",
    "unstructured on cpu",
    "bf16 on cpu",
    "own block",
    "no block",
    "gate with min",
}


def case_doc(case: str) -> dict[str, Any]:
    doc = sample()
    if case == "qat without data":
        doc = edit(doc, "spec.method", {"type": "qat"})
    return edit(doc, *CASES[case])


@pytest.mark.parametrize("case", sorted(CASES))
def test_api_server_and_pydantic_agree(case: str) -> None:
    doc = case_doc(case)
    verdict = admit(doc)
    ok = pydantic_ok(doc)
    assert (verdict == []) == ok, f"{case}: API server says {verdict or 'ok'}, pydantic {ok}"
    assert ok == (case in EXPECTED_VALID), case


@pytest.mark.parametrize("case", sorted(CASES))
def test_schema_alone_never_rejects_what_pydantic_accepts(case: str) -> None:
    """jsonschema (no CEL) is looser than pydantic, never stricter; invalid types are caught by both."""
    doc = case_doc(case)
    if pydantic_ok(doc):
        assert schema_errors(doc) == []


SCHEMA_INVALID = [
    "bad target",
    "bad method",
    "no method",
    "no model",
    "empty job name",
    "bad group size",
    "sparsity 1.5",
    "qat steps zero",
    "qat learning rate as a number",
    "bad gate metric",
    "gate max as a number",
    "latency prompts zero",
    "bad executor",
]


@pytest.mark.parametrize("case", SCHEMA_INVALID)
def test_schema_and_pydantic_reject(case: str) -> None:
    doc = case_doc(case)
    assert schema_errors(doc), f"{case}: the CRD schema accepts it"
    assert not pydantic_ok(doc), f"{case}: pydantic accepts it"


def test_unknown_fields_are_pruned_not_rejected_by_the_schema() -> None:
    doc = edit(sample(), "spec.method.groupsize", 64)
    assert schema_errors(doc) == []
    assert messages(doc) == ["QuantizeJob/tiny-int8: spec.method.groupsize: unknown field"]
