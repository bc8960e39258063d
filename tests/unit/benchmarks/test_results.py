"""benchmarks/_results.py: what every benchmark records about a run, and how it judges a target."""

from __future__ import annotations

import datetime
import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[3]


def _load_results_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_results", REPO / "benchmarks" / "_results.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["_results"] = module  # dataclasses resolve their module's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


results = _load_results_module()


def test_a_higher_is_better_target_is_met_at_or_above_its_threshold() -> None:
    target = results.Target(0.95)
    assert target.met(0.95) and target.met(1.2)
    assert not target.met(0.949)
    assert target.worst([1.0, 0.9, 0.97]) == 0.9
    assert target.describe() == ">= 0.95"


def test_a_lower_is_better_target_is_met_at_or_below_its_threshold() -> None:
    target = results.Target(2.0, higher_is_better=False)
    assert target.met(2.0) and target.met(-0.5)
    assert not target.met(2.01)
    assert target.worst([0.5, 3.0, 1.0]) == 3.0
    assert target.describe() == "<= 2"


def test_a_ratio_can_meet_its_target_by_median_yet_miss_it_in_the_worst_round() -> None:
    rounds = (0.97, 0.96, 0.93, 0.99, 0.98)
    summary = results.RatioSummary("ratio", "kubetune / plain", rounds, results.Target(0.95))
    assert summary.median == 0.97
    assert summary.met_by_median is True
    assert summary.met_by_worst_round is False
    assert "median 0.970, min-max 0.930-0.990 over 5 rounds" in summary.line()
    assert "met by median yes, by worst round NO" in summary.line()
    recorded = summary.to_json()
    assert (recorded["min"], recorded["max"], recorded["median"]) == (0.93, 0.99, 0.97)
    assert recorded["target"] == {"threshold": 0.95, "higherIsBetter": True}


def test_a_ratio_without_a_target_reports_its_spread_and_no_verdict() -> None:
    summary = results.RatioSummary("latency", "int8 latency / fp32", (0.7, 0.8, 0.75, 0.72, 0.9), None)
    assert summary.met_by_median is None and summary.met_by_worst_round is None
    assert "target" not in summary.line()


def test_the_record_names_the_machine_the_commit_the_date_and_every_round(tmp_path: Path) -> None:
    record = results.BenchmarkRecord(
        "example", REPO / "benchmarks" / "example.py", {"steps": 3}, ["--steps", "3"]
    )
    for value in (1.0, 1.1, 0.9, 1.05, 0.95):
        record.add_round({"ratio": value})
    record.summarize("ratio", "a over b", [r["ratio"] for r in record.rounds], results.Target(0.95))
    written = json.loads(record.write(tmp_path).read_text())

    assert written["benchmark"] == "example"
    assert written["command"] == "python benchmarks/example.py --steps 3"
    assert re.fullmatch(r"[0-9a-f]{40}", written["commit"]) and isinstance(written["dirty"], bool)
    assert datetime.datetime.fromisoformat(written["date"]).tzinfo is not None
    machine = written["machine"]
    assert machine["cpus"] >= 1 and machine["cpuModel"]
    assert len(machine["loadAverageBefore"]) == 3 and len(machine["loadAverageAfter"]) == 3
    assert written["settings"] == {"steps": 3}
    assert [r["round"] for r in written["rounds"]] == [1, 2, 3, 4, 5]
    ratio = written["ratios"]["ratio"]
    assert ratio["rounds"] == [1.0, 1.1, 0.9, 1.05, 0.95]
    assert (ratio["median"], ratio["metByMedian"], ratio["metByWorstRound"]) == (1.0, True, False)


def test_summarizing_no_rounds_is_an_error_naming_the_ratio() -> None:
    record = results.BenchmarkRecord("example", REPO / "benchmarks" / "example.py", {}, [])
    with pytest.raises(ValueError, match="throughputRatio: no rounds"):
        record.summarize("throughputRatio", "gateway / direct", [])
