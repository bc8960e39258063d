"""Which version answered each recent completion, so that feedback on it can be credited.

Feedback: ``POST /v1/feedback {"requestId" (or "request_id"): <a completion's id>, "score": 0..1}``.
The score is in [0, 1] (1 = good) so that its mean reads like the rollout analysis' ``feedback``
threshold; a completion can be rated once (409 after that), and ids are remembered for the last
``RECENT_REQUESTS`` completions of this process (404 for others).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

from kubetune.gateway.errors import GatewayError, invalid_request

RECENT_REQUESTS = 100_000
FEEDBACK_FIELDS = frozenset({"requestId", "request_id", "score"})


class AnsweredRequests:
    """The versions of the last ``capacity`` completions, and which of them were rated already."""

    def __init__(self, capacity: int = RECENT_REQUESTS) -> None:
        self.capacity = capacity
        self._versions: OrderedDict[str, str] = OrderedDict()
        self._rated: set[str] = set()

    def remember(self, request_id: str, version: str) -> None:
        self._versions[request_id] = version
        if len(self._versions) > self.capacity:
            forgotten, _ = self._versions.popitem(last=False)
            self._rated.discard(forgotten)

    def version_of(self, request_id: str) -> str | None:
        return self._versions.get(request_id)

    def rate(self, request_id: str) -> str:
        """Marks the completion rated and returns its version; 404 when forgotten, 409 when rated."""
        version = self._versions.get(request_id)
        if version is None:
            raise GatewayError(
                404,
                f"no recent completion has the id {request_id!r} (the gateway remembers the last "
                f"{self.capacity} response ids of this process)",
                param="requestId",
                error_type="not_found_error",
            )
        if request_id in self._rated:
            raise GatewayError(
                409,
                f"the completion {request_id!r} already has feedback",
                param="requestId",
                error_type="conflict",
            )
        self._rated.add(request_id)
        return version


def parse_feedback(body: dict[str, Any]) -> tuple[str, float]:
    """(the rated completion's id, the score) of a feedback body; 400 naming the field otherwise."""
    unknown = sorted(set(body) - FEEDBACK_FIELDS)
    if unknown:
        raise invalid_request(
            f"unknown field(s) {', '.join(unknown)}; feedback takes requestId (or request_id) and score",
            unknown[0],
        )
    ids = {body[name] for name in ("requestId", "request_id") if name in body}
    if not ids:
        raise invalid_request("requestId is required: the id of the completion being rated", "requestId")
    if len(ids) > 1:
        raise invalid_request("requestId and request_id name different completions", "requestId")
    rated_id = ids.pop()
    if not isinstance(rated_id, str) or not rated_id:
        raise invalid_request("requestId must be a non-empty string", "requestId")
    score = body.get("score")
    if (
        not isinstance(score, int | float)
        or isinstance(score, bool)
        or not math.isfinite(score)
        or not 0 <= score <= 1
    ):
        raise invalid_request("score must be a number between 0 (bad) and 1 (good)", "score")
    return rated_id, float(score)
