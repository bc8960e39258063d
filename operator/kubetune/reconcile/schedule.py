"""When each ModelDeployment is next due for a reconcile pass (the operator's timer asks every tick).

A deployment is due at once for a generation not reconciled yet (creation, any spec change) and when
something it owns changed (:meth:`Schedules.poke`); otherwise when the previous pass asked to come
back (``requeue_after``), at the latest after :data:`RESYNC_S`, and after a failed pass with a
growing backoff (:data:`ERROR_BACKOFF_S`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

RESYNC_S = 30.0
ERROR_BACKOFF_S = (1.0, 5.0, 15.0, 60.0)


@dataclass
class _Schedule:
    """When one ModelDeployment is next due, and the generation last reconciled."""

    generation: int | None = None
    due: float = 0.0
    failures: int = 0


@dataclass
class Schedules:
    """When each ModelDeployment (by uid) is next due for a reconcile pass (times: monotonic seconds)."""

    by_uid: dict[str, _Schedule] = field(default_factory=dict)

    def due(self, uid: str, generation: int | None, now: float) -> bool:
        schedule = self.by_uid.get(uid)
        return schedule is None or schedule.generation != generation or now >= schedule.due

    def done(self, uid: str, generation: int | None, now: float, requeue_after: float | None) -> None:
        wait = RESYNC_S if requeue_after is None else min(max(requeue_after, 0.0), RESYNC_S)
        self.by_uid[uid] = _Schedule(generation=generation, due=now + wait)

    def poke(self, uid: str) -> None:
        """Make a reconciled deployment due at the next tick (something it owns changed)."""
        schedule = self.by_uid.get(uid)
        if schedule is not None and schedule.failures == 0:
            schedule.due = 0.0

    def failed(self, uid: str, generation: int | None, now: float) -> None:
        failures = self.by_uid[uid].failures + 1 if uid in self.by_uid else 1
        backoff = ERROR_BACKOFF_S[min(failures, len(ERROR_BACKOFF_S)) - 1]
        self.by_uid[uid] = _Schedule(generation=generation, due=now + backoff, failures=failures)

    def forget(self, uid: str) -> None:
        self.by_uid.pop(uid, None)
