"""Jobs that take another job's published model: waiting for that FineTuneJob and reading its output.

A QuantizeJob's spec.model.fineTuneJobRef and a distillation FineTuneJob's
spec.method.distillation.teacher.fineTuneJobRef both name a FineTuneJob in the same namespace; the job
waits until it has succeeded and then uses status.output.uri. Pure functions: the caller passes in how to
look a FineTuneJob up (a Kopf index on a cluster, the local store in `kubetune up`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kubetune.config import MISSING_REFERENCE_GRACE_ENV, MISSING_REFERENCE_GRACE_S
from kubetune.plan.lifecycle import GiveUp, Hold
from kubetune_contract.conditions import find_condition

FineTuneJobLookup = Callable[[str, str], dict[str, Any] | None]


def no_finetune_jobs(_namespace: str, _name: str) -> dict[str, Any] | None:
    """A lookup that finds nothing (for callers that know no FineTuneJobs)."""
    return None


def published_finetune_job(
    lookup: FineTuneJobLookup,
    namespace: str,
    name: str,
    *,
    field: str,
    referrer: str,
    role: str,
    missing_grace_s: float = MISSING_REFERENCE_GRACE_S,
) -> tuple[dict[str, Any] | None, Hold | None]:
    """The FineTuneJob `name` and, while its output cannot be used yet, why (a Hold).

    `field` is the reference's path (for messages), `referrer` the referring job (`QuantizeJob/x`), `role`
    the CamelCase word of the reasons (Source: WaitingForSource, SourceNotFound, SourceFailed). A
    FineTuneJob that does not exist is waited for `missing_grace_s` seconds (it may be applied next).
    """
    source = lookup(namespace, name)
    if source is None:
        not_found = GiveUp(
            missing_grace_s,
            f"{role}NotFound",
            f"{field}: FineTuneJob/{name} does not exist in namespace "
            f"{namespace} and did not appear within {missing_grace_s:g}s "
            f"({MISSING_REFERENCE_GRACE_ENV}); "
            f"create it, then delete and apply {referrer} again",
        )
        return None, Hold(
            "Unknown",
            f"WaitingFor{role}",
            f"FineTuneJob/{name} does not exist (yet); waiting up to {missing_grace_s:g}s for it",
            give_up=not_found,
        )
    status = source.get("status") or {}
    condition = find_condition(status.get("conditions") or [], "Succeeded") or {}
    if condition.get("status") == "False":
        why = f"{condition.get('reason', 'Failed')}: {condition.get('message', '')}".rstrip(": ")
        return source, Hold("False", f"{role}Failed", f"FineTuneJob/{name} failed ({why})")
    if condition.get("status") != "True":
        phase = status.get("phase") or "Pending"
        return source, Hold(
            "Unknown", f"WaitingFor{role}", f"waiting for FineTuneJob/{name} to succeed ({phase})"
        )
    if not (status.get("output") or {}).get("uri"):
        return source, Hold("False", f"{role}Failed", f"FineTuneJob/{name} succeeded but published no output")
    return source, None


def published_uri(source: dict[str, Any]) -> str:
    """The model a succeeded FineTuneJob published (after `published_finetune_job` said it may be used)."""
    return str(source["status"]["output"]["uri"])
