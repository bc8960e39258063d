#!/usr/bin/env python3
"""Write the generated sections of README.md: the Helm values and CRD references and the measured figures.

  values-reference  every key of charts/kubetune/values.schema.json: type (with its constraints),
                    default (from charts/kubetune/values.yaml) and description;
  crd-reference     every field of every kubetune kind (kubetune.api.registry), from the OpenAPI schema
                    the CRDs are generated from (kubetune.api.crd, itself generated from the pydantic
                    models): path, type, default and description;
  benchmarks        the fine-tune overhead and gateway figures, from benchmarks/results/{finetune-overhead,
                    gateway}.json: each claimed ratio's median, min-max over rounds and target verdicts,
                    the gateway's latency percentiles, and the machine, load, commit and date of the run;
  quantize-methods  the QuantizeJob methods table, from benchmarks/results/quantize.json.

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
RESULTS_DIR = REPO / "benchmarks" / "results"
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


def _default_cell(node: Mapping[str, Any], required: bool) -> str:
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


# --- benchmarks, quantize-methods (from benchmarks/results/*.json, written by benchmarks/_results.py) ------


def _result(name: str) -> dict[str, Any] | None:
    path = RESULTS_DIR / f"{name}.json"
    if not path.is_file():
        return None
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


def _missing(name: str, script: str) -> str:
    return f"No recorded run: `python benchmarks/{script}` writes `benchmarks/results/{name}.json`."


def _verdict(value: bool | None) -> str:
    return "—" if value is None else ("yes" if value else "**no**")


def _provenance(result: Mapping[str, Any]) -> str:
    machine = result["machine"]
    commit = result.get("commit") or "unknown"
    dirty = " plus uncommitted changes" if result.get("dirty") else ""
    before = ", ".join(f"{value:g}" for value in machine["loadAverageBefore"])
    after = ", ".join(f"{value:g}" for value in machine["loadAverageAfter"])
    return (
        f"Recorded in `benchmarks/results/{result['benchmark']}.json`: `{result['command']}`, "
        f"{result['date'][:10]}, commit `{commit[:10]}`{dirty}, {machine['cpus']} x {machine['cpuModel']}, "
        f"load average (1, 5, 15 min) {before} before and {after} after, {result['durationSeconds']:.0f} s."
    )


def _ratio_rows(result: Mapping[str, Any]) -> list[str]:
    rows = []
    for ratio in result["ratios"].values():
        target = ratio["target"]
        shown_target = "—"
        if target is not None:
            shown_target = f"{'≥' if target['higherIsBetter'] else '≤'} {target['threshold']:g}"
        rows.append(
            f"| {_cell(ratio['description'])} | {shown_target} | {ratio['median']:.3f} | "
            f"{ratio['min']:.3f}..{ratio['max']:.3f} | {_verdict(ratio['metByMedian'])} | "
            f"{_verdict(ratio['metByWorstRound'])} | {len(ratio['rounds'])} |"
        )
    return rows


def _claims_table(result: Mapping[str, Any]) -> str:
    header = [
        "| figure | target | median | min..max | met by median | met by worst round | rounds |",
        "|---|---|---|---|---|---|---|",
    ]
    return "\n".join(header + _ratio_rows(result))


def _gateway_phases(result: Mapping[str, Any]) -> str:
    lines = [
        "| load | target | requests/s | p50 ms | p90 ms | p99 ms | p99.9 ms | CPU ms / request | "
        "wrk, share of a core | late starts |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for phase, by_target in result["phases"].items():
        for target, figures in by_target.items():
            latency = figures["latencyMs"]
            cpu = figures["cpuMsPerRequest"]
            own_cpu = cpu["stub"] if target == "direct" else cpu["gateway"] + cpu["stub"]
            load = (
                f"saturation ({result['settings']['connections']} connections)"
                if phase == "saturation"
                else f"{phase} offered (open loop)"
            )
            lines.append(
                f"| {load} | {target} | {figures['throughput']:.0f} | {latency['50']:.2f} | "
                f"{latency['90']:.2f} | {latency['99']:.2f} | {latency['99.9']:.2f} | {own_cpu:.3f} | "
                f"{figures['generatorCoreShare']:.0%} | {figures['late']} |"
            )
    return "\n".join(lines)


def _settings_line(result: Mapping[str, Any]) -> str:
    if result["benchmark"] == "finetune-overhead":
        settings = result["settings"]
        return (
            f"{settings['steps']} steps per run, batch {settings['batchSize']}, {settings['threads']} torch "
            f"thread(s), tiny Llama of {settings['parameters']:,} parameters, LoRA r={settings['loraRank']}, "
            f"{settings['examples']} examples."
            + (
                f" Packed vs unpacked: {settings['packingEpochs']} epochs each, packed sequences of "
                f"{settings['packedLength']} tokens, {settings['packedBatchSize']} per micro-batch; "
                "kubetune's length-grouped unpacked batches are "
                f"{settings['unpackedPaddingShare']:.1%} padding."
                if "unpackedPaddingShare" in settings
                else ""
            )
        )
    if result["benchmark"] == "gateway":
        settings, share = result["settings"], result["generatorCpuShare"]
        return (
            f"Load from {settings['generator']}, {settings['durationSeconds']} s per run; medians over "
            f"{settings['rounds']} rounds. CPU ms / request: the stub's (direct) or the gateway's and the "
            f"stub's (through the gateway). wrk used a median {share['median']:.0%} (at most "
            f"{share['max']:.0%}) of the CPU time that wrk, the stub and the gateway used together."
        )
    return (
        "Settings: " + ", ".join(f"{key} {_code(value)}" for key, value in result["settings"].items()) + "."
    )


def benchmarks_section() -> str:
    """Every recorded benchmark but the quantize table (which the Methods section shows)."""
    names = sorted(path.stem for path in RESULTS_DIR.glob("*.json") if path.stem != "quantize")
    parts = []
    for name in names or ["finetune-overhead", "gateway"]:
        script = f"benchmarks/{name.replace('-', '_')}.py"
        parts.append(f"**{name}** (`{script}`)")
        result = _result(name)
        if result is None:
            parts.append(_missing(name, Path(script).name))
            continue
        parts.append(_settings_line(result) + "\n\n" + _claims_table(result))
        if "phases" in result:
            parts.append(_gateway_phases(result))
        parts.append(_provenance(result))
    return "\n\n".join(parts)


def quantize_section() -> str:
    result = _result("quantize")
    if result is None:
        return _missing("quantize", "quantize.py")
    model = result["model"]
    shape = model["shape"]
    intro = (
        f"The model: the dev tiny-base architecture ({model['parameters'] / 1e6:.2f}M parameters, hidden "
        f"{shape['hidden_size']}, {shape['num_hidden_layers']} layers), trained {model['bestStep']} steps "
        f"(the best held-out perplexity of {model['stepsRun']} run, {model['trainSeconds']:.0f} s) on "
        f"{model['trainTokens']:,} tokens of the dev corpus ({', '.join(model['corpus'])}). Held-out "
        f"perplexity ({model['heldOutTokens']:,} tokens of paragraphs never trained on): "
        f"**{model['heldOutPerplexity']:.2f}**, against {model['unigramPerplexity']:.2f} for a unigram "
        f"model of the training tokens. Every row is measured on the model reloaded from disk; latency "
        f"per greedy token on CPU, batch 1, median and min..max of the per-round ratio to fp32 over "
        f"{len(result['rounds'])} interleaved rounds."
    )
    lines = [
        "| method | size ratio | CPU latency ratio / token | held-out perplexity | perplexity change |",
        "|---|---|---|---|---|",
    ]
    for row in result["methods"]:
        latency = row["latencyRatio"]
        lines.append(
            f"| {row['method']} | {row['sizeRatio']:.3f} | {latency['median']:.2f} "
            f"({latency['min']:.2f}..{latency['max']:.2f}) | {row['perplexity']:.2f} | "
            f"{row['perplexityChange'] * 100:+.2f}% |"
        )
    return intro + "\n\n" + "\n".join(lines) + "\n\n" + _provenance(result)


SECTIONS = {
    "values-reference": values_section,
    "crd-reference": crd_section,
    "benchmarks": benchmarks_section,
    "quantize-methods": quantize_section,
}


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
