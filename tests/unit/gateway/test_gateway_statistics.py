"""The experiments' statistics, against values computed independently (tables, numpy and scipy on the
raw samples)."""

from __future__ import annotations

import asyncio
import math
import random

import numpy as np
import pytest
from scipy import stats

from kubetune.gateway.config import GatewayConfig
from kubetune.gateway.experiments import (
    ExperimentTracker,
    RunningMoments,
    percentile,
    two_proportion_z_test,
    welch_t_test,
)


@pytest.mark.parametrize(
    ("treatment", "control"),
    [
        ([0.9, 0.8, 1.0, 0.7, 0.95], [0.5, 0.6, 0.4, 0.55]),
        ([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0]),
        ([0.3, 0.31], [0.3, 0.29, 0.32, 0.28]),
    ],
)
def test_welch_t_test_matches_scipy_on_the_raw_samples(treatment: list[float], control: list[float]) -> None:
    result = welch_t_test(moments(treatment), moments(control))
    reference = stats.ttest_ind(treatment, control, equal_var=False)
    assert result["t"] == pytest.approx(float(reference.statistic))
    assert result["degreesOfFreedom"] == pytest.approx(float(reference.df))
    assert result["pValue"] == pytest.approx(float(reference.pvalue))


def test_welch_t_test_p_value_of_a_known_case() -> None:
    # two samples of 2 with variance 2 each and means 1 apart: t = 1/sqrt(2) on 2 degrees of freedom
    result = welch_t_test(moments([0.0, 2.0]), moments([-1.0, 1.0]))
    assert result["t"] == pytest.approx(0.7071067811865476)
    assert result["degreesOfFreedom"] == pytest.approx(2.0)
    # for 2 degrees of freedom P(|T| >= t) = 1 - t / sqrt(t^2 + 2) in closed form: 1 - 1/sqrt(5) here
    assert result["pValue"] == pytest.approx(1 - 1 / math.sqrt(5), rel=1e-9)


def moments(values: list[float]) -> RunningMoments:
    result = RunningMoments()
    for value in values:
        result.add(value)
    return result


def test_running_moments_match_numpy() -> None:
    values = [random.Random(3).random() for _ in range(101)]
    result = moments(values)
    assert result.count == 101
    assert result.mean == pytest.approx(float(np.mean(values)))
    assert result.variance == pytest.approx(float(np.var(values, ddof=1)))


def test_welch_t_test_matches_the_textbook_formula() -> None:
    rng = random.Random(11)
    treatment = [min(1.0, max(0.0, rng.gauss(0.75, 0.2))) for _ in range(40)]
    control = [min(1.0, max(0.0, rng.gauss(0.55, 0.1))) for _ in range(25)]
    v1, v2 = np.var(treatment, ddof=1) / 40, np.var(control, ddof=1) / 25
    t = (np.mean(treatment) - np.mean(control)) / math.sqrt(v1 + v2)
    df = (v1 + v2) ** 2 / (v1**2 / 39 + v2**2 / 24)
    result = welch_t_test(moments(treatment), moments(control))
    assert result["t"] == pytest.approx(float(t))
    assert result["degreesOfFreedom"] == pytest.approx(float(df))
    assert result["pValue"] == pytest.approx(float(2 * stats.t.sf(abs(t), df)))
    assert result["difference"] == pytest.approx(float(np.mean(treatment) - np.mean(control)))
    assert 0.0 < result["pValue"] < 0.05


def test_welch_t_test_degenerate_cases_say_why() -> None:
    assert welch_t_test(moments([1.0]), moments([0.0, 1.0]))["note"] == (
        "needs at least 2 feedback scores for each version"
    )
    same = welch_t_test(moments([1.0, 1.0]), moments([1.0, 1.0, 1.0]))
    assert same["pValue"] == 1.0
    different = welch_t_test(moments([1.0, 1.0]), moments([0.0, 0.0]))
    assert different["pValue"] is None and "undefined" in different["note"]


def test_two_proportion_z_test() -> None:
    result = two_proportion_z_test(10, 100, 20, 100)
    pooled = 0.15
    z = (0.1 - 0.2) / math.sqrt(pooled * (1 - pooled) * (2 / 100))
    assert result["z"] == pytest.approx(z)
    assert result["pValue"] == pytest.approx(0.0477, abs=1e-4)  # 2 * (1 - Phi(1.980)), from a normal table
    assert result["difference"] == pytest.approx(-0.1)
    assert two_proportion_z_test(0, 50, 0, 70)["pValue"] == 1.0
    assert two_proportion_z_test(1, 0, 0, 70)["note"] == "needs at least 1 request for each version"


def test_percentile_interpolates_like_numpy() -> None:
    values = [random.Random(5).expovariate(1.0) for _ in range(37)]
    for fraction in (0.0, 0.5, 0.95, 1.0):
        assert percentile(values, fraction) == pytest.approx(float(np.percentile(values, fraction * 100)))
    assert percentile([], 0.5) is None


def test_tracker_report_compares_every_version_with_the_control() -> None:
    config = GatewayConfig.model_validate(
        {
            "deployment": "d",
            "versions": [
                {"name": "a", "url": "http://x:1", "weight": 50},
                {"name": "b", "url": "http://x:2", "weight": 50},
            ],
            "control": "b",
        }
    )
    tracker = ExperimentTracker()
    for index in range(10):
        tracker.record_request("a", 0.1 * (index + 1), error=index < 2)
        tracker.record_request("b", 0.2, error=False)
    for score in (1.0, 0.0, 1.0):
        asyncio.run(tracker.record_feedback("a", score))
    report = asyncio.run(tracker.report(config))
    assert report["control"] == "b"
    a, b = report["versions"]
    assert (a["requests"], a["errors"], a["errorRate"]) == (10, 2, 0.2)
    assert a["latencyP50Seconds"] == pytest.approx(0.55)
    assert a["latencyP95Seconds"] == pytest.approx(0.955)
    assert a["meanFeedback"] == pytest.approx(2 / 3) and a["feedbackCount"] == 3
    assert a["comparison"]["against"] == "b"
    assert a["comparison"]["errorRate"]["pValue"] == pytest.approx(
        two_proportion_z_test(2, 10, 0, 10)["pValue"]
    )
    assert a["comparison"]["feedback"]["note"] == "needs at least 2 feedback scores for each version"
    assert b["comparison"] is None and b["meanFeedback"] is None and b["feedbackCount"] == 0
