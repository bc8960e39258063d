from __future__ import annotations

import random
import subprocess
import sys
from collections import Counter

import pytest

from kubetune.gateway.routing import NoVersionAvailable, Router, UnknownVersionError, hash_unit_interval

USERS = [f"user-{index}" for index in range(5000)]


def assignments(router: Router) -> dict[str, str]:
    return {user: router.sticky(user) for user in USERS}


def shares(assigned: dict[str, str]) -> dict[str, float]:
    counts = Counter(assigned.values())
    return {name: count / len(assigned) for name, count in counts.items()}


@pytest.mark.parametrize(
    "weights",
    [
        {"tuned": 80, "int8": 20},
        {"a": 50, "b": 30, "c": 20},
        {"a": 10, "b": 90},
        {"a": 1, "b": 1, "c": 1, "d": 1},
    ],
)
def test_distinct_users_split_by_the_weights(weights: dict[str, int]) -> None:
    observed = shares(assignments(Router(weights.items())))
    total = sum(weights.values())
    for name, weight in weights.items():
        # 5000 users: the standard error of a share is at most 0.7 points; allow 3.
        assert observed.get(name, 0.0) == pytest.approx(weight / total, abs=0.03), (name, observed)


def test_a_user_always_lands_on_the_same_version() -> None:
    router = Router([("tuned", 80), ("int8", 20)])
    first = assignments(router)
    again = Router([("tuned", 80), ("int8", 20)], rng=random.Random(7))
    assert assignments(again) == first
    assert all(router.choose(user) == first[user] for user in USERS[:200])


def test_assignment_is_stable_across_processes() -> None:
    # blake2b, not Python's salted hash(): another interpreter (another gateway replica) agrees.
    script = (
        "from kubetune.gateway.routing import Router;"
        "r = Router([('tuned', 80), ('int8', 20)]);"
        "print(','.join(r.sticky(f'user-{i}') for i in range(50)))"
    )
    other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    router = Router([("tuned", 80), ("int8", 20)])
    assert other.stdout.strip().split(",") == [router.sticky(f"user-{i}") for i in range(50)]


def test_hash_is_in_the_open_unit_interval_and_depends_on_both_parts() -> None:
    values = {hash_unit_interval(version, key) for version in ("a", "b") for key in ("x", "y")}
    assert len(values) == 4
    assert all(0.0 < value < 1.0 for value in values)


def test_removing_a_version_moves_only_its_users() -> None:
    before = assignments(Router([("a", 50), ("b", 30), ("c", 20)]))
    after = assignments(Router([("a", 50), ("b", 30)]))
    moved = [user for user in USERS if before[user] != after[user]]
    assert moved, "c's users must go somewhere"
    assert all(before[user] == "c" for user in moved)
    assert all(after[user] == before[user] for user in USERS if before[user] != "c")


def test_changing_weights_moves_few_users_and_only_towards_the_version_that_grew() -> None:
    before = assignments(Router([("tuned", 80), ("int8", 20)]))
    after = assignments(Router([("tuned", 70), ("int8", 30)]))
    moved = [user for user in USERS if before[user] != after[user]]
    # The share moved is 10 points; a naive re-split (e.g. modulo) would move ~half of all users.
    assert 0.07 <= len(moved) / len(USERS) <= 0.13
    assert all(before[user] == "tuned" and after[user] == "int8" for user in moved)


def test_a_version_with_weight_zero_gets_no_traffic_but_can_be_pinned() -> None:
    router = Router([("stable", 100), ("canary", 0)])
    assert set(assignments(router).values()) == {"stable"}
    assert {router.random_by_weight() for _ in range(500)} == {"stable"}
    assert router.choose("user-1", override="canary", override_header="x-kubetune-version") == "canary"


def test_requests_without_a_key_are_split_at_random_by_weight() -> None:
    router = Router([("tuned", 80), ("int8", 20)], rng=random.Random(0))
    picks = Counter(router.choose(None) for _ in range(5000))
    assert picks["tuned"] / 5000 == pytest.approx(0.8, abs=0.03)
    picks_empty_key = Counter(router.choose("") for _ in range(2000))
    assert len(picks_empty_key) == 2  # an empty key is no key, not one user


def test_override_wins_over_the_sticky_key() -> None:
    router = Router([("tuned", 80), ("int8", 20)])
    user = next(user for user in USERS if router.sticky(user) == "tuned")
    assert router.choose(user, override="int8", override_header="x-kubetune-version") == "int8"


def test_unknown_override_names_the_header_and_the_known_versions() -> None:
    router = Router([("tuned", 80), ("int8", 20)])
    with pytest.raises(UnknownVersionError) as raised:
        router.choose("u", override="fp16", override_header="x-kubetune-version")
    assert str(raised.value) == (
        "header x-kubetune-version: 'fp16' is not a version of this deployment (known versions: tuned, int8)"
    )


def test_a_router_needs_a_positive_weight() -> None:
    with pytest.raises(ValueError, match="weight above 0"):
        Router([("a", 0)])
    with pytest.raises(ValueError, match="at least one version"):
        Router([])


def test_an_unavailable_version_gives_its_users_to_the_others_and_gets_them_back() -> None:
    router = Router([("a", 50), ("b", 30), ("c", 20)])
    before = assignments(router)
    while_c_is_down = {user: router.sticky(user, frozenset({"c"})) for user in USERS}
    # the same users move as when c is removed, and they come back once it is available again
    assert while_c_is_down == assignments(Router([("a", 50), ("b", 30)]))
    assert assignments(router) == before
    spread = Counter(router.choose(None, unavailable=frozenset({"a", "c"})) for _ in range(200))
    assert set(spread) == {"b"}


def test_no_available_version_is_said_so_but_a_pin_is_still_returned() -> None:
    router = Router([("a", 50), ("b", 50), ("z", 0)])
    with pytest.raises(NoVersionAvailable):
        router.choose("user-1", unavailable=frozenset({"a", "b"}))
    with pytest.raises(NoVersionAvailable):
        router.choose(None, unavailable=frozenset({"a", "b"}))
    # a pinned request names its version; whether it is ready is the gateway's to judge
    assert router.choose("user-1", override="a", unavailable=frozenset({"a"})) == "a"
