"""Offline validation of kubetune manifests, with Kubernetes-style field paths.

``kubetune validate`` and the operator share this module, so a user sees the same message before
``kubectl apply`` as the operator later writes into a condition::

    FineTuneJob/demo: spec.training.weightDecay: must be a decimal number as a string, e.g. "3e-4" (got "x")

- :func:`validate_paths` / :func:`validate_documents` check files or parsed documents and return a
  :class:`ValidationResult` (a list of :class:`ValidationIssue`, plus counts). Documents outside the
  ``kubetune.dev`` group are skipped and counted.
- :func:`parse_resource` turns one document into its pydantic object or raises :class:`ResourceInvalid`.

Validation is strict about types, like the API server: ``batchSize: "8"`` and ``learningRate: 0.0003``
are errors, not silently converted. YAML is read the way ``kubectl`` reads it: ``3e-4`` unquoted is a
number (Go's YAML parser), not the string PyYAML would make of it.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, TypeVar, overload

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from kubetune.api.crd import openapi_schema
from kubetune.api.definition import ResourceDefinition
from kubetune.api.registry import REGISTRY
from kubetune_contract.common import DECIMAL_PATTERN, GROUP, MODEL_URI_PATTERN, RATIO_PATTERN

M = TypeVar("M", bound=BaseModel)

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
UNNAMED = "<unnamed>"
# What the API server requires of every custom resource name (a DNS-1123 subdomain).
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_SUBDOMAIN_MESSAGE = (
    "must be lower case letters, digits, '-' or '.', and start and end with a letter or digit"
)
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")

_PATTERN_MESSAGES = {
    DECIMAL_PATTERN: 'must be a decimal number as a string, e.g. "3e-4"',
    RATIO_PATTERN: 'must be a ratio between 0 and 1 as a string, e.g. "0.1"',
    MODEL_URI_PATTERN: (
        "must be a model URI: hf://org/name@revision, file:///path, pvc://claim/path or a plain path"
    ),
}


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


class ValidationResult(list[ValidationIssue]):
    """The issues found (it *is* the list), plus what was looked at."""

    def __init__(self, issues: Iterable[ValidationIssue] = ()) -> None:
        super().__init__(issues)
        self.files = 0  # files read
        self.resources = 0  # kubetune documents validated
        self.invalid = 0  # kubetune documents with at least one issue
        self.skipped = 0  # documents of other API groups, not validated

    @property
    def ok(self) -> bool:
        return not self

    def summary(self) -> str:
        parts = [f"{self.resources} kubetune resource{'s' if self.resources != 1 else ''} checked"]
        parts.append(f"{self.invalid} invalid" if self.invalid else "all valid")
        if self.skipped:
            parts.append(f"{self.skipped} other document{'s' if self.skipped != 1 else ''} skipped")
        return ", ".join(parts)


class ResourceInvalid(ValueError):
    """A document is not a valid kubetune resource.

    ``str(exc)`` is the issues (``Kind/name: field.path: what is wrong``) joined by ``"; "``;
    :attr:`condition_message` leaves out the ``Kind/name`` prefix, for a condition on the object itself.
    """

    def __init__(self, issues: Iterable[ValidationIssue]) -> None:
        self.issues = list(issues)
        super().__init__("; ".join(str(issue) for issue in self.issues))

    @property
    def condition_message(self) -> str:
        return "; ".join(issue.detail for issue in self.issues)


def format_issues(issues: Iterable[ValidationIssue], *, sources: bool = True) -> str:
    """One issue per line; prefixed with ``file:line: `` when ``sources`` and the issue has one."""
    lines = [f"{i.source}: {i}" if sources and i.source else str(i) for i in issues]
    return "\n".join(lines)


# -- documents -----------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """Deep copy into plain dicts and lists (kopf bodies and other mappings are views)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _identity(doc: Mapping[str, Any]) -> tuple[str, str]:
    kind = doc.get("kind")
    metadata = doc.get("metadata")
    name = metadata.get("name") if isinstance(metadata, Mapping) else None
    return (kind if isinstance(kind, str) and kind else "<no kind>"), (
        name if isinstance(name, str) and name else UNNAMED
    )


def is_kubetune_document(doc: Mapping[str, Any]) -> bool:
    """Whether a document belongs to the kubetune API group (``apiVersion: kubetune.dev/...``)."""
    api_version = doc.get("apiVersion")
    return isinstance(api_version, str) and api_version.partition("/")[0] == GROUP


def _check(
    doc: Mapping[str, Any], source: str | None = None
) -> tuple[BaseModel | None, list[ValidationIssue]]:
    """Validate one kubetune document: its parsed object (when valid) and its issues."""
    kind, name = _identity(doc)

    def issue(path: str, message: str) -> ValidationIssue:
        return ValidationIssue(kind, name, path, message, source)

    if not is_kubetune_document(doc):
        got = doc.get("apiVersion")
        return None, [issue("apiVersion", f"{_show(got)} is not a {GROUP} API version")]
    issues: list[ValidationIssue] = []
    raw_kind = doc.get("kind")
    definition = REGISTRY.by_kind(raw_kind) if isinstance(raw_kind, str) else None
    if definition is None:
        known = ", ".join(d.kind for d in REGISTRY)
        if "kind" not in doc:
            return None, [issue("kind", f"required field is missing; {GROUP} serves: {known}")]
        near = REGISTRY.find(str(doc["kind"]))
        hint = f" (did you mean {near.kind}?)" if near else ""
        return None, [
            issue("kind", f"unknown kind {_show(doc['kind'])} in {GROUP}{hint}; known kinds: {known}")
        ]
    body = _plain(doc)
    if body["apiVersion"] != definition.api_version:
        issues.append(
            issue(
                "apiVersion", f"unsupported version {_show(body['apiVersion'])}; use {definition.api_version}"
            )
        )
        body["apiVersion"] = definition.api_version
    if body.get("metadata") is None:
        body["metadata"] = {}  # report metadata.name, the field that is really missing
    try:
        obj = definition.model.model_validate(body, strict=True)
    except ValidationError as exc:
        obj = None
        schema = _schema(definition)
        issues.extend(issue(*_describe(error, schema)) for error in exc.errors())
    metadata = body["metadata"]
    name_value = metadata.get("name") if isinstance(metadata, Mapping) else None
    if isinstance(name_value, str) and name_value and not _DNS_SUBDOMAIN.match(name_value):
        issues.append(issue("metadata.name", _DNS_SUBDOMAIN_MESSAGE))
    return (None if issues else obj), issues


@overload
def parse_resource(doc: Mapping[str, Any]) -> BaseModel: ...
@overload
def parse_resource(doc: Mapping[str, Any], model: type[M]) -> M: ...
def parse_resource(doc: Mapping[str, Any], model: type[BaseModel] | None = None) -> BaseModel:
    """The pydantic object of a kubetune document; raises :class:`ResourceInvalid` with every issue.

    With ``model`` (e.g. ``FineTuneJob``) the document must be of that kind, and the result is typed.
    """
    obj, issues = _check(doc)
    if not issues and model is not None and not isinstance(obj, model):
        kind, name = _identity(doc)
        issues = [
            ValidationIssue(kind, name, "kind", f"expected {model.__name__}, got {_show(doc.get('kind'))}")
        ]
    if issues or obj is None:
        raise ResourceInvalid(issues)
    return obj


def _expand(doc: Any) -> Iterator[Any]:
    """A ``kind: List`` document stands for its items."""
    if isinstance(doc, Mapping) and doc.get("kind") == "List" and isinstance(doc.get("items"), list):
        for item in doc["items"]:
            yield from _expand(item)
    else:
        yield doc


def _validate_into(result: ValidationResult, doc: Any, source: str | None) -> None:
    for item in _expand(doc):
        if item is None:
            continue  # an empty document (a trailing `---`)
        if not isinstance(item, Mapping):
            result.append(ValidationIssue("", source or "document", "", "document is not a mapping", None))
            continue
        if not is_kubetune_document(item):
            result.skipped += 1
            continue
        result.resources += 1
        _, issues = _check(item, source)
        if issues:
            result.invalid += 1
            result.extend(issues)


def validate_documents(docs: Iterable[Mapping[str, Any] | None]) -> ValidationResult:
    """Validate parsed documents; other API groups are skipped (``result.skipped`` counts them)."""
    result = ValidationResult()
    for doc in docs:
        _validate_into(result, doc, None)
    return result


# -- files -------------------------------------------------------------------------------------------


class _KubectlLoader(yaml.SafeLoader):
    """PyYAML, but reading `3e-4` as a number the way Go's YAML parser (and so kubectl) does."""


_KubectlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_documents(path: str | Path) -> list[tuple[Any, str]]:
    """The documents of a YAML (multi-document) or JSON file, each with ``file:line`` of its start.

    Raises ``ValueError`` (with the file and position) on a syntax error.
    """
    file = Path(path)
    text = file.read_text(encoding="utf-8")
    if file.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"invalid JSON: {exc.msg} (line {exc.lineno})") from exc
        items = data if isinstance(data, list) else [data]
        return [(item, f"{file}") for item in items]
    docs: list[tuple[Any, str]] = []
    loader = _KubectlLoader(text)
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:  # pragma: no cover - check_node() said there is one
                break
            docs.append((loader.construct_document(node), f"{file}:{node.start_mark.line + 1}"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ValueError(f"invalid YAML: {problem}{where}") from exc
    finally:
        loader.dispose()
    return docs


def _manifest_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix in MANIFEST_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
    return [path]


def _as_paths(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    if isinstance(paths, str | Path):
        return [Path(paths)]
    return [Path(p) for p in paths]


def read_manifests(paths: str | Path | Iterable[str | Path]) -> list[dict[str, Any]]:
    """Every mapping document in the files and directories (``kind: List`` expanded), in order.

    Unlike :func:`validate_paths` this does not check anything: a missing file raises ``OSError`` and a
    syntax error ``ValueError`` (naming the file). Validate first to report problems nicely.
    """
    documents: list[dict[str, Any]] = []
    for path in _as_paths(paths):
        for file in _manifest_files(path):
            try:
                docs = load_documents(file)
            except ValueError as exc:
                raise ValueError(f"{file}: {exc}") from exc
            for doc, _ in docs:
                documents.extend(_plain(item) for item in _expand(doc) if isinstance(item, Mapping))
    return documents


def validate_paths(paths: str | Path | Iterable[str | Path]) -> ValidationResult:
    """Validate files and directories (recursively: ``*.yaml``, ``*.yml``, ``*.json``; hidden ones skipped).

    A file named explicitly is read whatever its suffix. Unreadable files and syntax errors are issues
    too (``file: what is wrong``).
    """
    result = ValidationResult()
    for path in _as_paths(paths):
        if not path.exists():
            result.append(ValidationIssue("", str(path), "", "no such file or directory"))
            continue
        for file in _manifest_files(path):
            result.files += 1
            try:
                docs = load_documents(file)
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                result.append(ValidationIssue("", str(file), "", str(exc)))
                continue
            for doc, source in docs:
                _validate_into(result, doc, source)
    return result


# -- pydantic errors -> messages ---------------------------------------------------------------------


@cache
def _schema(definition: ResourceDefinition) -> dict[str, Any]:
    return openapi_schema(definition)


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


def _node(schema: Mapping[str, Any] | None, loc: Iterable[int | str]) -> Mapping[str, Any] | None:
    """The schema node a pydantic error location points at, if the schema has one."""
    node = schema
    for part in loc:
        if node is None:
            return None
        if isinstance(part, int):
            node = node.get("items")
        elif part in node.get("properties", {}):
            node = node["properties"][part]
        elif isinstance(node.get("additionalProperties"), Mapping):
            node = node["additionalProperties"]
        else:
            return None
    return node


def _show(value: Any) -> str:
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


def _got(value: Any) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"got the number {_show(value)}"
    return f"got {_show(value)}"


def _describe(error: ErrorDetails, schema: Mapping[str, Any]) -> tuple[str, str]:
    """A pydantic error as (field path, human-friendly message)."""
    loc = error["loc"]
    node = _node(schema, loc)
    kind = error["type"]
    ctx = error.get("ctx") or {}
    value = error.get("input")
    if kind == "missing":
        return _path(loc), "required field is missing"
    if kind == "extra_forbidden":
        parent = _node(schema, loc[:-1]) or {}
        return _path(loc), "unknown field" + _suggest(str(loc[-1]), list(parent.get("properties", {})))
    if kind in ("value_error", "assertion_error"):
        message = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        return _path(loc), message
    pattern = ctx.get("pattern") or (node or {}).get("pattern")
    if kind in ("string_pattern_mismatch", "string_type") and pattern in _PATTERN_MESSAGES:
        hint = "; put it in quotes" if kind == "string_type" and isinstance(value, int | float) else ""
        return _path(loc), f"{_PATTERN_MESSAGES[pattern]} ({_got(value)}{hint})"
    if kind in ("literal_error", "enum"):
        allowed = (node or {}).get("enum") or re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        return _path(loc), f"must be one of: {', '.join(str(a) for a in allowed)} ({_got(value)})"
    return _path(loc), _simple_message(kind, ctx, value, error["msg"])


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
    bounds = {
        "greater_than_equal": ("at least", "ge"),
        "greater_than": ("greater than", "gt"),
        "less_than_equal": ("at most", "le"),
        "less_than": ("less than", "lt"),
    }
    if kind in bounds:
        words, key = bounds[kind]
        return f"must be {words} {ctx.get(key)} ({got})"
    types = {
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
    if kind in types:
        return f"must be {types[kind]} ({got})"
    return fallback


def _suggest(word: str, candidates: list[str]) -> str:
    lowered = {c.lower(): c for c in candidates}
    match = lowered.get(word.lower()) or next(
        iter(difflib.get_close_matches(word, candidates, n=1, cutoff=0.75)), None
    )
    return f" (did you mean {match}?)" if match else ""
