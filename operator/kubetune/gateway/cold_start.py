"""Holding requests for a version that scales up from zero (``spec.serving.autoscaling.minReplicas: 0``).

With ``scaleFromZero`` in the gateway config, a version the config marks not ready is still routed to
(it is asleep, not broken): its requests wait here until it is ready, which they find out from the
config (the operator marks it ready) or sooner from the version itself (its ``/readyz`` answers 200,
probed every :data:`PROBE_INTERVAL_S` by one task per version, whoever holds). A version the gateway
could not connect to lately (``UpstreamHealth``) is not held for: its share goes elsewhere as ever.

A version the config still marks ready may already be at zero: KEDA scaled it down and the gateway's
config (refreshed by the kubelet) does not say so yet. With ``scaleFromZero`` a request that cannot
connect to its version (refused, no endpoints, connect timeout: nothing reached it) is therefore not
answered 503 but held like any request for a sleeping version (:meth:`ColdStartHolds.wake`), then sent
again once the version answers ``/readyz``; the version counts as asleep (later requests are held
too, not routed elsewhere) until its ``/readyz`` answers, whatever the config says.

At most ``maxHeldRequests`` wait per version; one more is answered 503 at once, and a request that
waited ``holdSeconds`` gets 503; both with Retry-After and the OpenAI error body. Every held request is
counted in ``kubetune_gateway_held_requests_total{outcome}`` (ready, timeout, full, cancelled), and
while held it is part of ``kubetune_gateway_open_requests``, the gauge KEDA (on a cluster) and
`kubetune up` (locally) wake the version on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable

import aiohttp

from kubetune.gateway.config import GatewayConfig
from kubetune.gateway.errors import GatewayError
from kubetune.gateway.metrics import GatewayMetrics

log = logging.getLogger(__name__)

PROBE_INTERVAL_S = 0.5
PROBE_TIMEOUT_S = 2.0


class ColdStartHolds:
    """The requests held per version, and the probes that find each version ready."""

    def __init__(self, metrics: GatewayMetrics, current: Callable[[], GatewayConfig]) -> None:
        self._metrics = metrics
        self._current = current
        self._held: dict[str, int] = {}
        self._ready: dict[str, asyncio.Event] = {}
        self._probes: dict[str, asyncio.Task[None]] = {}
        self._found_asleep: set[str] = set()
        """Versions the config marks ready that could not be connected to: asleep until /readyz answers."""

    def held(self, version: str) -> int:
        return self._held.get(version, 0)

    def asleep(self, config: GatewayConfig) -> frozenset[str]:
        """The versions to hold requests for: not ready per the config, when it scales from zero."""
        if config.scale_from_zero is None:
            return frozenset()
        return frozenset(
            version.name
            for version in config.versions
            if not version.ready or version.name in self._found_asleep
        )

    def found_asleep(self, version: str) -> None:
        """``version`` could not be connected to: take it as scaled to zero until its /readyz answers."""
        if version not in self._found_asleep:
            log.warning("version %s cannot be connected to: taking it as scaled to zero", version)
            self._found_asleep.add(version)

    async def wake(self, config: GatewayConfig, version: str) -> bool:
        """Hold a request that could not connect to ``version`` until it is ready again; False (at once)
        without ``scaleFromZero``: such a version is unreachable, not asleep. Raises the hold's 503."""
        if config.scale_from_zero is None:
            return False
        self.found_asleep(version)
        # the request is already counted in the open-requests gauge as in flight
        await self.hold(config, version, count_open=False)
        return True

    async def hold(self, config: GatewayConfig, version: str, *, count_open: bool = True) -> None:
        """Return once ``version`` is ready; raise the 503 to answer when the hold is full or times out.
        ``count_open``: count the held request in the open-requests gauge (KEDA's demand)."""
        policy = config.scale_from_zero
        assert policy is not None
        deployment = config.deployment
        if self.held(version) >= policy.max_held_requests:
            self._count(deployment, version, "full")
            raise _unavailable(
                f"version {version!r} is starting from zero and {policy.max_held_requests} requests already "
                "wait for it (maxHeldRequests)",
                policy.hold_seconds,
            )
        ready = self._ready.setdefault(version, asyncio.Event())
        if version not in self._probes or self._probes[version].done():
            self._probes[version] = asyncio.create_task(self._probe(version, ready))
        self._held[version] = self.held(version) + 1
        gauge = self._metrics.child(self._metrics.open_requests, deployment, version)
        if count_open:
            gauge.inc()
        outcome = "cancelled"
        try:
            await asyncio.wait_for(ready.wait(), policy.hold_seconds)
            outcome = "ready"
        except TimeoutError:
            outcome = "timeout"
            raise _unavailable(
                f"version {version!r} did not become ready within holdTimeout ({policy.hold_seconds:g}s) "
                "while scaling up from zero",
                policy.hold_seconds,
            ) from None
        finally:
            if count_open:
                gauge.dec()
            self._held[version] -= 1
            self._count(deployment, version, outcome)
            if not self._held[version]:
                self._stop_probe(version)

    async def close(self) -> None:
        for version in list(self._probes):
            self._stop_probe(version)

    def _stop_probe(self, version: str) -> None:
        task = self._probes.pop(version, None)
        self._ready.pop(version, None)
        if task is not None:
            task.cancel()

    def _count(self, deployment: str, version: str, outcome: str) -> None:
        self._metrics.child(self._metrics.held_requests, deployment, version, outcome).inc()

    async def _probe(self, version: str, ready: asyncio.Event) -> None:
        timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session:
            while not ready.is_set():
                config = self._current()
                found = next((v for v in config.versions if v.name == version), None)
                if found is None or (found.ready and version not in self._found_asleep):
                    ready.set()  # ready per the config, or gone (the request then fails as for any version)
                    break
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                    async with session.get(found.url.rstrip("/") + "/readyz") as answer:
                        if answer.status == 200:
                            log.info("version %s answers /readyz: releasing its held requests", version)
                            self._found_asleep.discard(version)
                            ready.set()
                            break
                await asyncio.sleep(PROBE_INTERVAL_S)


def _unavailable(message: str, retry_after: float) -> GatewayError:
    return GatewayError(
        503,
        message,
        error_type="service_unavailable",
        code="version_scaling_from_zero",
        retry_after=max(1, math.ceil(min(retry_after, 30))),
    )
