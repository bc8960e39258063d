#!/usr/bin/env python3
"""Write the generated sections of README.md: the Helm values reference and the CRD reference.

  values-reference  every key of charts/kubetune/values.schema.json: type (with its constraints),
                    default (from charts/kubetune/values.yaml) and description;
  crd-reference     every field of every kubetune kind (kubetune.api.registry), from the OpenAPI schema
                    the CRDs are generated from (kubetune.api.crd, itself generated from the pydantic
                    models): path, type, default and description.

Each section lives between `<!-- BEGIN GENERATED: <name> ... -->` and `<!-- END GENERATED: <name> -->`
markers in README.md; nothing outside the markers is touched.

Usage: python scripts/gen_docs.py [--check]
  --check  write nothing; exit 1 (naming the stale sections) if README.md is not current.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from kubetune.api.crd import openapi_schema
from kubetune.api.definition import ResourceDefinition
from kubetune.api.registry import all_definitions

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
CHART_DIR = REPO / "charts" / "kubetune"
COMMAND = "python scripts/gen_docs.py"

Row = tuple[str, str, str, str]  # path, type, default, description


class DocsError(Exception):
    """README.md cannot be updated (a marker is missing or out of order)."""


def begin_marker(name: str) -> str:
    return f"<!-- BEGIN GENERATED: {name} (`{COMMAND}`; do not edit by hand) -->"


def end_marker(name: str) -> str:
    return f"<!-- END GENERATED: {name} -->"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def _code(value: Any) -> str:
    if isinstance(value, str):
        shown = value if value else '""'
    else:
        shown = json.dumps(value, separators=(", ", ": "))
    return "`" + shown.replace("`", "'") + "`"


def _length(low: int | None, high: int | None, unit: str) -> str:
    if high is not None:
        return f"{low or 0}..{high} {unit}" if low else f"≤ {high} {unit}"
    if low:
        return "non-empty" if low == 1 else f"≥ {low} {unit}"
    return ""


def type_of(node: Mapping[str, Any]) -> str:
    """A short type: `string`, `integer ≥ 1`, `one of a, b`, `list of object`, `map of string` ..."""
    if "enum" in node:
        return "one of " + ", ".join(_code(v) for v in node["enum"])
    kind = node.get("type", "any")
    if isinstance(kind, list):
        kind = " or ".join(kind)
    if kind == "array":
        items = node.get("items") or {}
        kind = f"list of {type_of(items)}"
    elif kind == "object" and isinstance(node.get("additionalProperties"), Mapping):
        kind = f"map of {type_of(node['additionalProperties'])}"
    elif kind == "object" and node.get("x-kubernetes-preserve-unknown-fields"):
        kind = "object (free-form)"
    bounds = [
        f"≥ {node['minimum']}" if "minimum" in node else "",
        f"> {node['exclusiveMinimum']}" if "exclusiveMinimum" in node else "",
        f"≤ {node['maximum']}" if "maximum" in node else "",
        _length(node.get("minLength"), node.get("maxLength"), "chars"),
        _length(node.get("minItems"), node.get("maxItems"), "items"),
    ]
    constraints = ", ".join(b for b in bounds if b)
    return f"{kind} ({constraints})" if constraints else str(kind)


def _walk(
    node: Mapping[str, Any], path: str, required: bool
) -> Iterator[tuple[str, Mapping[str, Any], bool]]:
    """(path, schema node, required) of every field below `node`, depth first, in schema order."""
    properties = node.get("properties") or {}
    needed = set(node.get("required") or [])
    for name, child in properties.items():
        child_path = f"{path}.{name}" if path else name
        yield child_path, child, name in needed
        if child.get("type") == "array" and isinstance(child.get("items"), Mapping):
            yield from _walk(child["items"], f"{child_path}[]", False)
        else:
            yield from _walk(child, child_path, False)


# --- values-reference ----------------------------------------------------------------------------------


def _value_at(values: Mapping[str, Any], path: str) -> tuple[bool, Any]:
    current: Any = values
    for key in path.split("."):
        if not isinstance(current, Mapping) or key not in current:
            return False, None
        current = current[key]
    return True, current


def values_rows() -> list[Row]:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    rows = []
    for path, node, _ in _walk(schema, "", False):
        if node.get("properties"):
            continue  # an object of documented keys: its keys have rows of their own
        found, default = _value_at(values, path)
        shown = _code(default) if found else "—"
        rows.append((f"`{path}`", type_of(node), shown, node.get("description", "")))
    return rows


# --- crd-reference -------------------------------------------------------------------------------------


def crd_rows(definition: ResourceDefinition) -> list[Row]:
    schema = openapi_schema(definition)
    rows = []
    for section in ("spec", "status"):
        node = schema["properties"].get(section)
        if node is None:
            continue
        for path, child, required in _walk(node, section, False):
            default = _default_cell(child, required)
            rows.append((f"`{path}`", type_of(child), default, child.get("description", "")))
    return rows


def _default_cell(node: dict[str, Any], required: bool) -> str:
    if "default" not in node:
        return "required" if required else "—"
    if node.get("properties"):
        # The CRD writes an object's default out whole (the API server checks it against the object's CEL
        # rules as it is); each field's own row gives its part.
        return "its fields' defaults"
    return _code(node["default"])


def _table(rows: list[Row], header: tuple[str, str, str, str]) -> str:
    lines = [f"| {' | '.join(header)} |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(_cell(cell) for cell in row)} |" for row in rows]
    return "\n".join(lines)


def values_section() -> str:
    intro = (
        "Every value of the chart, from `charts/kubetune/values.schema.json` (Helm rejects anything else "
        "at install time, naming the key) with its default from `values.yaml`:"
    )
    return intro + "\n\n" + _table(values_rows(), ("key", "type", "default", "description"))


def crd_section() -> str:
    parts = [
        "Every field of every kind, from the OpenAPI schemas the CRDs are generated from (the pydantic "
        "models in `components/kubetune_contract`). Lists are marked `[]`; `required` fields have no default."
    ]
    for definition in all_definitions():
        names = ", ".join(f"`{n}`" for n in definition.short_names) or "none"
        parts.append(
            f"<details>\n<summary><b>{definition.kind}</b> (<code>{definition.api_version}</code>, "
            f"plural <code>{definition.plural}</code>, short names {names.replace('`', '')})</summary>\n\n"
            f"{_cell(definition.description)}\n\n"
            + _table(crd_rows(definition), ("field", "type", "default", "description"))
            + "\n\n</details>"
        )
    return "\n\n".join(parts)


SECTIONS = {"values-reference": values_section, "crd-reference": crd_section}


# --- README --------------------------------------------------------------------------------------------


def render(readme: str) -> str:
    """`readme` with every generated section replaced by its current content."""
    for name, build in SECTIONS.items():
        begin, end = begin_marker(name), end_marker(name)
        pattern = re.compile(
            re.escape(f"<!-- BEGIN GENERATED: {name} ") + r".*?-->\n(?P<body>.*?)" + re.escape(end),
            re.DOTALL,
        )
        matches = list(pattern.finditer(readme))
        if len(matches) != 1:
            raise DocsError(f"README.md needs exactly one {begin} ... {end} pair")
        start, stop = matches[0].span()
        readme = f"{readme[:start]}{begin}\n{build()}\n{end}{readme[stop:]}"
    return readme


def stale_sections(readme: str) -> list[str]:
    current = render(readme)
    stale = []
    for name in SECTIONS:
        pattern = re.compile(
            re.escape(f"<!-- BEGIN GENERATED: {name} ") + r".*?" + re.escape(end_marker(name)), re.DOTALL
        )
        before, after = pattern.search(readme), pattern.search(current)
        if before is None or after is None or before.group(0) != after.group(0):
            stale.append(name)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="report stale sections instead of writing")
    args = parser.parse_args(argv)
    text = README.read_text()
    try:
        if args.check:
            stale = stale_sections(text)
            for name in stale:
                print(f"stale: README.md section {name}; run `{COMMAND}`", file=sys.stderr)
            return 1 if stale else 0
        README.write_text(render(text))
    except DocsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("wrote README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
