"""What validation accepts runs; what it refuses, it refuses naming the field (property-based).

Resources are generated from the API models: the README's examples with fields set to values drawn
from each field's own schema (its type, enum, pattern, bounds and lengths: valid one by one, but not
always together) or to hostile values (wrong signs, types, sizes). For every one:

- accepted by ``kubetune.api.validation`` -> the planning code builds its run (``plan.finetune`` /
  ``plan.quantize`` with an OperatorConfig) and the step's config loading parses that run's config
  (``parse_finetune_job`` / ``parse_quantize_job``); a ModelDeployment gets a gateway config
  (``plan.gateway``) and its generation defaults make sampling parameters the model server takes;
  nothing refuses later, for a reason known at admission;
- refused -> every issue names a field path.
"""

from __future__ import annotations

import copy
import itertools
import re
import string
from collections.abc import Callable, Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from kubetune.api.validation import parse_resource, validate_documents
from kubetune.config import OperatorConfig
from kubetune.plan import finetune as plan_finetune
from kubetune.plan import quantize as plan_quantize
from kubetune.plan.gateway import gateway_config
from kubetune_components.common.jobs import parse_finetune_job, parse_quantize_job
from kubetune_components.serving.requests import SamplingParams
from kubetune_contract.common import DECIMAL_PATTERN, RATIO_PATTERN, as_float
from kubetune_contract.deployment import ModelDeployment
from kubetune_contract.finetune import FineTuneJob
from kubetune_contract.quantize import QuantizeJob

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
PROPERTY_SETTINGS = settings(
    max_examples=500,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SETTINGS = OperatorConfig(home=Path("/srv/kubetune"))
NUMBER_PATTERNS = (DECIMAL_PATTERN, RATIO_PATTERN)
EDGE_STRINGS = ("0", "1", "2", "7", "0.5", "1e-3", "0s", "0ms", "1m")
REMOVE = object()
"""A mutation that deletes the field."""

JsonPath = tuple[str | int, ...]


@cache
def _examples() -> dict[str, tuple[dict[str, Any], ...]]:
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(EXAMPLES.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if isinstance(doc, dict) and str(doc.get("apiVersion", "")).startswith("kubetune.dev/"):
                by_kind.setdefault(doc["kind"], []).append(doc)
    return {kind: tuple(docs) for kind, docs in by_kind.items()}


# -- values drawn from the models' own schemas -----------------------------------------------------------


def _resolved(node: Mapping[str, Any], defs: Mapping[str, Any]) -> Mapping[str, Any]:
    while True:
        if "$ref" in node:
            node = {
                **defs[str(node["$ref"]).rsplit("/", 1)[-1]],
                **{k: v for k, v in node.items() if k != "$ref"},
            }
        elif "anyOf" in node:
            members = [m for m in node["anyOf"] if m != {"type": "null"}]
            node = {**members[0], **{k: v for k, v in node.items() if k != "anyOf"}}
        else:
            return node


def conforming(node: Mapping[str, Any], defs: Mapping[str, Any], depth: int = 0) -> st.SearchStrategy[Any]:
    """Values that satisfy one schema node on its own (the model's rules between fields may not hold)."""
    node = _resolved(node, defs)
    if "enum" in node:
        return st.sampled_from(node["enum"])
    if "const" in node:
        return st.just(node["const"])
    kind = node.get("type")
    if kind == "string":
        min_size, max_size = node.get("minLength", 0), min(node.get("maxLength", 40), 40)
        if "pattern" in node:
            # Values at the edges (zero, one, a zero duration) first: that is where ranges are wrong.
            edges = [edge for edge in EDGE_STRINGS if re.fullmatch(node["pattern"], edge)]
            drawn = st.from_regex(node["pattern"], fullmatch=True)
            if node["pattern"] in NUMBER_PATTERNS:
                drawn = st.one_of(st.decimals(min_value=0, max_value=3, places=2).map(str), drawn)
            return st.one_of(*([st.sampled_from(edges)] if edges else []), drawn).filter(
                lambda s: min_size <= len(s) <= max_size
            )
        return st.text(string.printable, min_size=min_size, max_size=max_size)
    if kind == "integer":
        low = node.get(
            "minimum", node.get("exclusiveMinimum", -10) + 1 if "exclusiveMinimum" in node else -10
        )
        return st.integers(min_value=low, max_value=node.get("maximum", low + 5000))
    if kind == "number":
        return st.floats(allow_nan=False, allow_infinity=False, width=32)
    if kind == "boolean":
        return st.booleans()
    if kind == "array":
        return st.lists(
            conforming(node.get("items", {}), defs, depth + 1),
            min_size=node.get("minItems", 0),
            max_size=min(node.get("maxItems", 3), 3),
        )
    if kind == "object" and "properties" in node and depth < 4:
        properties = node["properties"]
        required = set(node.get("required", []))
        return st.fixed_dictionaries(
            {name: conforming(sub, defs, depth + 1) for name, sub in properties.items() if name in required},
            optional={
                name: conforming(sub, defs, depth + 1)
                for name, sub in properties.items()
                if name not in required
            },
        )
    if kind == "object" and isinstance(node.get("additionalProperties"), Mapping):
        return st.dictionaries(
            st.sampled_from(["cpu", "memory", "nvidia.com/gpu"]),
            conforming(node["additionalProperties"], defs, depth + 1),
            max_size=2,
        )
    return st.none()


HOSTILE_VALUES: tuple[Any, ...] = (
    "7", "0", -1, 0, 1, -0.5, 1.5, 2**70, True, "", "-1", "1", "-0.1", "1e999", "1e-999", "abc",
    "Bad_Name", "0s", REMOVE, [], {}, {"unknownField": 1},
)  # fmt: skip
HOSTILE = st.sampled_from(HOSTILE_VALUES)


def _field_paths(
    node: Mapping[str, Any], defs: Mapping[str, Any], doc: Any, path: JsonPath
) -> Iterator[tuple[JsonPath, Mapping[str, Any]]]:
    """Every field of the schema, reached through `doc` where it has a list (its first item)."""
    node = _resolved(node, defs)
    yield path, node
    if node.get("type") == "object":
        for name, sub in node.get("properties", {}).items():
            yield from _field_paths(
                sub, defs, doc.get(name) if isinstance(doc, dict) else None, (*path, name)
            )
    elif node.get("type") == "array" and isinstance(doc, list) and doc:
        yield from _field_paths(node.get("items", {}), defs, doc[0], (*path, 0))


@cache
def _spec_fields(model: type[BaseModel], kind: str) -> tuple[tuple[JsonPath, Mapping[str, Any]], ...]:
    """The spec's fields that hold values (objects are reached through theirs), with their schema."""
    schema = model.model_json_schema(by_alias=True, mode="validation")
    defs = schema.get("$defs", {})
    spec = schema["properties"]["spec"]
    found: dict[JsonPath, Mapping[str, Any]] = {}
    for example in _examples()[kind]:
        for path, node in _field_paths(spec, defs, example["spec"], ("spec",)):
            if len(path) > 1 and node.get("type") != "object":
                found.setdefault(path, node)
    return tuple(found.items())


def _set(doc: dict[str, Any], path: JsonPath, value: Any) -> None:
    """Set (or with REMOVE delete) the field at `path`, creating objects on the way; a list item that an
    earlier mutation removed is left alone."""
    node: Any = doc
    for part, following in itertools.pairwise(path):
        if isinstance(part, int):
            if not (isinstance(node, list) and part < len(node)):
                return
            node = node[part]
            continue
        if not isinstance(node, dict):
            return
        if isinstance(following, str) and not isinstance(node.get(part), dict):
            node[part] = {}
        node = node.get(part)
    leaf = path[-1]
    if isinstance(node, dict) and isinstance(leaf, str):
        if value is REMOVE:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    elif isinstance(node, list) and isinstance(leaf, int) and leaf < len(node) and value is not REMOVE:
        node[leaf] = value


@st.composite
def resources(draw: st.DrawFn, model: type[BaseModel], kind: str) -> dict[str, Any]:
    """An example of `kind` with a few fields redrawn from their schema, and sometimes one hostile value."""
    doc: dict[str, Any] = copy.deepcopy(draw(st.sampled_from(_examples()[kind])))
    fields = _spec_fields(model, kind)
    defs = model.model_json_schema(by_alias=True, mode="validation").get("$defs", {})
    for path, node in draw(st.lists(st.sampled_from(fields), min_size=1, max_size=2)):
        _set(doc, path, draw(conforming(node, defs)))
    if draw(st.integers(0, 3)) == 0:
        path, _ = draw(st.sampled_from(fields))
        _set(doc, path, draw(HOSTILE))
    return doc


# -- the property ----------------------------------------------------------------------------------------


def accepted(doc: dict[str, Any]) -> bool:
    """Whether validation accepts `doc`; when it refuses, every issue names its field."""
    result = validate_documents([doc])
    for issue in result:
        assert issue.path, f"an issue without a field path: {issue}"
        assert issue.path.split(".")[0].split("[")[0] in {"spec", "metadata", "apiVersion", "kind"}, str(
            issue
        )
        assert issue.message, str(issue)
    return result.ok


def source_of(job: QuantizeJob) -> dict[str, Any] | None:
    """The succeeded FineTuneJob a QuantizeJob's reference resolves to (None for a model URI)."""
    ref = job.spec.model.fine_tune_job_ref
    if ref is None:
        return None
    finetune = copy.deepcopy(_examples()["FineTuneJob"][0])
    finetune["metadata"]["name"] = ref.name
    finetune["status"] = {
        "phase": "Succeeded",
        "conditions": [{"type": "Succeeded", "status": "True", "reason": "Published"}],
        "output": {"uri": f"/srv/kubetune/artifacts/{ref.name}/v1", "version": "v1"},
    }
    return finetune


def fine_tune_job_runs(doc: dict[str, Any]) -> None:
    job = parse_resource(doc, FineTuneJob)
    request = plan_finetune.build_request(job, SETTINGS)
    spec = parse_finetune_job(request.config).spec
    if spec.dataset.validation_uri is None:
        # The curation step holds examples out with this share, and evaluation needs at least one.
        assert 0 < as_float(spec.dataset.validation_split) < 1


def quantize_job_runs(doc: dict[str, Any]) -> None:
    job = parse_resource(doc, QuantizeJob)
    request = plan_quantize.build_request(job, source_of(job), SETTINGS)
    parse_quantize_job(request.config)


def deployment_serves(doc: dict[str, Any]) -> None:
    deployment = parse_resource(doc, ModelDeployment)
    versions = deployment.spec.versions
    urls = {version.name: f"http://127.0.0.1:{9000 + index}" for index, version in enumerate(versions)}
    config = gateway_config(deployment, urls, {version.name: version.weight for version in versions})
    assert config is not None
    defaults = deployment.spec.generation.defaults
    # What a version's server makes of a request that leaves the parameters to the defaults.
    SamplingParams(
        max_tokens=defaults.max_tokens,
        temperature=1.0 if defaults.temperature is None else as_float(defaults.temperature),
        top_p=1.0 if defaults.top_p is None else as_float(defaults.top_p),
    )


KINDS = [
    pytest.param(FineTuneJob, fine_tune_job_runs, id="FineTuneJob"),
    pytest.param(QuantizeJob, quantize_job_runs, id="QuantizeJob"),
    pytest.param(ModelDeployment, deployment_serves, id="ModelDeployment"),
]


@PROPERTY_SETTINGS
@given(resources(FineTuneJob, "FineTuneJob"))
def test_an_accepted_fine_tune_job_is_planned_and_its_steps_take_the_config(doc: dict[str, Any]) -> None:
    if accepted(doc):
        fine_tune_job_runs(doc)


@PROPERTY_SETTINGS
@given(resources(QuantizeJob, "QuantizeJob"))
def test_an_accepted_quantize_job_is_planned_and_its_steps_take_the_config(doc: dict[str, Any]) -> None:
    if accepted(doc):
        quantize_job_runs(doc)


@PROPERTY_SETTINGS
@given(resources(ModelDeployment, "ModelDeployment"))
def test_an_accepted_deployment_gets_a_gateway_and_its_defaults_are_servable(doc: dict[str, Any]) -> None:
    if accepted(doc):
        deployment_serves(doc)


def _edges(node: Mapping[str, Any]) -> list[Any]:
    """The values at and just past a field's own bounds."""
    if node.get("type") != "integer":
        return []
    bounds = [node[key] for key in ("minimum", "maximum") if key in node]
    return [value + step for value in bounds for step in (-1, 0, 1)]


@pytest.mark.parametrize(("model", "runs"), KINDS)
def test_each_field_alone_at_its_edges_and_beyond(
    model: type[BaseModel], runs: Callable[[dict[str, Any]], None]
) -> None:
    """Every field of every example, one at a time, set to edge and hostile values: the same property,
    without leaving it to chance which field meets which value."""
    kind = model.__name__
    values = [*EDGE_STRINGS, *HOSTILE_VALUES]
    for example in _examples()[kind]:
        for path, node in _spec_fields(model, kind):
            for value in [*values, *_edges(node)]:
                doc = copy.deepcopy(example)
                _set(doc, path, value)
                if accepted(doc):
                    runs(doc)


@pytest.mark.parametrize(
    ("model", "kind"),
    [(FineTuneJob, "FineTuneJob"), (QuantizeJob, "QuantizeJob"), (ModelDeployment, "ModelDeployment")],
)
def test_the_generated_resources_are_both_accepted_and_refused(model: type[BaseModel], kind: str) -> None:
    """The properties above are not vacuous: the generator makes resources of both kinds."""
    verdicts: set[bool] = set()

    @settings(max_examples=60, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
    @given(resources(model, kind))
    def collect(doc: dict[str, Any]) -> None:
        verdicts.add(validate_documents([doc]).ok)

    collect()
    assert verdicts == {True, False}
