"""README's Benchmarks and Methods figures are those of the committed result files, and nothing else.

scripts/gen_docs.py renders the `benchmarks` and `quantize-methods` sections from
benchmarks/results/*.json (each written by a benchmark run through benchmarks/_results.py); these tests
fail when README.md shows figures its result files do not hold.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from readme_sections import README, REPO, gen_docs, section

RESULTS = REPO / "benchmarks" / "results"
FIGURE_SECTIONS = ("benchmarks", "quantize-methods")


def result_files() -> list[Path]:
    return sorted(RESULTS.glob("*.json"))


def test_readme_figures_are_rendered_from_the_result_files() -> None:
    stale = [name for name in gen_docs.stale_sections(README) if name in FIGURE_SECTIONS]
    assert stale == [], (
        "README's figures disagree with benchmarks/results/*.json: run python scripts/gen_docs.py"
    )


def test_every_result_file_is_shown_with_its_run() -> None:
    files = result_files()
    assert {path.stem for path in files} >= {"finetune-overhead", "gateway", "quantize"}
    shown = section("benchmarks") + section("quantize-methods")
    for path in files:
        result = json.loads(path.read_text())
        assert f"`benchmarks/results/{path.name}`" in shown
        assert f"commit `{result['commit'][:10]}`" in shown
        for ratio in result["ratios"].values():
            if not ratio.get("counted"):  # a count on a fixed labelled set is the same every round
                rounds = len(ratio["rounds"])
                assert rounds >= 5, f"{path.name}: {ratio['description']} has fewer than 5 rounds"


def test_every_claimed_ratio_shows_its_median_spread_and_verdicts() -> None:
    shown = section("benchmarks")
    for path in result_files():
        if path.stem == "quantize":
            continue
        for ratio in json.loads(path.read_text())["ratios"].values():
            assert f"{ratio['median']:.3f} | {ratio['min']:.3f}..{ratio['max']:.3f}" in shown


def test_the_quantize_table_is_of_a_model_far_better_than_unigram() -> None:
    model = json.loads((RESULTS / "quantize.json").read_text())["model"]
    assert model["heldOutPerplexity"] < model["unigramPerplexity"] / 4
    assert f"**{model['heldOutPerplexity']:.2f}**" in section("quantize-methods")


@pytest.mark.parametrize("name", ["finetune-overhead", "gateway", "quantize"])
def test_a_figure_changed_in_a_result_file_makes_readme_stale(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for path in result_files():
        shutil.copy(path, tmp_path / path.name)
    changed = tmp_path / f"{name}.json"
    result = json.loads(changed.read_text())
    if name == "quantize":
        result["methods"][-1]["perplexity"] += 1.0
    else:
        first = next(iter(result["ratios"].values()))
        first["median"] += 0.1
    changed.write_text(json.dumps(result))
    monkeypatch.setattr(gen_docs, "RESULTS_DIR", tmp_path)
    stale = gen_docs.stale_sections(README)
    assert ("quantize-methods" if name == "quantize" else "benchmarks") in stale
