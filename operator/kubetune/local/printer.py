"""Printer columns, read from stored objects the way kubectl reads them from the API server."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kubetune.api.definition import PrinterColumn

_FILTER = re.compile(r'^\[\?\(@\.(\w+)\s*==\s*["\'](.*)["\']\)\]$')


def jsonpath(obj: Any, path: str) -> Any:
    """The subset of JSONPath printer columns use: `.a.b`, `[0]`, and `[?(@.type=="X")]` filters."""
    tokens = re.findall(r"\.[A-Za-z0-9_-]+|\[[^\]]*\]", path)
    current: Any = obj
    for token in tokens:
        if current is None:
            return None
        if token.startswith("."):
            current = current.get(token[1:]) if isinstance(current, dict) else None
        elif (match := _FILTER.match(token)) is not None:
            key, value = match.groups()
            items = current if isinstance(current, list) else []
            current = next((item for item in items if str(item.get(key)) == value), None)
        else:
            index = token[1:-1]
            current = (
                current[int(index)]
                if isinstance(current, list) and index.isdigit() and int(index) < len(current)
                else None
            )
    return current


def age(timestamp: str | None, now: datetime | None = None) -> str:
    if not timestamp:
        return "<unknown>"
    created = datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    seconds = int(((now or datetime.now(UTC)) - created).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def printer_row(obj: dict[str, Any], columns: list[PrinterColumn]) -> list[str]:
    row = [str(obj["metadata"]["name"])]
    for column in columns:
        value = jsonpath(obj, column.json_path)
        if column.type == "date":
            row.append(age(value))
        elif value is None:
            row.append("")
        else:
            row.append(str(value))
    return row


def printer_table(objects: list[dict[str, Any]], columns: list[PrinterColumn]) -> str:
    """``objects`` as `kubectl get` lists them: NAME and the columns, aligned, three spaces apart."""
    rows = [["NAME", *(column.name.upper() for column in columns)]]
    rows += [printer_row(obj, columns) for obj in objects]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("   ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows)
