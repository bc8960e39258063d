"""Weighted, sticky assignment of requests to versions.

Weighted rendezvous (highest-random-weight) hashing: for a routing key k every version v with weight
w > 0 gets the score ``-w / ln(u(k, v))``, where ``u`` is a stable hash of (v, k) mapped into (0, 1),
and the highest score wins. This is the exponential-race form of weighted HRW: the winner is v with
probability ``w / sum(w)``, so thousands of users split by the weights; the same key always lands on
the same version (blake2b, not Python's per-process salted ``hash``, so every gateway replica
agrees); removing a version moves only the keys it held, and changing weights moves only as many
keys as the shares changed. Weight 0 never wins sticky or random traffic; such a version is reached
only through the override header. Versions the caller says are unavailable are left out of the
race, so their keys move to the others in proportion to the remaining weights, and come back when
the version does.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

_TWO_TO_64 = float(2**64)


class UnknownVersionError(LookupError):
    """The override header named a version that does not exist."""

    def __init__(self, header: str, requested: str, known: Sequence[str]) -> None:
        self.header = header
        self.requested = requested
        self.known = tuple(known)
        super().__init__(
            f"header {header}: {requested!r} is not a version of this deployment "
            f"(known versions: {', '.join(self.known)})"
        )


def hash_unit_interval(version: str, key: str) -> float:
    """A stable pseudo-random number in (0, 1) for the pair (version, key)."""
    # surrogatepass: a routing key is whatever the client sent, lone surrogates included
    digest = hashlib.blake2b(f"{version}:{key}".encode(errors="surrogatepass"), digest_size=8).digest()
    return (int.from_bytes(digest, "big") + 0.5) / _TWO_TO_64


class NoVersionAvailable(LookupError):
    """Every version that takes traffic is unavailable."""


@dataclass(frozen=True)
class WeightedVersion:
    name: str
    weight: int


class Router:
    """Chooses a version for a request: override header, else sticky key, else random by weight."""

    def __init__(self, versions: Iterable[tuple[str, int]], rng: random.Random | None = None) -> None:
        self.versions = tuple(WeightedVersion(name, weight) for name, weight in versions)
        if not self.versions:
            raise ValueError("a router needs at least one version")
        self._names = frozenset(version.name for version in self.versions)
        self._eligible = [version for version in self.versions if version.weight > 0]
        if not self._eligible:
            raise ValueError("a router needs at least one version with a weight above 0")
        self._eligible_names = [version.name for version in self._eligible]
        self._eligible_weights = [version.weight for version in self._eligible]
        self._rng = rng if rng is not None else random.Random()

    @property
    def names(self) -> list[str]:
        return [version.name for version in self.versions]

    def _available(self, unavailable: frozenset[str]) -> list[WeightedVersion]:
        available = [version for version in self._eligible if version.name not in unavailable]
        if not available:
            raise NoVersionAvailable(", ".join(self._eligible_names))
        return available

    def sticky(self, key: str, unavailable: frozenset[str] = frozenset()) -> str:
        """The version this key always lands on (weighted rendezvous hashing) among the available."""
        candidates = self._available(unavailable) if unavailable else self._eligible
        best_name = candidates[0].name
        best_score = -1.0
        for version in candidates:
            score = -version.weight / math.log(hash_unit_interval(version.name, key))
            if score > best_score:
                best_name, best_score = version.name, score
        return best_name

    def random_by_weight(self, unavailable: frozenset[str] = frozenset()) -> str:
        if not unavailable:
            return self._rng.choices(self._eligible_names, weights=self._eligible_weights)[0]
        candidates = self._available(unavailable)
        return self._rng.choices(
            [version.name for version in candidates], weights=[version.weight for version in candidates]
        )[0]

    def another_by_weight(self, excluded: frozenset[str]) -> str | None:
        """A version with a weight outside ``excluded``, at random by weight (where a request goes when
        the version it was sent to could not be reached); None when there is none."""
        candidates = [version for version in self._eligible if version.name not in excluded]
        if not candidates:
            return None
        return self._rng.choices(
            [version.name for version in candidates], weights=[version.weight for version in candidates]
        )[0]

    def choose(
        self,
        key: str | None,
        override: str | None = None,
        override_header: str = "",
        unavailable: frozenset[str] = frozenset(),
    ) -> str:
        """Pick the version for one request.

        ``override`` (the override header's value) pins the request, even to a version of weight 0
        or an unavailable one (the caller decides what to do then); an unknown name raises
        UnknownVersionError. Requests without a key are spread at random. Raises NoVersionAvailable
        when every version with a weight is in ``unavailable``.
        """
        if override is not None:
            if override not in self._names:
                raise UnknownVersionError(override_header, override, self.names)
            return override
        if key is None or key == "":
            return self.random_by_weight(unavailable)
        return self.sticky(key, unavailable)
