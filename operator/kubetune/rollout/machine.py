"""The canary state machine of a ModelDeployment: spec + last status + observations -> decision. Pure.

The canary is the last entry of ``spec.versions`` when ``spec.rollout`` is set. A rollout begins when
the canary takes no part in the stable weights (a version was appended, or given traffic for the
first time) or when the model it serves changed; never on creation, where the spec weights apply at
once::

    Progressing(step i) --pause over, analysis passed--> Progressing(i + 1) ... --> Promoted
    Progressing --analysis failed--> RolledBack (autoRollback: canary at 0%) | Paused (weights held)
    Progressing --more inconclusive analyses in a row than inconclusiveLimit--> Paused (weights held)
    RolledBack --spec changed--> Progressing from step 0      Paused --spec changed--> same step again

During step i the canary gets ``steps[i].weight`` percent and the other versions share the rest in
proportion to their stable weights. A step's clock starts once the canary is ready, and starts again
if the canary stops answering during the step. The canary's metrics are analysed every interval and
once more when the step's pause is over, so a step only advances on an analysis that covers its end.
An inconclusive analysis (no data, Prometheus not reachable or not configured) is no failure, but no
pass either: past ``analysis.inconclusiveLimit`` of them in a row the rollout pauses, so a canary is
never promoted unchecked. With ``analysis.skip`` there are no metrics and steps advance on time alone.

:func:`plan_rollout` reads the previous state and hands over to one of the named steps below: begin,
settle, hold, advance, promote, roll back, pause, resume.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from kubetune.common.clock import format_time, parse_time
from kubetune.common.events import Event
from kubetune.rollout.weights import format_weights, proportional
from kubetune_contract.deployment import (
    AnalysisRun,
    CanaryStep,
    ModelDeploymentSpec,
    Rollout,
    RolloutStatus,
    duration_seconds,
)


@dataclass(frozen=True)
class RolloutDecision:
    """What the machine decided for this pass.

    ``weights``: the planned weights of every spec version (sum 100), before the controller moves the
    share of versions that are not ready. ``analysis_due``: run the canary's analysis now and decide
    again with it. ``requeue_after``: seconds until the machine next has something to do (None: only
    when something changes).
    """

    weights: dict[str, int]
    rollout: RolloutStatus | None
    analysis_due: bool = False
    requeue_after: float | None = None
    events: list[Event] = field(default_factory=list)


@dataclass(frozen=True)
class _Pass:
    """The fixed inputs of one decision: the spec's rollout, its canary and what was observed."""

    spec_weights: dict[str, int]
    rollout: Rollout
    canary_ready: bool
    analysis: AnalysisRun | None
    now: datetime

    @property
    def canary(self) -> str:
        return list(self.spec_weights)[-1]

    @property
    def steps(self) -> list[CanaryStep]:
        return self.rollout.steps

    @property
    def total_steps(self) -> int:
        return len(self.rollout.steps)

    @property
    def analysed(self) -> bool:
        return bool(self.rollout.analysis.metrics)

    @property
    def interval(self) -> float:
        return duration_seconds(self.rollout.analysis.interval)

    def step_weights(self, stable: Mapping[str, int], canary_weight: int) -> dict[str, int]:
        """The canary at ``canary_weight``; the others share the rest as in ``stable``."""
        others = {name: stable.get(name, 0) for name in self.spec_weights if name != self.canary}
        if sum(others.values()) == 0:
            # The stable versions were renamed or removed under the rollout: the spec's others hold.
            others = {name: weight for name, weight in self.spec_weights.items() if name != self.canary}
        if sum(others.values()) == 0:
            return dict(self.spec_weights)
        split = proportional(100 - canary_weight, others)
        return {name: canary_weight if name == self.canary else split[name] for name in self.spec_weights}

    def at_step(self, status: RolloutStatus) -> dict[str, int]:
        return self.step_weights(status.stable_weights, self.steps[status.step].weight)

    def where(self, status: RolloutStatus) -> str:
        return (
            f"step {status.step + 1}/{self.total_steps}, {self.canary} at {self.steps[status.step].weight}%"
        )


def _takes_part(stable: Mapping[str, int], version: str) -> bool:
    return stable.get(version, 0) > 0


# -- the named steps ---------------------------------------------------------------------------------


def _settle(
    run: _Pass, previous: RolloutStatus | None, message: str, events: list[Event] | None = None
) -> RolloutDecision:
    """The spec weights apply: the canary is promoted, or was never rolled out."""
    kept = previous.last_analysis if previous is not None and previous.canary == run.canary else None
    status = RolloutStatus(
        canary=run.canary,
        step=run.total_steps,
        state="Promoted",
        stable_weights=dict(run.spec_weights),
        last_analysis=kept,
        message=message,
    )
    return RolloutDecision(weights=dict(run.spec_weights), rollout=status, events=events or [])


def _steady(run: _Pass, previous: RolloutStatus | None) -> RolloutDecision:
    if previous is not None and previous.state == "Promoted" and previous.canary == run.canary:
        return _settle(run, previous, previous.message)
    return _settle(run, previous, f"{run.canary} is part of the stable weights; the spec weights apply")


def _begin(
    run: _Pass, previous: RolloutStatus | None, stable: Mapping[str, int], why: str
) -> RolloutDecision:
    """Start at step 0 from ``stable``, unless there is nothing to roll out or nobody to hand over from."""
    canary = run.canary
    if run.spec_weights[canary] == 0:
        return _settle(run, previous, f"{canary} has weight 0 in the spec, so there is nothing to roll out")
    baseline = {name: stable.get(name, 0) for name in run.spec_weights}
    if not any(weight for name, weight in baseline.items() if name != canary):
        message = f"no version but {canary} had traffic before, so the spec weights apply without a rollout"
        return _settle(run, previous, message, [Event("Warning", "NoStableVersion", message)])
    plan = ", ".join(f"{step.weight}% for {step.pause}" for step in run.steps)
    status = RolloutStatus(
        canary=canary,
        step=0,
        state="Progressing",
        stable_weights=baseline,
        message=f"{why}: {plan}, then the spec weights",
    )
    return _progress(
        run, status, [Event("Normal", "RolloutStarted", f"rolling out {canary} ({why}): {plan}")]
    )


def _roll_back(
    run: _Pass, status: RolloutStatus, failed: AnalysisRun, events: list[Event]
) -> RolloutDecision:
    """A failed analysis with autoRollback: the canary goes to 0%, the stable weights come back."""
    weights = run.step_weights(status.stable_weights, 0)
    message = (
        f"{run.canary} rolled back at step {status.step + 1}/{run.total_steps}: {failed.message}; "
        "edit the spec to try again"
    )
    rolled = status.model_copy(update={"state": "RolledBack", "reason": "AnalysisFailed", "message": message})
    event = Event(
        "Warning",
        "RolledBack",
        f"{run.canary} rolled back to 0% ({format_weights(weights)}): {failed.message}",
    )
    return RolloutDecision(weights=weights, rollout=rolled, events=[*events, event])


def _pause(
    run: _Pass, status: RolloutStatus, why: str, *, inconclusive: bool, events: list[Event]
) -> RolloutDecision:
    """Hold the step's weights until a person edits the spec."""
    message = (
        f"{run.canary} paused at step {status.step + 1}/{run.total_steps}, weights held: {why}; "
        "edit the spec to resume"
    )
    reason = "AnalysisInconclusive" if inconclusive else "AnalysisFailed"
    paused = status.model_copy(update={"state": "Paused", "reason": reason, "message": message})
    event = Event("Warning", "AnalysisInconclusive" if inconclusive else "RolloutPaused", message)
    return RolloutDecision(weights=run.at_step(status), rollout=paused, events=[*events, event])


def _record(status: RolloutStatus, analysis: AnalysisRun) -> RolloutStatus:
    """Keep this pass's analysis; count it if inconclusive, else the count starts again."""
    count = status.inconclusive_analyses + 1 if analysis.inconclusive else 0
    return status.model_copy(update={"last_analysis": analysis, "inconclusive_analyses": count})


def _judge(run: _Pass, status: RolloutStatus, events: list[Event]) -> RolloutDecision | None:
    """The step ends here when its recorded analysis failed or was one inconclusive too many."""
    analysis = status.last_analysis
    assert analysis is not None  # recorded by _record
    if not analysis.passed:
        if run.rollout.auto_rollback:
            return _roll_back(run, status, analysis, events)
        return _pause(run, status, analysis.message, inconclusive=False, events=events)
    limit = run.rollout.analysis.inconclusive_limit
    count = status.inconclusive_analyses
    if count > limit:
        in_a_row = f"{count} inconclusive analyses in a row" if count > 1 else "an inconclusive analysis"
        why = f"{in_a_row}, more than analysis.inconclusiveLimit ({limit}): {analysis.message}"
        return _pause(run, status, why, inconclusive=True, events=events)
    return None


def _promote(run: _Pass, status: RolloutStatus, events: list[Event]) -> RolloutDecision:
    message = f"{run.canary} promoted after {run.total_steps} steps; the spec weights apply"
    promoted = status.model_copy(
        update={
            "step": run.total_steps,
            "state": "Promoted",
            "stable_weights": dict(run.spec_weights),
            "message": message,
        }
    )
    return RolloutDecision(
        weights=dict(run.spec_weights),
        rollout=promoted,
        events=[*events, Event("Normal", "RolloutPromoted", message)],
    )


def _advance(run: _Pass, status: RolloutStatus, events: list[Event]) -> RolloutDecision:
    """The step's pause is over: on to the next step, or promote after the last."""
    if status.step + 1 == run.total_steps:
        return _promote(run, status, events)
    following = status.step + 1
    weight = run.steps[following].weight
    moved = status.model_copy(
        update={
            "step": following,
            "step_started_at": format_time(run.now),
            "message": f"step {following + 1}/{run.total_steps}, {run.canary} at {weight}%",
        }
    )
    event = Event(
        "Normal", "RolloutStepAdvanced", f"{run.canary} at {weight}% (step {following + 1}/{run.total_steps})"
    )
    waits = [duration_seconds(run.steps[following].pause), *([run.interval] if run.analysed else [])]
    return RolloutDecision(
        weights=run.at_step(moved), rollout=moved, events=[*events, event], requeue_after=min(waits)
    )


def _hold(run: _Pass, status: RolloutStatus, events: list[Event], *, wait_s: float) -> RolloutDecision:
    """Stay in the step; look again in ``wait_s`` seconds."""
    step = run.steps[status.step]
    last = status.last_analysis
    detail = f"; last analysis: {last.message}" if last is not None and last.message else ""
    held = status.model_copy(update={"message": f"{run.where(status)} for {step.pause}{detail}"})
    return RolloutDecision(
        weights=run.at_step(status), rollout=held, events=events, requeue_after=max(0.0, wait_s)
    )


def _progress(run: _Pass, status: RolloutStatus, events: list[Event]) -> RolloutDecision:
    """One pass within a step: wait for the canary, judge an analysis, ask for one, or move on."""
    step = run.steps[status.step]
    if not run.canary_ready:
        # Also mid-step: a canary that stopped answering gets no traffic and its analysis no data,
        # so the step's pause starts again once it answers rather than passing unobserved.
        message = f"{run.where(status)}: waiting for {run.canary} to be ready"
        waiting = status.model_copy(update={"step_started_at": None, "message": message})
        return RolloutDecision(weights=run.at_step(status), rollout=waiting, events=events)
    if status.step_started_at is None:
        status = status.model_copy(update={"step_started_at": format_time(run.now)})
    started_at = parse_time(str(status.step_started_at))
    if run.analysis is not None:
        status = _record(status, run.analysis)
        ended = _judge(run, status, events)
        if ended is not None:
            return ended
    pause = duration_seconds(step.pause)
    elapsed = (run.now - started_at).total_seconds()
    next_analysis: float | None = None
    if run.analysed:
        last_time = parse_time(status.last_analysis.time) if status.last_analysis is not None else None
        reference = max(last_time, started_at) if last_time is not None else started_at
        next_analysis = run.interval - (run.now - reference).total_seconds()
        end_not_covered = last_time is None or last_time < started_at + timedelta(seconds=pause)
        if run.analysis is None and (next_analysis <= 0 or (elapsed >= pause and end_not_covered)):
            return RolloutDecision(
                weights=run.at_step(status), rollout=status, analysis_due=True, events=events
            )
    if elapsed >= pause:
        return _advance(run, status, events)
    waits = [pause - elapsed, *([next_analysis] if next_analysis is not None else [])]
    return _hold(run, status, events, wait_s=min(waits))


def _resume(run: _Pass, paused: RolloutStatus) -> RolloutDecision:
    """The spec changed under a Paused rollout: the same step again, its clock and count afresh."""
    step = min(paused.step, run.total_steps - 1)  # the change may have shortened the steps
    resumed = paused.model_copy(
        update={
            "state": "Progressing",
            "reason": None,
            "step": step,
            "step_started_at": None,
            "inconclusive_analyses": 0,
        }
    )
    message = f"the spec changed: resuming {run.canary} at step {step + 1}/{run.total_steps}"
    return _progress(run, resumed, [Event("Normal", "RolloutResumed", message)])


def _hand_over(run: _Pass, previous: RolloutStatus, canary_model_changed: bool) -> RolloutDecision:
    """The last version is no longer the canary the status tracks: a new rollout, or none."""
    if _takes_part(previous.stable_weights, run.canary) and not canary_model_changed:
        events = []
        if previous.state in ("Progressing", "Paused"):
            message = f"{previous.canary} is no longer the last version; its rollout stopped"
            events.append(Event("Normal", "RolloutCancelled", message))
        return _settle(
            run, previous, f"{run.canary} is part of the stable weights; the spec weights apply", events
        )
    return _begin(run, previous, previous.stable_weights, f"{run.canary} is new")


# -- the machine -------------------------------------------------------------------------------------


def plan_rollout(
    spec: ModelDeploymentSpec,
    previous: RolloutStatus | None,
    *,
    first_sight: bool,
    spec_changed: bool,
    previous_weights: Mapping[str, int],
    canary_model_changed: bool,
    canary_ready: bool,
    analysis: AnalysisRun | None,
    now: datetime,
) -> RolloutDecision:
    """Decide the weights and the rollout state for one pass.

    - ``previous``: ``status.rollout`` as it was; ``previous_weights``: the weights the status showed
      (used as the stable weights when a rollout is added to a deployment that had none);
    - ``first_sight``: the deployment was never reconciled (no ``status.observedGeneration``);
    - ``spec_changed``: the generation differs from the last observed one (resumes a Paused rollout,
      retries a RolledBack one);
    - ``canary_model_changed``: the canary is now served with a different model than before this pass;
    - ``canary_ready``: the canary's server answers with its current model;
    - ``analysis``: an analysis run in this pass because :func:`analysis_due` said so.
    """
    spec_weights = {version.name: version.weight for version in spec.versions}
    if spec.rollout is None:
        return RolloutDecision(weights=spec_weights, rollout=None)
    run = _Pass(spec_weights, spec.rollout, canary_ready, analysis, now)
    canary = run.canary

    if previous is None:
        if first_sight or not previous_weights:
            return _settle(run, None, "created with the spec weights; a version appended later is rolled out")
        stable = {name: previous_weights.get(name, 0) for name in spec_weights}
        if _takes_part(stable, canary) and not canary_model_changed:
            return _steady(run, None)
        why = f"{canary}'s model changed" if canary_model_changed else f"{canary} is new"
        return _begin(run, None, stable, why)
    if previous.canary != canary:
        return _hand_over(run, previous, canary_model_changed)
    if canary_model_changed:
        return _begin(run, previous, previous.stable_weights, f"{canary}'s model changed")
    if previous.state == "Promoted":
        if _takes_part(previous.stable_weights, canary):
            return _steady(run, previous)
        return _begin(run, previous, previous.stable_weights, f"{canary} gets traffic for the first time")
    if previous.state == "RolledBack":
        if spec_changed:
            return _begin(
                run, previous, previous.stable_weights, f"the spec changed after {canary} was rolled back"
            )
        return RolloutDecision(weights=run.step_weights(previous.stable_weights, 0), rollout=previous)
    if previous.state == "Paused":
        if spec_changed:
            return _resume(run, previous)
        held = previous.model_copy(update={"step": min(previous.step, run.total_steps - 1)})
        return RolloutDecision(weights=run.at_step(held), rollout=previous)
    if previous.step >= run.total_steps:  # the steps were shortened under a running rollout
        return _progress(run, previous.model_copy(update={"step": run.total_steps - 1}), [])
    return _progress(run, previous, [])


def analysis_due(
    spec: ModelDeploymentSpec,
    previous: RolloutStatus | None,
    *,
    first_sight: bool,
    spec_changed: bool,
    previous_weights: Mapping[str, int],
    canary_model_changed: bool,
    canary_ready: bool,
    now: datetime,
) -> bool:
    """Whether the canary's metrics must be analysed before this pass can be decided.

    Asked first, so the caller queries Prometheus (I/O) once and then decides once, with the result.
    """
    decision = plan_rollout(
        spec,
        previous,
        first_sight=first_sight,
        spec_changed=spec_changed,
        previous_weights=previous_weights,
        canary_model_changed=canary_model_changed,
        canary_ready=canary_ready,
        analysis=None,
        now=now,
    )
    return decision.analysis_due
