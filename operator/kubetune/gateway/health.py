"""Which versions the gateway may route to: the ready ones its config names, less those it could
not connect to lately.

A version the gateway fails to connect to is marked down for ``health.markDownSeconds``: no traffic
goes to it meanwhile (its share goes to the others), and the first request after that tries it
again. Nothing is probed in the background; the requests themselves are the health checks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from kubetune.gateway.config import GatewayConfig


class UpstreamHealth:
    """The versions marked down, each until when (monotonic seconds)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._down_until: dict[str, float] = {}

    def mark_down(self, version: str, seconds: float) -> None:
        self._down_until[version] = self._clock() + seconds

    def down(self) -> frozenset[str]:
        """The versions marked down now (those whose time is up are forgotten)."""
        if not self._down_until:
            return frozenset()
        now = self._clock()
        for version in [name for name, until in self._down_until.items() if until <= now]:
            del self._down_until[version]
        return frozenset(self._down_until)

    def unavailable(self, config: GatewayConfig) -> frozenset[str]:
        """Versions no request may go to now: not ready in the config, or marked down."""
        not_ready = frozenset(version.name for version in config.versions if not version.ready)
        return not_ready | self.down()

    def retry_after(self, config: GatewayConfig) -> int:
        """Whole seconds until a version may take requests again: when the first marked down is tried
        again, else (the config says none is ready) ``health.markDownSeconds``."""
        down = self.down()
        if down:
            now = self._clock()
            wait = min(self._down_until[version] for version in down) - now
        else:
            wait = config.health.mark_down_seconds
        return max(1, math.ceil(wait))
