"""When the operator's timer reconciles a ModelDeployment (kubetune.reconcile.schedule)."""

from __future__ import annotations

from kubetune.reconcile.schedule import ERROR_BACKOFF_S, RESYNC_S, Schedules


def test_schedule_runs_new_generations_at_once_and_backs_off_on_errors() -> None:
    schedules = Schedules()
    assert schedules.due("u", 1, now=0.0)  # never reconciled
    schedules.done("u", 1, now=0.0, requeue_after=5.0)
    assert not schedules.due("u", 1, now=4.9) and schedules.due("u", 1, now=5.0)
    assert schedules.due("u", 2, now=0.1)  # a spec change does not wait
    schedules.done("u", 1, now=0.0, requeue_after=None)
    assert not schedules.due("u", 1, now=RESYNC_S - 0.1) and schedules.due("u", 1, now=RESYNC_S)
    schedules.poke("u")  # one of its Deployments changed
    assert schedules.due("u", 1, now=0.1)
    schedules.failed("u", 1, now=0.0)
    schedules.poke("u")  # a failing deployment keeps its backoff
    assert not schedules.due("u", 1, now=ERROR_BACKOFF_S[0] - 0.1) and schedules.due(
        "u", 1, now=ERROR_BACKOFF_S[0]
    )
    schedules.failed("u", 1, now=0.0)
    assert not schedules.due("u", 1, now=ERROR_BACKOFF_S[1] - 0.1)
    schedules.poke("unknown")  # never reconciled: nothing to do
    assert "unknown" not in schedules.by_uid
