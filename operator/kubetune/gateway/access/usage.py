"""Usage per key, tenant and version, read back from a gateway's Prometheus series.

``kubetune usage mdep/NAME`` reads ``/metrics`` of the deployment's gateway (the series
``kubetune_gateway_usage_*``) and prints one row per (version, key, tenant): requests served, requests
refused (by auth or limits), tokens in and out, and cost (the versions' pricing).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

REFUSALS = frozenset({"unauthenticated", "forbidden", "limited", "limit-store-unavailable"})


@dataclass
class UsageRow:
    version: str
    key: str
    tenant: str
    requests: int = 0
    refused: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cost: float = 0.0

    def to_json(self) -> dict[str, Any]:
        row = asdict(self)
        return {
            "version": row["version"],
            "key": row["key"],
            "tenant": row["tenant"],
            "requests": row["requests"],
            "refused": row["refused"],
            "tokensIn": row["tokens_in"],
            "tokensOut": row["tokens_out"],
            "cost": row["cost"],
        }


def usage_rows(metrics_text: str, deployment: str) -> list[UsageRow]:
    """The usage of ``deployment`` in a gateway's Prometheus exposition text, sorted."""
    rows: dict[tuple[str, str, str], UsageRow] = {}

    def row(labels: dict[str, str]) -> UsageRow:
        key = (labels["version"], labels["key"], labels["tenant"])
        found = rows.get(key)
        if found is None:
            found = rows[key] = UsageRow(*key)
        return found

    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            labels = sample.labels
            if labels.get("deployment") != deployment or not sample.name.endswith("_total"):
                continue
            value = sample.value
            if sample.name == "kubetune_gateway_usage_requests_total":
                if labels["decision"] in REFUSALS:
                    row(labels).refused += int(value)
                else:
                    row(labels).requests += int(value)
            elif sample.name == "kubetune_gateway_usage_tokens_total":
                if labels["direction"] == "in":
                    row(labels).tokens_in += int(value)
                else:
                    row(labels).tokens_out += int(value)
            elif sample.name == "kubetune_gateway_usage_cost_total":
                row(labels).cost += value
    return [rows[key] for key in sorted(rows)]


def usage_table(rows: list[UsageRow]) -> str:
    header = ["VERSION", "KEY", "TENANT", "REQUESTS", "REFUSED", "TOKENS IN", "TOKENS OUT", "COST"]
    lines = [header] + [
        [
            row.version,
            row.key,
            row.tenant,
            str(row.requests),
            str(row.refused),
            str(row.tokens_in),
            str(row.tokens_out),
            f"{row.cost:.6f}".rstrip("0").rstrip(".") if row.cost else "0",
        ]
        for row in rows
    ]
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    return "\n".join(
        "   ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )
