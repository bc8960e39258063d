"""Which keys the gateway holds when its key Secret is watched: the watched Secret over its mounted
copy, no key at all once the Secret is gone, the last good keys on a bad Secret, and the mounted copy
again only after the watch has failed for long (the watch itself runs against a real API server in
tests/realcluster/test_gateway_key_secret.py)."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from kubetune.gateway.access import control
from kubetune.gateway.access.control import KeyRing
from kubetune.gateway.access.key_watch import SecretContent, secret_content
from kubetune.gateway.access.keys import KeySet, Scope, create_key, new_key

SOURCE = "Secret team-a/bot-gateway-access"


def _content(keys: KeySet, signing_key: bytes | None = None) -> SecretContent:
    return SecretContent(keys.to_json_text().encode(), signing_key)


def test_the_watched_secret_replaces_the_mounted_copy(tmp_path: Path) -> None:
    mounted = tmp_path / "keys.json"
    stale = create_key(mounted, "team-a", [Scope.INFERENCE])  # revoked since, the mount not yet updated
    ring = KeyRing(mounted)
    assert ring.current().lookup(stale.token) is not None  # the start state: the mounted copy

    fresh = new_key("team-b", [Scope.INFERENCE])
    ring.watched_secret(_content(KeySet({fresh.record.id: fresh.record})), SOURCE)
    assert ring.current().lookup(fresh.token) is not None
    assert ring.current().lookup(stale.token) is None


def test_a_deleted_or_keyless_secret_leaves_no_valid_key(tmp_path: Path) -> None:
    mounted = tmp_path / "keys.json"
    created = create_key(mounted, "team-a", [Scope.INFERENCE])
    ring = KeyRing(mounted)
    ring.watched_secret(None, SOURCE)
    assert ring.current().empty and ring.current().lookup(created.token) is None
    ring.watched_secret(SecretContent(None, b"signing"), SOURCE)
    assert ring.current().empty


def test_a_bad_key_file_in_the_secret_keeps_the_last_good_keys_and_says_why() -> None:
    ring = KeyRing(None)
    good = new_key("team-a", [Scope.INFERENCE])
    ring.watched_secret(_content(KeySet({good.record.id: good.record})), SOURCE)
    ring.watched_secret(SecretContent(b"{not json", None), SOURCE)
    assert ring.current().lookup(good.token) is not None
    assert ring.error is not None and ring.error.startswith(f"{SOURCE}: keys.json: not valid JSON")


def test_a_failing_watch_keeps_its_keys_until_the_mount_has_caught_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mounted = tmp_path / "keys.json"
    in_mount = create_key(mounted, "team-a", [Scope.INFERENCE])
    ring = KeyRing(mounted)
    watched = new_key("team-b", [Scope.INFERENCE])
    ring.watched_secret(_content(KeySet({watched.record.id: watched.record})), SOURCE)

    ring.watch_failed("cannot watch the key Secret: ConnectError")
    assert ring.current().lookup(watched.token) is not None  # a reconnecting watch is still trusted
    assert ring.watch_error == "cannot watch the key Secret: ConnectError"

    monkeypatch.setattr(control, "WATCH_FALLBACK_SECONDS", 0.0)
    assert ring.current().lookup(in_mount.token) is not None  # failed for long: the mounted copy
    assert ring.current().lookup(watched.token) is None

    ring.watched_secret(_content(KeySet({watched.record.id: watched.record})), SOURCE)  # back again
    assert ring.watch_error is None and ring.current().lookup(watched.token) is not None


def test_a_secrets_data_is_decoded_and_its_signing_key_kept() -> None:
    keys = KeySet()
    data = {
        "keys.json": base64.b64encode(keys.to_json_text().encode()).decode(),
        "signing.key": base64.b64encode(b"\x00\x01signing").decode(),
    }
    content = secret_content(data)
    assert content == SecretContent(keys.to_json_text().encode(), b"\x00\x01signing")
    assert secret_content(None) == SecretContent(None, None)
    ring = KeyRing(None)
    ring.watched_secret(content, SOURCE)
    assert ring.watched_signing_key == b"\x00\x01signing"
