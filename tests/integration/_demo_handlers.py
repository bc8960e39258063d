"""Throwaway Kopf handlers on FineTuneJobs, only to prove the integration harness works.

Not product behaviour: the real handlers live in ``kubetune.handlers.jobs``.

* create: optionally fails ``spec.failAttempts`` times (``kopf.TemporaryError``, delay
  ``spec.retryDelay``), then posts a ``Created`` event and patches ``status.phase``/``status.attempts``;
* resume (on operator restarts): counts ``status.resumes``;
* delete (sync on purpose, so it runs in kopf's thread pool): its presence makes kopf put its
  finalizer on every object.
"""

from __future__ import annotations

import threading
from typing import Any

import kopf

GROUP, VERSION, PLURAL = "kubetune.dev", "v1alpha1", "finetunejobs"

# Every handler invocation as (handler, object name); appended from the operator's threads.
CALLS: list[tuple[str, str]] = []
_lock = threading.Lock()


def _record(handler: str, name: str) -> None:
    with _lock:
        CALLS.append((handler, name))


def calls(handler: str, name: str) -> int:
    with _lock:
        return CALLS.count((handler, name))


@kopf.on.create(GROUP, VERSION, PLURAL)
async def create_fn(
    name: str, spec: kopf.Spec, retry: int, body: kopf.Body, patch: kopf.Patch, **_: Any
) -> None:
    _record("create", name)
    if retry < int(spec.get("failAttempts", 0)):
        raise kopf.TemporaryError(
            f"Attempt #{retry + 1} fails on purpose.", delay=float(spec.get("retryDelay", 0.1))
        )
    kopf.info(body, reason="Created", message=f"Created after {retry + 1} attempt(s).")
    patch.status["phase"] = "Created"
    patch.status["attempts"] = retry + 1


@kopf.on.resume(GROUP, VERSION, PLURAL)
async def resume_fn(name: str, status: kopf.Status, patch: kopf.Patch, **_: Any) -> None:
    _record("resume", name)
    patch.status["resumes"] = int(status.get("resumes", 0)) + 1


@kopf.on.delete(GROUP, VERSION, PLURAL)
def delete_fn(name: str, **_: Any) -> None:
    _record("delete", name)
