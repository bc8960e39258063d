"""The jobs' timers plan from the status they last wrote, and patch what the stored status lacks."""

from __future__ import annotations

from typing import Any

import kopf

from kubetune.handlers.jobs import WrittenStatuses
from kubetune.plan.lifecycle import Decision


def body(status: dict[str, Any]) -> kopf.Body:
    return kopf.Body({"metadata": {"uid": "u-1", "name": "j", "namespace": "ml"}, "status": status})


def test_a_pass_plans_from_what_it_wrote_while_the_watch_still_shows_the_older_status() -> None:
    written = WrittenStatuses()
    stale = body({"phase": "Pending"})
    first = kopf.Patch()
    written.write(
        Decision("submit", {"phase": "Running", "startTime": "t1"}), written.fresh(stale), stale, first
    )
    assert first["status"] == {"phase": "Running", "startTime": "t1"}
    # The next timer gets the same stale body: it plans from the written status...
    assert written.fresh(stale)["status"] == {"phase": "Running", "startTime": "t1"}


def test_a_patch_that_never_reached_the_api_server_is_sent_again() -> None:
    written = WrittenStatuses()
    stored = body({"phase": "Pending"})
    decision = Decision("submit", {"phase": "Running", "startTime": "t1"})
    written.write(
        decision, written.fresh(stored), stored, kopf.Patch()
    )  # lost: the stored body never changes
    again = kopf.Patch()
    changed = written.write(decision, written.fresh(stored), stored, again)
    assert again["status"] == {"phase": "Running", "startTime": "t1"}
    assert changed is False  # nothing new was decided: the pass may back off


def test_nothing_is_patched_once_the_stored_status_holds_the_decision() -> None:
    written = WrittenStatuses()
    stored = body({"phase": "Running", "startTime": "t1"})
    patch = kopf.Patch()
    written.write(
        Decision("none", {"phase": "Running", "startTime": "t1"}), written.fresh(stored), stored, patch
    )
    assert "status" not in patch
