"""The canary state machine: start, steps, analysis, promotion, rollback, pause, restarts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kubetune.common.clock import format_time
from kubetune.rollout.machine import RolloutDecision, plan_rollout
from kubetune.rollout.weights import proportional
from kubetune_contract.deployment import AnalysisRun, MetricResult, ModelDeploymentSpec, RolloutStatus

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def make_spec(
    weights: dict[str, int] | None = None,
    *,
    steps: list[dict[str, Any]] | None = None,
    metrics: list[dict[str, Any]] | None = None,
    auto_rollback: bool = True,
    interval: str = "1s",
    inconclusive_limit: int = 0,
) -> ModelDeploymentSpec:
    weights = weights or {"stable": 80, "canary": 20}
    metrics = [{"name": "errorRate", "max": "0.05"}] if metrics is None else metrics
    return ModelDeploymentSpec.model_validate(
        {
            "versions": [
                {"name": name, "model": {"uri": f"/models/{name}"}, "weight": weight}
                for name, weight in weights.items()
            ],
            "rollout": {
                "steps": steps or [{"weight": 10, "pause": "3s"}, {"weight": 50, "pause": "3s"}],
                "analysis": {
                    "skip": not metrics,
                    "interval": interval,
                    "window": "5s",
                    "metrics": metrics,
                    "inconclusiveLimit": inconclusive_limit,
                },
                "autoRollback": auto_rollback,
            },
        }
    )


def decide(
    spec: ModelDeploymentSpec,
    previous: RolloutStatus | None,
    now: datetime,
    *,
    first_sight: bool = False,
    spec_changed: bool = False,
    previous_weights: dict[str, int] | None = None,
    model_changed: bool = False,
    ready: bool = True,
    analysis: AnalysisRun | None = None,
) -> RolloutDecision:
    return plan_rollout(
        spec,
        previous,
        first_sight=first_sight,
        spec_changed=spec_changed,
        previous_weights={"stable": 100} if previous_weights is None else previous_weights,
        canary_model_changed=model_changed,
        canary_ready=ready,
        analysis=analysis,
        now=now,
    )


def run(at: datetime, *, error_rate: float | None) -> AnalysisRun:
    if error_rate is None:
        result = MetricResult(name="errorRate", value=None, max="0.05", passed=None)
        return AnalysisRun(
            time=format_time(at), passed=True, message="inconclusive: errorRate: no data", results=[result]
        )
    ok = error_rate <= 0.05
    result = MetricResult(name="errorRate", value=error_rate, max="0.05", passed=ok)
    return AnalysisRun(
        time=format_time(at),
        passed=ok,
        metric=None if ok else "errorRate",
        value=None if ok else error_rate,
        threshold=None if ok else "0.05",
        message=f"errorRate {error_rate} is above max 0.05"
        if not ok
        else f"within bounds: errorRate {error_rate}",
        results=[result],
    )


def started(spec: ModelDeploymentSpec) -> RolloutStatus:
    decision = decide(spec, None, T0)
    assert decision.rollout is not None and decision.rollout.state == "Progressing"
    return decision.rollout


def test_on_creation_the_spec_weights_apply_without_a_rollout() -> None:
    decision = decide(make_spec(), None, T0, first_sight=True, previous_weights={})
    assert decision.weights == {"stable": 80, "canary": 20}
    assert decision.rollout is not None
    assert (decision.rollout.state, decision.rollout.stable_weights) == (
        "Promoted",
        {"stable": 80, "canary": 20},
    )
    assert decision.events == [] and not decision.analysis_due


def test_no_rollout_spec_means_the_spec_weights_and_no_rollout_status() -> None:
    spec = ModelDeploymentSpec.model_validate(
        {"versions": [{"name": "a", "model": {"uri": "/m/a"}, "weight": 100}]}
    )
    decision = plan_rollout(
        spec,
        None,
        first_sight=False,
        spec_changed=False,
        previous_weights={},
        canary_model_changed=False,
        canary_ready=True,
        analysis=None,
        now=T0,
    )
    assert (decision.weights, decision.rollout) == ({"a": 100}, None)


def test_an_appended_version_starts_a_rollout_at_the_first_step() -> None:
    decision = decide(make_spec(), None, T0)
    assert decision.weights == {"stable": 90, "canary": 10}
    rollout = decision.rollout
    assert rollout is not None
    assert (rollout.canary, rollout.step, rollout.state) == ("canary", 0, "Progressing")
    assert rollout.stable_weights == {"stable": 100, "canary": 0}
    assert rollout.step_started_at == format_time(T0)
    assert [event.reason for event in decision.events] == ["RolloutStarted"]
    assert decision.requeue_after == pytest.approx(1.0)  # the first analysis, one interval on


def test_the_step_clock_waits_for_the_canary_to_be_ready() -> None:
    waiting = decide(make_spec(), None, T0, ready=False)
    assert waiting.rollout is not None and waiting.rollout.step_started_at is None
    assert "waiting for canary to be ready" in waiting.rollout.message
    later = decide(make_spec(), waiting.rollout, T0 + timedelta(seconds=30), ready=True)
    assert later.rollout is not None
    assert later.rollout.step_started_at == format_time(T0 + timedelta(seconds=30))
    assert later.rollout.step == 0


def test_analysis_is_due_every_interval_and_passing_ones_are_recorded() -> None:
    spec = make_spec()
    rollout = started(spec)
    early = decide(spec, rollout, T0 + timedelta(seconds=0.5))
    assert not early.analysis_due and early.requeue_after == pytest.approx(0.5)
    due_at = T0 + timedelta(seconds=1)
    due = decide(spec, rollout, due_at)
    assert due.analysis_due and due.weights == {"stable": 90, "canary": 10}
    done = decide(spec, rollout, due_at, analysis=run(due_at, error_rate=0.01))
    assert not done.analysis_due
    assert done.rollout is not None and done.rollout.last_analysis is not None
    assert done.rollout.last_analysis.passed and done.rollout.step == 0


def test_a_step_advances_after_its_pause_on_a_fresh_analysis() -> None:
    spec = make_spec()
    rollout = started(spec).model_copy(
        update={"last_analysis": run(T0 + timedelta(seconds=2.5), error_rate=0.0)}
    )
    end = T0 + timedelta(seconds=3)
    first = decide(spec, rollout, end)
    assert first.analysis_due and first.rollout is not None and first.rollout.step == 0
    advanced = decide(spec, rollout, end, analysis=run(end, error_rate=0.0))
    assert advanced.rollout is not None and advanced.rollout.step == 1
    assert advanced.weights == {"stable": 50, "canary": 50}
    assert advanced.rollout.step_started_at == format_time(end)
    assert [event.reason for event in advanced.events] == ["RolloutStepAdvanced"]


def test_after_the_last_step_the_canary_is_promoted_to_the_spec_weights() -> None:
    spec = make_spec()
    last = started(spec).model_copy(update={"step": 1, "step_started_at": format_time(T0)})
    end = T0 + timedelta(seconds=3)
    promoted = decide(spec, last, end, analysis=run(end, error_rate=0.0))
    assert promoted.weights == {"stable": 80, "canary": 20}
    assert promoted.rollout is not None
    assert (promoted.rollout.state, promoted.rollout.step) == ("Promoted", 2)
    assert promoted.rollout.stable_weights == {"stable": 80, "canary": 20}
    assert [event.reason for event in promoted.events] == ["RolloutPromoted"]
    steady = decide(spec, promoted.rollout, end + timedelta(minutes=5))
    assert steady.weights == {"stable": 80, "canary": 20} and steady.events == []
    assert steady.rollout is not None and steady.rollout.state == "Promoted"


def test_without_metrics_steps_advance_on_time_alone() -> None:
    spec = make_spec(metrics=[])
    rollout = started(spec)
    midway = decide(spec, rollout, T0 + timedelta(seconds=2))
    assert not midway.analysis_due and midway.requeue_after == pytest.approx(1.0)
    assert midway.rollout is not None and midway.rollout.step == 0
    moved = decide(spec, rollout, T0 + timedelta(seconds=3))
    assert not moved.analysis_due and moved.rollout is not None and moved.rollout.step == 1


def test_a_failing_analysis_rolls_the_canary_back_naming_metric_value_and_threshold() -> None:
    spec = make_spec()
    rollout = started(spec)
    at = T0 + timedelta(seconds=1)
    decision = decide(spec, rollout, at, analysis=run(at, error_rate=0.5))
    assert decision.weights == {"stable": 100, "canary": 0}
    result = decision.rollout
    assert result is not None and result.state == "RolledBack"
    assert result.last_analysis is not None
    assert (result.last_analysis.metric, result.last_analysis.value, result.last_analysis.threshold) == (
        "errorRate",
        0.5,
        "0.05",
    )
    assert "errorRate 0.5 is above max 0.05" in result.message and "rolled back" in result.message
    assert [(event.type, event.reason) for event in decision.events] == [("Warning", "RolledBack")]
    # It stays rolled back, with no more analyses, until the spec changes.
    later = decide(spec, result, at + timedelta(minutes=10))
    assert later.weights == {"stable": 100, "canary": 0} and not later.analysis_due
    assert later.rollout == result and later.events == []
    retried = decide(spec, result, at + timedelta(minutes=11), spec_changed=True)
    assert retried.rollout is not None and (retried.rollout.state, retried.rollout.step) == ("Progressing", 0)
    assert retried.weights == {"stable": 90, "canary": 10}


def test_rollback_restores_the_other_versions_stable_weights() -> None:
    spec = make_spec({"a": 60, "b": 30, "canary": 10})
    rollout = decide(spec, None, T0, previous_weights={"a": 75, "b": 25}).rollout
    assert rollout is not None
    at = T0 + timedelta(seconds=1)
    decision = decide(spec, rollout, at, analysis=run(at, error_rate=0.9))
    assert decision.weights == {"a": 75, "b": 25, "canary": 0}


def test_without_auto_rollback_a_failing_analysis_pauses_and_holds_the_weights() -> None:
    spec = make_spec(auto_rollback=False)
    rollout = started(spec)
    at = T0 + timedelta(seconds=1)
    paused = decide(spec, rollout, at, analysis=run(at, error_rate=0.2))
    assert paused.rollout is not None and paused.rollout.state == "Paused"
    assert paused.weights == {"stable": 90, "canary": 10}
    assert [(event.type, event.reason) for event in paused.events] == [("Warning", "RolloutPaused")]
    held = decide(spec, paused.rollout, at + timedelta(minutes=5))
    assert held.weights == {"stable": 90, "canary": 10} and held.rollout == paused.rollout
    resumed = decide(spec, paused.rollout, at + timedelta(minutes=6), spec_changed=True)
    assert resumed.rollout is not None and (resumed.rollout.state, resumed.rollout.step) == ("Progressing", 0)
    assert [event.reason for event in resumed.events] == ["RolloutResumed"]


def test_an_inconclusive_analysis_within_the_limit_never_fails_a_step() -> None:
    spec = make_spec(inconclusive_limit=1)
    rollout = started(spec)
    end = T0 + timedelta(seconds=3)
    decision = decide(spec, rollout, end, analysis=run(end, error_rate=None))
    assert decision.rollout is not None and decision.rollout.step == 1
    assert decision.rollout.last_analysis is not None
    assert decision.rollout.last_analysis.results[0].passed is None


def test_with_a_zero_limit_the_first_inconclusive_analysis_pauses_and_says_why() -> None:
    spec = make_spec()
    rollout = started(spec)
    at = T0 + timedelta(seconds=1)
    paused = decide(spec, rollout, at, analysis=run(at, error_rate=None))
    assert paused.rollout is not None
    assert (paused.rollout.state, paused.rollout.reason, paused.rollout.step) == (
        "Paused",
        "AnalysisInconclusive",
        0,
    )
    assert paused.weights == {"stable": 90, "canary": 10}  # the step's weights are held
    assert "more than analysis.inconclusiveLimit (0)" in paused.rollout.message
    assert "errorRate: no data" in paused.rollout.message
    assert [(event.type, event.reason) for event in paused.events] == [("Warning", "AnalysisInconclusive")]
    held = decide(spec, paused.rollout, at + timedelta(minutes=5))
    assert held.rollout == paused.rollout and held.weights == {"stable": 90, "canary": 10}
    assert not held.analysis_due


def analyse_every_second(spec: ModelDeploymentSpec, error_rates: list[float | None]) -> list[RolloutStatus]:
    """Feed one analysis a second from T0 + 1s; the rollout status after each."""
    rollout = started(spec)
    seen = []
    for second, error_rate in enumerate(error_rates, start=1):
        at = T0 + timedelta(seconds=second)
        decision = decide(spec, rollout, at, analysis=run(at, error_rate=error_rate))
        assert decision.rollout is not None
        rollout = decision.rollout
        seen.append(rollout)
    return seen


def test_a_limit_of_two_tolerates_two_inconclusive_analyses_in_a_row_and_pauses_on_the_third() -> None:
    spec = make_spec(steps=[{"weight": 10, "pause": "1m"}], inconclusive_limit=2)
    seen = analyse_every_second(spec, [None, None, None])
    assert [(s.state, s.inconclusive_analyses) for s in seen] == [
        ("Progressing", 1),
        ("Progressing", 2),
        ("Paused", 3),
    ]
    assert seen[-1].reason == "AnalysisInconclusive"
    assert "3 inconclusive analyses in a row, more than analysis.inconclusiveLimit (2)" in seen[-1].message


def test_a_conclusive_pass_resets_the_inconclusive_count() -> None:
    spec = make_spec(steps=[{"weight": 10, "pause": "1m"}], inconclusive_limit=2)
    seen = analyse_every_second(spec, [None, None, 0.01, None, None])
    assert [s.inconclusive_analyses for s in seen] == [1, 2, 0, 1, 2]
    assert {s.state for s in seen} == {"Progressing"}


def test_editing_the_spec_resumes_an_inconclusive_pause_with_a_fresh_count() -> None:
    spec = make_spec()
    rollout = started(spec)
    at = T0 + timedelta(seconds=1)
    paused = decide(spec, rollout, at, analysis=run(at, error_rate=None)).rollout
    assert paused is not None and paused.state == "Paused"
    resumed = decide(spec, paused, at + timedelta(seconds=1), spec_changed=True)
    assert resumed.rollout is not None
    assert (resumed.rollout.state, resumed.rollout.reason, resumed.rollout.inconclusive_analyses) == (
        "Progressing",
        None,
        0,
    )
    assert [event.reason for event in resumed.events] == ["RolloutResumed"]


def test_a_rollout_that_skips_analysis_is_promoted_on_timing_alone() -> None:
    spec = make_spec(metrics=[])
    assert spec.rollout is not None and spec.rollout.analysis.skip
    rollout = started(spec)
    states = []
    for second in range(1, 8):
        decision = decide(spec, rollout, T0 + timedelta(seconds=second))
        assert not decision.analysis_due
        assert decision.rollout is not None
        rollout = decision.rollout
        states.append((rollout.state, rollout.step))
    assert states[-1] == ("Promoted", 2)
    assert ("Progressing", 1) in states
    assert rollout.last_analysis is None


def test_a_new_model_for_the_promoted_canary_rolls_it_out_again() -> None:
    spec = make_spec()
    promoted = RolloutStatus(
        canary="canary", step=2, state="Promoted", stable_weights={"stable": 80, "canary": 20}
    )
    unchanged = decide(spec, promoted, T0)
    assert unchanged.rollout is not None and unchanged.rollout.state == "Promoted"
    restarted = decide(spec, promoted, T0, model_changed=True)
    assert restarted.rollout is not None and (restarted.rollout.state, restarted.rollout.step) == (
        "Progressing",
        0,
    )
    assert restarted.weights == {"stable": 90, "canary": 10}
    assert "model changed" in restarted.events[0].message


def test_a_version_appended_mid_rollout_becomes_the_canary_from_the_stable_weights() -> None:
    first = make_spec()
    rollout = started(first).model_copy(update={"step": 1})
    second = make_spec({"stable": 70, "canary": 20, "newer": 10})
    decision = decide(second, rollout, T0 + timedelta(seconds=1), spec_changed=True)
    assert decision.rollout is not None
    assert (decision.rollout.canary, decision.rollout.step) == ("newer", 0)
    # the stable weights are those from before the first rollout: the old canary had no traffic yet
    assert decision.weights == {"stable": 90, "canary": 0, "newer": 10}


def test_removing_the_canary_stops_its_rollout() -> None:
    spec = make_spec({"stable": 80, "canary": 20})
    rollout = started(spec)
    shrunk = ModelDeploymentSpec.model_validate(
        {
            "versions": [
                {"name": "old", "model": {"uri": "/m/old"}, "weight": 50},
                {"name": "stable", "model": {"uri": "/m/stable"}, "weight": 50},
            ],
            "rollout": {"steps": [{"weight": 10, "pause": "3s"}], "analysis": {"skip": True}},
        }
    )
    decision = decide(shrunk, rollout, T0 + timedelta(seconds=1), spec_changed=True)
    assert decision.weights == {"old": 50, "stable": 50}
    assert decision.rollout is not None and decision.rollout.state == "Promoted"
    assert [event.reason for event in decision.events] == ["RolloutCancelled"]


def test_a_canary_with_no_stable_version_to_hand_over_from_applies_at_once() -> None:
    decision = decide(
        make_spec(), None, T0, previous_weights={"stable": 0, "canary": 100}, model_changed=True
    )
    assert decision.weights == {"stable": 80, "canary": 20}
    assert decision.rollout is not None and decision.rollout.state == "Promoted"
    assert [(event.type, event.reason) for event in decision.events] == [("Warning", "NoStableVersion")]


@pytest.mark.parametrize(
    ("total", "shares", "expected"),
    [
        (90, {"a": 60, "b": 40}, {"a": 54, "b": 36}),
        (100, {"a": 1, "b": 1, "c": 1}, {"a": 34, "b": 33, "c": 33}),
        (90, {"a": 50, "b": 30, "c": 20}, {"a": 45, "b": 27, "c": 18}),
        (95, {"a": 1, "b": 2}, {"a": 32, "b": 63}),
        (50, {"a": 0, "b": 7}, {"a": 0, "b": 50}),
        (0, {"a": 3}, {"a": 0}),
    ],
)
def test_proportional_split_sums_exactly(
    total: int, shares: dict[str, int], expected: dict[str, int]
) -> None:
    split = proportional(total, shares)
    assert split == expected and sum(split.values()) == total


def test_proportional_split_refuses_all_zero_or_negative_shares() -> None:
    with pytest.raises(ValueError, match="every share is 0"):
        proportional(10, {"a": 0})
    with pytest.raises(ValueError, match="must not be negative"):
        proportional(10, {"a": -1, "b": 2})


def test_canary_steps_split_the_rest_in_proportion_to_the_stable_weights() -> None:
    spec = make_spec({"a": 50, "b": 30, "canary": 20})
    decision = decide(spec, None, T0, previous_weights={"a": 60, "b": 40})
    assert decision.weights == {"a": 54, "b": 36, "canary": 10}


def test_resuming_a_paused_rollout_after_its_steps_were_shortened_resumes_at_the_last_step() -> None:
    spec = make_spec(
        steps=[{"weight": 10, "pause": "3s"}, {"weight": 30, "pause": "3s"}, {"weight": 60, "pause": "3s"}],
        auto_rollback=False,
    )
    at_third = started(spec).model_copy(update={"step": 2, "step_started_at": format_time(T0)})
    at = T0 + timedelta(seconds=1)
    paused = decide(spec, at_third, at, analysis=run(at, error_rate=0.5)).rollout
    assert paused is not None and (paused.state, paused.step) == ("Paused", 2)
    shorter = make_spec(steps=[{"weight": 10, "pause": "3s"}, {"weight": 30, "pause": "3s"}])
    resumed = decide(shorter, paused, at + timedelta(minutes=1), spec_changed=True)
    assert resumed.rollout is not None and (resumed.rollout.state, resumed.rollout.step) == ("Progressing", 1)
    assert resumed.weights == {"stable": 70, "canary": 30}
    assert "step 2/2" in resumed.events[0].message


def test_a_canary_that_stops_answering_mid_step_holds_the_step_and_restarts_its_clock() -> None:
    spec = make_spec()
    rollout = started(spec)
    # The pause is over, but the canary's server went away: no advance on an analysis of no traffic.
    end = T0 + timedelta(seconds=3)
    gone = decide(spec, rollout, end, ready=False)
    assert not gone.analysis_due
    assert gone.rollout is not None and (gone.rollout.state, gone.rollout.step) == ("Progressing", 0)
    assert gone.rollout.step_started_at is None
    assert "waiting for canary to be ready" in gone.rollout.message
    assert gone.weights == {"stable": 90, "canary": 10} and gone.events == []
    # Back: the step's pause is served again in full by a canary that answers.
    back_at = end + timedelta(seconds=10)
    back = decide(spec, gone.rollout, back_at, ready=True)
    assert back.rollout is not None and back.rollout.step == 0
    assert back.rollout.step_started_at == format_time(back_at)
    # Not on the last step either: an unready canary is never promoted.
    last = rollout.model_copy(update={"step": 1})
    held = decide(spec, last, end + timedelta(minutes=5), ready=False)
    assert held.rollout is not None and held.rollout.state == "Progressing"
    assert held.weights == {"stable": 50, "canary": 50}


def test_a_stable_version_renamed_mid_rollout_takes_the_stable_share() -> None:
    spec = make_spec()
    rollout = started(spec)
    renamed = make_spec({"stable-v2": 80, "canary": 20})
    during = decide(renamed, rollout, T0 + timedelta(seconds=0.5), spec_changed=True)
    assert during.weights == {"stable-v2": 90, "canary": 10}
    at = T0 + timedelta(seconds=1)
    assert during.rollout is not None
    rolled = decide(renamed, during.rollout, at, analysis=run(at, error_rate=0.5))
    assert rolled.rollout is not None and rolled.rollout.state == "RolledBack"
    assert rolled.weights == {"stable-v2": 100, "canary": 0}
