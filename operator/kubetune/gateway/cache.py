"""Exact-match response cache for deterministic requests (TTL + LRU bound)."""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

# Fields that never change what the model generates; left out of the key so that, for example,
# the same greedy prompt from two users is one entry.
_KEY_IGNORED_FIELDS = frozenset({"user", "stream", "stream_options"})


def is_deterministic(body: Mapping[str, Any]) -> bool:
    """Greedy decoding of one choice, not streamed: the only requests whose answer is worth reusing.

    ``body`` is the request after generation defaults were applied, so an omitted temperature
    counts as 0 only when the deployment's default is 0.
    """
    temperature = body.get("temperature")
    n = body.get("n")
    return (
        not body.get("stream", False)
        and isinstance(temperature, int | float)
        and temperature == 0
        and (n is None or n == 1)
    )


def cache_key(endpoint: str, version: str, upstream_url: str, body: Mapping[str, Any]) -> str:
    """The normalized upstream request: endpoint, version (and its URL) and the body's fields in
    canonical JSON (sorted keys, no whitespace), without the fields in ``_KEY_IGNORED_FIELDS``."""
    normalized = {key: value for key, value in body.items() if key not in _KEY_IGNORED_FIELDS}
    canonical = json.dumps(normalized, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return f"{endpoint}\n{version}\n{upstream_url}\n{canonical}"


@dataclass(frozen=True)
class CachedResponse:
    version: str
    body: dict[str, Any]
    expires_at: float


class ResponseCache:
    """A bounded map with a time to live; the least recently used entry goes first when full."""

    def __init__(
        self, max_entries: int, ttl_seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._entries: OrderedDict[str, CachedResponse] = OrderedDict()
        self._clock = clock
        self.max_entries = max_entries
        self.ttl_seconds = ttl_seconds

    def __len__(self) -> int:
        return len(self._entries)

    def configure(self, max_entries: int, ttl_seconds: float) -> None:
        """Apply new bounds in place (a config reload); entries beyond the new size are evicted."""
        self.max_entries = max_entries
        self.ttl_seconds = ttl_seconds
        self._evict_overflow()

    def clear(self) -> None:
        self._entries.clear()

    def get(self, key: str) -> CachedResponse | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires_at <= self._clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: str, version: str, body: dict[str, Any]) -> None:
        self._entries[key] = CachedResponse(version, body, self._clock() + self.ttl_seconds)
        self._entries.move_to_end(key)
        self._evict_overflow()

    def _evict_overflow(self) -> None:
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
