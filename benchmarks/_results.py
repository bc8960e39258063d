"""The record every benchmark writes: its rounds, the spread of each ratio, the machine, the commit, the date.

A benchmark builds one `BenchmarkRecord`, adds each interleaved round's raw figures, summarizes every
ratio it claims (median, min-max, whether the target is met by the median and by the worst round) and
writes `benchmarks/results/<name>.json`. scripts/gen_docs.py renders README's benchmark figures from
those files, so every figure there names the run it came from.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
MIN_ROUNDS = 5


@dataclass(frozen=True)
class Target:
    """A bound a ratio should meet: `>= threshold` when higher is better, `<= threshold` otherwise."""

    threshold: float
    higher_is_better: bool = True

    def met(self, value: float) -> bool:
        return value >= self.threshold if self.higher_is_better else value <= self.threshold

    def worst(self, values: Sequence[float]) -> float:
        return min(values) if self.higher_is_better else max(values)

    def describe(self) -> str:
        return f"{'>=' if self.higher_is_better else '<='} {self.threshold:g}"


@dataclass(frozen=True)
class RatioSummary:
    """One claimed ratio over all rounds: its spread and whether the target holds."""

    name: str
    description: str
    values: tuple[float, ...]
    target: Target | None
    counted: bool = False
    """A count on a fixed labelled set (precision, recall): the same in every round, so measured once."""

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def met_by_median(self) -> bool | None:
        return None if self.target is None else self.target.met(self.median)

    @property
    def met_by_worst_round(self) -> bool | None:
        return None if self.target is None else self.target.met(self.target.worst(self.values))

    def line(self) -> str:
        text = (
            f"{self.description}: median {self.median:.3f}, min-max {min(self.values):.3f}-"
            f"{max(self.values):.3f} over {len(self.values)} rounds"
        )
        if self.target is not None:
            text += (
                f"; target {self.target.describe()}: met by median {_yes_no(self.met_by_median)}, "
                f"by worst round {_yes_no(self.met_by_worst_round)}"
            )
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "description": self.description,
            "rounds": list(self.values),
            "median": self.median,
            "min": min(self.values),
            "max": max(self.values),
            "target": None
            if self.target is None
            else {"threshold": self.target.threshold, "higherIsBetter": self.target.higher_is_better},
            "metByMedian": self.met_by_median,
            "metByWorstRound": self.met_by_worst_round,
            "counted": self.counted,
        }


def _yes_no(value: bool | None) -> str:
    return "n/a" if value is None else ("yes" if value else "NO")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def git_commit() -> dict[str, Any]:
    """HEAD and whether the working tree had uncommitted changes when the run started."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


class BenchmarkRecord:
    """Collects one run of a benchmark and writes it to benchmarks/results/<name>.json."""

    def __init__(
        self, name: str, script: Path, settings: Mapping[str, Any], argv: Sequence[str] | None = None
    ) -> None:
        self.name = name
        self.settings = dict(settings)
        arguments = list(sys.argv[1:] if argv is None else argv)
        self.command = " ".join(["python", script.resolve().relative_to(REPO).as_posix(), *arguments])
        self.started_at = datetime.datetime.now(datetime.UTC)
        self.started = time.monotonic()
        self.load_before = load_average()
        self.source = git_commit()
        self.rounds: list[dict[str, Any]] = []
        self.ratios: dict[str, RatioSummary] = {}
        self.extra: dict[str, Any] = {}

    def add_round(self, figures: Mapping[str, Any]) -> None:
        self.rounds.append({"round": len(self.rounds) + 1, **figures})

    def summarize(
        self,
        key: str,
        description: str,
        values: Sequence[float],
        target: Target | None = None,
        *,
        counted: bool = False,
    ) -> RatioSummary:
        """Records (and returns) the spread of one ratio over the rounds (one value where ``counted``)."""
        if not values:
            raise ValueError(f"{key}: no rounds to summarize")
        summary = RatioSummary(key, description, tuple(float(v) for v in values), target, counted)
        self.ratios[key] = summary
        return summary

    def to_json(self) -> dict[str, Any]:
        return {
            "benchmark": self.name,
            "command": self.command,
            "date": self.started_at.isoformat(timespec="seconds"),
            **self.source,
            "durationSeconds": round(time.monotonic() - self.started, 1),
            "machine": {
                "cpus": os.cpu_count(),
                "cpuModel": cpu_model(),
                "loadAverageBefore": self.load_before,
                "loadAverageAfter": load_average(),
            },
            "settings": self.settings,
            "ratios": {key: summary.to_json() for key, summary in self.ratios.items()},
            "rounds": self.rounds,
            **self.extra,
        }

    def write(self, directory: Path = RESULTS_DIR) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{self.name}.json"
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path
