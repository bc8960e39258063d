"""Feedback on completions, accepted by any gateway replica.

Feedback: ``POST /v1/feedback {"requestId" (or "request_id"): <a completion's id>, "score": 0..1}``.
The score is in [0, 1] (1 = good) so that its mean reads like the rollout analysis' ``feedback``
threshold.

A completion's id carries the version that answered it, signed: ``<prefix>-<uuid>.<version>.<mac>``
with ``mac`` an HMAC-SHA256 (128 bits, URL-safe base64) under the deployment's signing key. Every
replica holding that key reads the version from the id itself, so feedback needs no memory of the
request and a forged or edited id is refused (404). A completion can be rated once (409 after
that): with Redis configured the "rated" mark is shared by the replicas, else it is this process's.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import secrets
from typing import Any

from kubetune.gateway.errors import GatewayError, invalid_request

FEEDBACK_FIELDS = frozenset({"requestId", "request_id", "score"})
MAC_BYTES = 16
RATED_TTL_SECONDS = 30 * 24 * 3600


class ResponseIds:
    """Signs a response id with the version that answered, and reads the version back."""

    def __init__(self, signing_key: bytes | None = None) -> None:
        self._key = signing_key if signing_key else secrets.token_bytes(32)

    def _mac(self, message: str) -> str:
        digest = hmac.new(self._key, message.encode(), hashlib.sha256).digest()[:MAC_BYTES]
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def sign(self, request_id: str, version: str) -> str:
        return f"{request_id}.{version}.{self._mac(f'{request_id}.{version}')}"

    def version_of(self, response_id: str) -> str | None:
        """The version a signed id names; None when the id was not signed with this key."""
        parts = response_id.rsplit(".", 2)
        if len(parts) != 3:
            return None
        request_id, version, mac = parts
        if not hmac.compare_digest(self._mac(f"{request_id}.{version}"), mac):
            return None
        return version


def unknown_completion(rated_id: str) -> GatewayError:
    return GatewayError(
        404,
        f"no completion of this deployment has the id {rated_id!r}",
        param="requestId",
        error_type="not_found_error",
    )


def already_rated(rated_id: str) -> GatewayError:
    return GatewayError(
        409, f"the completion {rated_id!r} already has feedback", param="requestId", error_type="conflict"
    )


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
