"""What is wrong with a resource, in words: pydantic's errors as ``field.path: what is wrong``.

The operator (``kubetune validate``, admission of a resource, its conditions) and the pipeline steps
(which parse their config with the same models) both describe a rejected resource with this module,
so a config refused anywhere reads the same::

    FineTuneJob/demo: spec.training.weightDecay: must be a decimal number as a string, e.g. "3e-4" (got "x")

Paths use wire (camelCase) names. Where pydantic's error lacks what a good message needs (the allowed
values of an integer ``Literal``, the pattern of a field given a number, the fields a typo was close
to), the model's own JSON schema supplies it.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from functools import cache
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from kubetune_contract.common import (
    DECIMAL_PATTERN,
    DNS_SUBDOMAIN_PATTERN,
    MODEL_URI_PATTERN,
    RATIO_PATTERN,
    DecimalRange,
)

UNNAMED = "<unnamed>"
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")

_PATTERN_MESSAGES = {
    DECIMAL_PATTERN: 'must be a decimal number as a string, e.g. "3e-4"',
    RATIO_PATTERN: 'must be a ratio between 0 and 1 as a string, e.g. "0.1"',
    MODEL_URI_PATTERN: (
        "must be a model URI: hf://org/name@revision, file:///path, pvc://claim/path or a plain path"
    ),
    DNS_SUBDOMAIN_PATTERN: (
        "must be a Kubernetes object name: lower case letters, digits, '-' or '.', starting and ending "
        "with a letter or digit"
    ),
}
_NUMBER_PATTERNS = {DECIMAL_PATTERN: DecimalRange(), RATIO_PATTERN: DecimalRange(0, 1)}
_BOUNDS = {
    "greater_than_equal": ("at least", "ge"),
    "greater_than": ("greater than", "gt"),
    "less_than_equal": ("at most", "le"),
    "less_than": ("less than", "lt"),
}
_EXPECTED_TYPES = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "list_type": "a list",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
}

SchemaNode = Mapping[str, Any]


@dataclass(frozen=True)
class ValidationIssue:
    """One problem with one resource. ``str()`` is ``Kind/name: field.path: what is wrong``."""

    kind: str
    name: str
    path: str
    message: str
    source: str | None = None  # "file.yaml:12" (where the document starts), when read from a file

    @property
    def subject(self) -> str:
        return f"{self.kind}/{self.name}" if self.kind else self.name

    @property
    def detail(self) -> str:
        """``field.path: what is wrong``: the issue without the resource it is about."""
        return f"{self.path}: {self.message}" if self.path else self.message

    def __str__(self) -> str:
        return f"{self.subject}: {self.detail}"


def field_problems(error: ValidationError, model: type[BaseModel]) -> list[tuple[str, str]]:
    """(field path, what is wrong) for every problem pydantic found validating `model`, in its order."""
    schema = _json_schema(model)
    return [_describe(detail, schema) for detail in error.errors()]


def validation_issues(
    error: ValidationError,
    model: type[BaseModel],
    *,
    kind: str,
    name: str,
    source: str | None = None,
) -> list[ValidationIssue]:
    """The problems of resource `kind`/`name` that failed to validate as `model`."""
    return [
        ValidationIssue(kind, name, path, message, source) for path, message in field_problems(error, model)
    ]


def describe_validation_error(error: ValidationError, model: type[BaseModel]) -> str:
    """``field.path: what is wrong`` for every problem, joined by ``"; "`` (for an object without a name)."""
    return "; ".join(
        f"{path}: {message}" if path else message for path, message in field_problems(error, model)
    )


def resource_identity(document: Mapping[str, Any]) -> tuple[str, str]:
    """(kind, metadata.name) of a document, with placeholders for what it lacks."""
    kind = document.get("kind")
    metadata = document.get("metadata")
    name = metadata.get("name") if isinstance(metadata, Mapping) else None
    return (kind if isinstance(kind, str) and kind else "<no kind>"), (
        name if isinstance(name, str) and name else UNNAMED
    )


def show_value(value: Any) -> str:
    """A short rendering of an input value for a message."""
    if isinstance(value, str):
        return json.dumps(value if len(value) <= 60 else value[:57] + "...")
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


# -- the model's schema, walked along an error location -------------------------------------------------


@cache
def _json_schema(model: type[BaseModel]) -> SchemaNode:
    return model.model_json_schema(by_alias=True, mode="validation")


def _resolved(node: SchemaNode | None, definitions: SchemaNode) -> SchemaNode | None:
    """`node` with its `$ref` followed and an optional (`anyOf [X, null]`) reduced to X."""
    while node is not None:
        if "$ref" in node:
            node = definitions.get(str(node["$ref"]).rsplit("/", 1)[-1])
            continue
        union = node.get("anyOf") or node.get("oneOf")
        if union is not None:
            members = [member for member in union if member != {"type": "null"}]
            node = members[0] if len(members) == 1 else None
            continue
        return node
    return None


def _node(schema: SchemaNode, loc: Sequence[int | str]) -> SchemaNode | None:
    """The schema node a pydantic error location points at, if the schema has one."""
    definitions: SchemaNode = schema.get("$defs", {})
    node = _resolved(schema, definitions)
    for part in loc:
        if node is None:
            return None
        if isinstance(part, int):
            node = _resolved(node.get("items"), definitions)
        elif part in node.get("properties", {}):
            node = _resolved(node["properties"][part], definitions)
        elif isinstance(node.get("additionalProperties"), Mapping):
            node = _resolved(node["additionalProperties"], definitions)
        else:
            return None
    return node


def _allowed_values(node: SchemaNode | None) -> list[Any]:
    if node is None:
        return []
    if "const" in node:
        return [node["const"]]
    return list(node.get("enum") or [])


# -- pydantic errors -> messages -------------------------------------------------------------------------


def _path(loc: Iterable[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]":
            continue
        elif _IDENTIFIER.match(part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part)}]"
    return out


def _got(value: Any) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"got the number {show_value(value)}"
    return f"got {show_value(value)}"


def _describe(error: ErrorDetails, schema: SchemaNode) -> tuple[str, str]:
    """A pydantic error as (field path, human-friendly message)."""
    loc = error["loc"]
    path = _path(loc)
    node = _node(schema, loc)
    kind = error["type"]
    ctx = error.get("ctx") or {}
    value = error.get("input")
    if kind == "missing":
        return path, "required field is missing"
    if kind == "extra_forbidden":
        parent = _node(schema, loc[:-1]) or {}
        return path, "unknown field" + _suggest(str(loc[-1]), list(parent.get("properties", {})))
    if kind in ("value_error", "assertion_error"):
        return path, error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    pattern = ctx.get("pattern") or (node or {}).get("pattern")
    if (
        kind in ("string_pattern_mismatch", "string_type")
        and pattern in _NUMBER_PATTERNS
        and _negative(value)
    ):
        # A sign the pattern has no room for: say what the range is, not that it is no number.
        bounds = DecimalRange.from_schema(node or {}) or _NUMBER_PATTERNS[pattern]
        hint = "; write it as a string in quotes" if kind == "string_type" else ""
        return path, f"{bounds.describe()} ({_got(value)}{hint})"
    if kind in ("string_pattern_mismatch", "string_type") and pattern in _PATTERN_MESSAGES:
        hint = "; put it in quotes" if kind == "string_type" and isinstance(value, int | float) else ""
        return path, f"{_PATTERN_MESSAGES[pattern]} ({_got(value)}{hint})"
    if kind in ("literal_error", "enum"):
        allowed = _allowed_values(node) or re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        return path, f"must be one of: {', '.join(str(a) for a in allowed)} ({_got(value)})"
    return path, _simple_message(kind, ctx, value, error["msg"])


def _negative(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return value < 0
    if isinstance(value, str):
        try:
            return Decimal(value.strip()) < 0
        except InvalidOperation:
            return False
    return False


def _simple_message(kind: str, ctx: Mapping[str, Any], value: Any, fallback: str) -> str:
    got = _got(value)
    if kind == "string_pattern_mismatch":
        return f"must match the pattern {ctx.get('pattern')} ({got})"
    if kind == "string_too_short":
        n = ctx.get("min_length")
        return "must not be empty" if n == 1 else f"must be at least {n} characters long"
    if kind == "string_too_long":
        return f"must be at most {ctx.get('max_length')} characters long (got {len(str(value))})"
    if kind in ("too_short", "too_long"):
        bound = "at least" if kind == "too_short" else "at most"
        n = ctx.get("min_length" if kind == "too_short" else "max_length")
        return f"must have {bound} {n} item{'s' if n != 1 else ''}"
    if kind == "greater_than_equal" and ctx.get("ge") == 0:
        return f"must not be negative ({got})"
    if kind in _BOUNDS:
        words, key = _BOUNDS[kind]
        return f"must be {words} {ctx.get(key)} ({got})"
    if kind in _EXPECTED_TYPES:
        return f"must be {_EXPECTED_TYPES[kind]} ({got})"
    return fallback


def _suggest(word: str, candidates: list[str]) -> str:
    lowered = {candidate.lower(): candidate for candidate in candidates}
    match = lowered.get(word.lower()) or next(
        iter(difflib.get_close_matches(word, candidates, n=1, cutoff=0.75)), None
    )
    return f" (did you mean {match}?)" if match else ""
