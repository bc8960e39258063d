"""The experiments' statistics, against values computed independently (tables and numpy)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from kubetune.gateway.config import GatewayConfig
from kubetune.gateway.experiments import (
    ExperimentTracker,
    RunningMoments,
    percentile,
    regularized_incomplete_beta,
    student_t_two_sided_p,
    two_proportion_z_test,
    welch_t_test,
)


@pytest.mark.parametrize(
    ("t", "df", "expected"),
    [
        (1.0, 1.0, 0.5),  # Cauchy: P(|T| > 1) = 1/2 exactly
        (2.228138852, 10.0, 0.05),  # the familiar two-sided 5% critical value for 10 df
        (2.0, 10.0, 0.07338803),
        (3.0, 5.0, 0.03009925),
        (0.0, 7.0, 1.0),
        (1.959963985, 1e7, 0.05),  # large df: the normal distribution
    ],
)
def test_student_t_two_sided_p_values(t: float, df: float, expected: float) -> None:
    assert student_t_two_sided_p(t, df) == pytest.approx(expected, rel=1e-5, abs=1e-9)
    assert student_t_two_sided_p(-t, df) == pytest.approx(expected, rel=1e-5, abs=1e-9)


def test_incomplete_beta_matches_closed_forms() -> None:
    # I_x(a, 1) = x^a and I_x(1, b) = 1 - (1 - x)^b.
    for x in (0.01, 0.3, 0.5, 0.77, 0.99):
        assert regularized_incomplete_beta(2.5, 1.0, x) == pytest.approx(x**2.5, rel=1e-10)
        assert regularized_incomplete_beta(1.0, 3.5, x) == pytest.approx(1 - (1 - x) ** 3.5, rel=1e-10)
    assert regularized_incomplete_beta(2.0, 3.0, 0.0) == 0.0
    assert regularized_incomplete_beta(2.0, 3.0, 1.0) == 1.0


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
    assert result["pValue"] == pytest.approx(student_t_two_sided_p(float(t), float(df)))
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
        tracker.record_feedback("a", score)
    report = tracker.report(config)
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
