"""The operator's job timers skip ticks while passes change nothing (PassSchedule, handlers/jobs.py).

Kopf ticks every reconcile interval. After a job's first pass the next comes an interval later; each
pass that changed nothing doubles the wait before the next one, up to 8 intervals; a pass that changed
something, or a new generation, brings the job back to every interval. Times are given, not slept.
"""

from __future__ import annotations

import itertools

from kubetune.handlers.jobs import PassSchedule

INTERVAL_S = 2.0


def ticks_run(schedule: PassSchedule, changes: list[bool], generation: int = 1) -> list[float]:
    """Tick every interval; the times of the ticks on which a pass ran, each reporting the next change."""
    ran: list[float] = []
    pending = list(changes)
    now = 0.0
    while pending:
        if schedule.due("uid-1", generation, now):
            ran.append(now)
            schedule.record("uid-1", generation, pending.pop(0), now)
        now += INTERVAL_S
    return ran


def test_passes_that_change_nothing_back_off_up_to_eight_intervals() -> None:
    schedule = PassSchedule(INTERVAL_S)
    ran = ticks_run(schedule, [False] * 7)
    gaps = [later - earlier for earlier, later in itertools.pairwise(ran)]
    assert gaps == [2.0, 4.0, 8.0, 16.0, 16.0, 16.0]


def test_a_pass_that_changes_something_brings_the_job_back_to_every_interval() -> None:
    schedule = PassSchedule(INTERVAL_S)
    ran = ticks_run(schedule, [False, False, False, True, False])
    gaps = [later - earlier for earlier, later in itertools.pairwise(ran)]
    assert gaps == [2.0, 4.0, 8.0, 2.0]


def test_a_new_generation_is_due_at_once() -> None:
    schedule = PassSchedule(INTERVAL_S)
    for now in (0.0, 2.0, 6.0):
        schedule.record("uid-1", 1, False, now)
    assert not schedule.due("uid-1", 1, 8.0)
    assert schedule.due("uid-1", 2, 8.0)


def test_a_forgotten_job_is_due() -> None:
    schedule = PassSchedule(INTERVAL_S)
    schedule.record("uid-1", 1, False, 0.0)
    schedule.forget("uid-1")
    assert schedule.due("uid-1", 1, 0.1)
