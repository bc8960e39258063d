"""Offline validation of kubetune manifests, with Kubernetes-style field paths.

``kubetune validate`` and the operator share this module, so a user sees the same message before
``kubectl apply`` as the operator later writes into a condition (the words come from
:mod:`kubetune_contract.validation`, which the pipeline steps use too)::

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

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar, overload

import yaml
from pydantic import BaseModel, ValidationError

from kubetune.api.registry import REGISTRY
from kubetune_contract.common import DNS_SUBDOMAIN_PATTERN, GROUP
from kubetune_contract.validation import (
    ValidationIssue,
    resource_identity,
    show_value,
    validation_issues,
)

M = TypeVar("M", bound=BaseModel)

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
# What the API server requires of every custom resource name (a DNS-1123 subdomain).
_DNS_SUBDOMAIN = re.compile(DNS_SUBDOMAIN_PATTERN)
_DNS_SUBDOMAIN_MESSAGE = (
    "must be lower case letters, digits, '-' or '.', and start and end with a letter or digit"
)


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


def is_kubetune_document(doc: Mapping[str, Any]) -> bool:
    """Whether a document belongs to the kubetune API group (``apiVersion: kubetune.dev/...``)."""
    api_version = doc.get("apiVersion")
    return isinstance(api_version, str) and api_version.partition("/")[0] == GROUP


def _check(
    doc: Mapping[str, Any], source: str | None = None
) -> tuple[BaseModel | None, list[ValidationIssue]]:
    """Validate one kubetune document: its parsed object (when valid) and its issues."""
    kind, name = resource_identity(doc)

    def issue(path: str, message: str) -> ValidationIssue:
        return ValidationIssue(kind, name, path, message, source)

    if not is_kubetune_document(doc):
        got = doc.get("apiVersion")
        return None, [issue("apiVersion", f"{show_value(got)} is not a {GROUP} API version")]
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
            issue("kind", f"unknown kind {show_value(doc['kind'])} in {GROUP}{hint}; known kinds: {known}")
        ]
    body = _plain(doc)
    if body["apiVersion"] != definition.api_version:
        issues.append(
            issue(
                "apiVersion",
                f"unsupported version {show_value(body['apiVersion'])}; use {definition.api_version}",
            )
        )
        body["apiVersion"] = definition.api_version
    if body.get("metadata") is None:
        body["metadata"] = {}  # report metadata.name, the field that is really missing
    try:
        obj = definition.model.model_validate(body, strict=True)
    except ValidationError as exc:
        obj = None
        issues.extend(validation_issues(exc, definition.model, kind=kind, name=name, source=source))
    metadata = body["metadata"]
    name_value = metadata.get("name") if isinstance(metadata, Mapping) else None
    if isinstance(name_value, str) and len(name_value) > definition.max_name_length:
        # The kind's own limit, worded as the API server's rule words it, instead of ObjectMeta's 63.
        too_long = definition.name_length_message(len(name_value))
        issues = [i for i in issues if not (i.path == "metadata.name" and "characters long" in i.message)]
        issues.append(issue("metadata.name", too_long))
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
        kind, name = resource_identity(doc)
        issues = [
            ValidationIssue(
                kind, name, "kind", f"expected {model.__name__}, got {show_value(doc.get('kind'))}"
            )
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


class ManifestError(ValueError):
    """A manifest file that is not text or not valid YAML/JSON. ``str()`` is ``file: what is wrong``."""

    def __init__(self, file: Path, problem: str) -> None:
        self.file = file
        self.problem = problem
        super().__init__(f"{file}: {problem}")


def load_documents(path: str | Path) -> list[tuple[Any, str]]:
    """The documents of a YAML (multi-document) or JSON file, each with ``file:line`` of its start.

    Raises :class:`ManifestError` (naming the file, and the line of a syntax error) for a file that is
    not UTF-8 text or not valid YAML/JSON, and ``OSError`` for one that cannot be read.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(
            file, f"not a UTF-8 text file (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"
        ) from exc
    if file.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(file, f"invalid JSON: {exc.msg} (line {exc.lineno})") from exc
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
        raise ManifestError(file, f"invalid YAML: {problem}{where}") from exc
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


def _unread(files: Iterable[Path], read: set[Path]) -> Iterator[Path]:
    """The files not read yet, so a file named twice (or inside a directory also named) is read once."""
    for file in files:
        key = file.resolve()
        if key not in read:
            read.add(key)
            yield file


def read_manifests(paths: str | Path | Iterable[str | Path]) -> list[dict[str, Any]]:
    """Every mapping document in the files and directories (``kind: List`` expanded), in order.

    Unlike :func:`validate_paths` this does not check anything: a missing file raises ``OSError`` and a
    file that is not text or not YAML/JSON :class:`ManifestError`. Validate first to report problems nicely.
    """
    documents: list[dict[str, Any]] = []
    read: set[Path] = set()
    for path in _as_paths(paths):
        for file in _unread(_manifest_files(path), read):
            for doc, _ in load_documents(file):
                documents.extend(_plain(item) for item in _expand(doc) if isinstance(item, Mapping))
    return documents


def _defined_once(
    doc: Any, source: str, defined_at: dict[tuple[str, str, str], str]
) -> Iterator[ValidationIssue]:
    """An issue for each kubetune resource of `doc` already defined elsewhere (kind, namespace and name).

    Applying both would silently keep the later one, so two definitions are refused, naming both places.
    """
    for item in _expand(doc):
        if not isinstance(item, Mapping) or not is_kubetune_document(item):
            continue
        kind, metadata = item.get("kind"), item.get("metadata")
        if not isinstance(kind, str) or not isinstance(metadata, Mapping):
            continue  # the resource's own validation reports the missing kind or metadata
        name, namespace = metadata.get("name"), str(metadata.get("namespace") or "default")
        if not isinstance(name, str):
            continue
        key = (kind, namespace, name)
        if key in defined_at:
            yield ValidationIssue(
                kind,
                name,
                "metadata.name",
                f"{kind} {namespace}/{name} is also defined at {defined_at[key]}; define each resource once",
                source,
            )
        else:
            defined_at[key] = source


def validate_paths(paths: str | Path | Iterable[str | Path]) -> ValidationResult:
    """Validate files and directories (recursively: ``*.yaml``, ``*.yml``, ``*.json``; hidden ones skipped).

    A file named explicitly is read whatever its suffix. Unreadable files, syntax errors, a path holding
    no kubetune resource and a resource defined twice are issues too (``file: what is wrong``).
    """
    result = ValidationResult()
    read: set[Path] = set()
    defined_at: dict[tuple[str, str, str], str] = {}
    for path in _as_paths(paths):
        if not path.exists():
            result.append(ValidationIssue("", str(path), "", "no such file or directory"))
            continue
        resources_before, issues_before = result.resources, len(result)
        files = _manifest_files(path)
        unread = list(_unread(files, read))
        if files and not unread:
            continue  # named already
        for file in unread:
            result.files += 1
            try:
                docs = load_documents(file)
            except ManifestError as exc:
                result.append(ValidationIssue("", str(file), "", exc.problem))
                continue
            except OSError as exc:
                result.append(ValidationIssue("", str(file), "", exc.strerror or str(exc)))
                continue
            for doc, source in docs:
                _validate_into(result, doc, source)
                result.extend(_defined_once(doc, source, defined_at))
        if result.resources == resources_before and len(result) == issues_before:
            result.append(ValidationIssue("", str(path), "", "no kubetune resource found"))
    return result
