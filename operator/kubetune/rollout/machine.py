"""The canary state machine of a ModelDeployment: spec + last status + observations -> decision. Pure.

The canary is the last entry of ``spec.versions`` when ``spec.rollout`` is set. A rollout begins when
the canary takes no part in the stable weights (a version was appended, or given traffic for the
first time) or when the model it serves changed; never on creation, where the spec weights apply at
once::

    Progressing(step i) --pause over, analysis not failed--> Progressing(i + 1) ... --> Promoted
    Progressing --analysis failed--> RolledBack (autoRollback: canary at 0%) | Paused (weights held)
    RolledBack --spec changed--> Progressing from step 0      Paused --spec changed--> same step again

During step i the canary gets ``steps[i].weight`` percent and the other versions share the rest in
proportion to their stable weights. A step's clock starts once the canary is ready, and starts again
if the canary stops answering during the step. The canary's metrics are analysed every interval and
once more when the step's pause is over, so a step only advances on an analysis that covers its end.
An inconclusive analysis (no data, Prometheus not reachable) never fails a step: it is recorded as
such.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from kubetune.common.clock import format_time, parse_time
from kubetune.common.events import Event
from kubetune.rollout.weights import format_weights, proportional
from kubetune_contract.deployment import AnalysisRun, ModelDeploymentSpec, RolloutStatus, duration_seconds


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


def _takes_part(stable: Mapping[str, int], version: str) -> bool:
    return stable.get(version, 0) > 0


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
    - ``analysis``: an analysis run in this pass because the previous decision had ``analysis_due``.
    """
    weights = {version.name: version.weight for version in spec.versions}
    rollout = spec.rollout
    if rollout is None:
        return RolloutDecision(weights=weights, rollout=None)
    names = list(weights)
    canary = names[-1]
    steps = rollout.steps
    total_steps = len(steps)
    metrics = rollout.analysis.metrics
    interval = duration_seconds(rollout.analysis.interval)

    def step_weights(stable: Mapping[str, int], canary_weight: int) -> dict[str, int]:
        others = {name: stable.get(name, 0) for name in names if name != canary}
        if sum(others.values()) == 0:
            # The stable versions were renamed or removed under the rollout: the spec's others hold.
            others = {name: weights[name] for name in names if name != canary}
        if sum(others.values()) == 0:
            return dict(weights)
        split = proportional(100 - canary_weight, others)
        return {name: canary_weight if name == canary else split[name] for name in names}

    def settled(message: str, events: list[Event] | None = None) -> RolloutDecision:
        kept = previous.last_analysis if previous is not None and previous.canary == canary else None
        status = RolloutStatus(
            canary=canary,
            step=total_steps,
            state="Promoted",
            stable_weights=dict(weights),
            last_analysis=kept,
            message=message,
        )
        return RolloutDecision(weights=dict(weights), rollout=status, events=events or [])

    def steady() -> RolloutDecision:
        if previous is not None and previous.state == "Promoted" and previous.canary == canary:
            return settled(previous.message)
        return settled(f"{canary} is part of the stable weights; the spec weights apply")

    def start(stable: Mapping[str, int], why: str) -> RolloutDecision:
        if weights[canary] == 0:
            return settled(f"{canary} has weight 0 in the spec, so there is nothing to roll out")
        baseline = {name: stable.get(name, 0) for name in names}
        if not any(weight for name, weight in baseline.items() if name != canary):
            message = (
                f"no version but {canary} had traffic before, so the spec weights apply without a rollout"
            )
            return settled(message, [Event("Warning", "NoStableVersion", message)])
        plan = ", ".join(f"{step.weight}% for {step.pause}" for step in steps)
        status = RolloutStatus(
            canary=canary,
            step=0,
            state="Progressing",
            stable_weights=baseline,
            message=f"{why}: {plan}, then the spec weights",
        )
        started = Event("Normal", "RolloutStarted", f"rolling out {canary} ({why}): {plan}")
        return progress(status, [started])

    def fail(status: RolloutStatus, run: AnalysisRun, events: list[Event]) -> RolloutDecision:
        where = f"at step {status.step + 1}/{total_steps}"
        if rollout.auto_rollback:
            message = f"{canary} rolled back {where}: {run.message}; edit the spec to try again"
            rolled = status.model_copy(update={"state": "RolledBack", "message": message})
            stable = format_weights(step_weights(status.stable_weights, 0))
            event = Event("Warning", "RolledBack", f"{canary} rolled back to 0% ({stable}): {run.message}")
            return RolloutDecision(
                weights=step_weights(status.stable_weights, 0), rollout=rolled, events=[*events, event]
            )
        message = f"{canary} paused {where}, weights held: {run.message}; edit the spec to resume"
        paused = status.model_copy(update={"state": "Paused", "message": message})
        return RolloutDecision(
            weights=step_weights(status.stable_weights, steps[status.step].weight),
            rollout=paused,
            events=[*events, Event("Warning", "RolloutPaused", message)],
        )

    def progress(status: RolloutStatus, events: list[Event]) -> RolloutDecision:
        step = status.step
        pause = duration_seconds(steps[step].pause)
        current = step_weights(status.stable_weights, steps[step].weight)
        where = f"step {step + 1}/{total_steps}, {canary} at {steps[step].weight}%"
        if not canary_ready:
            # Also mid-step: a canary that stopped answering gets no traffic and its analysis no data,
            # so the step's pause starts again once it answers rather than passing unobserved.
            waiting = status.model_copy(
                update={"step_started_at": None, "message": f"{where}: waiting for {canary} to be ready"}
            )
            return RolloutDecision(weights=current, rollout=waiting, events=events)
        if status.step_started_at is None:
            status = status.model_copy(update={"step_started_at": format_time(now)})
        started_at = parse_time(str(status.step_started_at))
        if analysis is not None:
            status = status.model_copy(update={"last_analysis": analysis})
            if not analysis.passed:
                return fail(status, analysis, events)
        elapsed = (now - started_at).total_seconds()
        last = status.last_analysis
        last_time = parse_time(last.time) if last is not None else None
        next_analysis: float | None = None
        if metrics:
            reference = max(last_time, started_at) if last_time is not None else started_at
            next_analysis = interval - (now - reference).total_seconds()
            end_not_covered = last_time is None or last_time < started_at + timedelta(seconds=pause)
            if analysis is None and (next_analysis <= 0 or (elapsed >= pause and end_not_covered)):
                return RolloutDecision(weights=current, rollout=status, analysis_due=True, events=events)
        if elapsed >= pause:
            if step + 1 == total_steps:
                message = f"{canary} promoted after {total_steps} steps; the spec weights apply"
                promoted = status.model_copy(
                    update={
                        "step": total_steps,
                        "state": "Promoted",
                        "stable_weights": dict(weights),
                        "message": message,
                    }
                )
                return RolloutDecision(
                    weights=dict(weights),
                    rollout=promoted,
                    events=[*events, Event("Normal", "RolloutPromoted", message)],
                )
            following = step + 1
            moved = status.model_copy(
                update={
                    "step": following,
                    "step_started_at": format_time(now),
                    "message": f"step {following + 1}/{total_steps}, {canary} at {steps[following].weight}%",
                }
            )
            event = Event(
                "Normal",
                "RolloutStepAdvanced",
                f"{canary} at {steps[following].weight}% (step {following + 1}/{total_steps})",
            )
            waits = [duration_seconds(steps[following].pause), *([interval] if metrics else [])]
            return RolloutDecision(
                weights=step_weights(status.stable_weights, steps[following].weight),
                rollout=moved,
                events=[*events, event],
                requeue_after=min(waits),
            )
        detail = f"; last analysis: {last.message}" if last is not None and last.message else ""
        status = status.model_copy(update={"message": f"{where} for {steps[step].pause}{detail}"})
        waits = [pause - elapsed, *([next_analysis] if next_analysis is not None else [])]
        return RolloutDecision(
            weights=current, rollout=status, events=events, requeue_after=max(0.0, min(waits))
        )

    if previous is None:
        if first_sight or not previous_weights:
            return settled("created with the spec weights; a version appended later is rolled out")
        stable = {name: previous_weights.get(name, 0) for name in names}
        if _takes_part(stable, canary) and not canary_model_changed:
            return steady()
        return start(stable, f"{canary} is new" if not canary_model_changed else f"{canary}'s model changed")

    if previous.canary != canary:
        if _takes_part(previous.stable_weights, canary) and not canary_model_changed:
            events = []
            if previous.state in ("Progressing", "Paused"):
                message = f"{previous.canary} is no longer the last version; its rollout stopped"
                events.append(Event("Normal", "RolloutCancelled", message))
            return settled(f"{canary} is part of the stable weights; the spec weights apply", events)
        return start(previous.stable_weights, f"{canary} is new")
    if canary_model_changed:
        return start(previous.stable_weights, f"{canary}'s model changed")
    if previous.state == "Promoted":
        if _takes_part(previous.stable_weights, canary):
            return steady()
        return start(previous.stable_weights, f"{canary} gets traffic for the first time")
    if previous.state == "RolledBack":
        if spec_changed:
            return start(previous.stable_weights, f"the spec changed after {canary} was rolled back")
        return RolloutDecision(weights=step_weights(previous.stable_weights, 0), rollout=previous)
    if previous.state == "Paused":
        if spec_changed:
            step = min(previous.step, total_steps - 1)  # the change may have shortened the steps
            resumed = previous.model_copy(
                update={"state": "Progressing", "step": step, "step_started_at": None}
            )
            message = f"the spec changed: resuming {canary} at step {step + 1}/{total_steps}"
            return progress(resumed, [Event("Normal", "RolloutResumed", message)])
        held = step_weights(previous.stable_weights, steps[min(previous.step, total_steps - 1)].weight)
        return RolloutDecision(weights=held, rollout=previous)
    if previous.step >= total_steps:  # the steps were shortened under a running rollout
        return progress(previous.model_copy(update={"step": total_steps - 1}), [])
    return progress(previous, [])
