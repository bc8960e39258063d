"""API keys of a ModelDeployment: created and revoked by ``kubetune keys``, checked by its gateway.

A key is ``kt-<id>_<secret>``: the id (public, 12 hex digits) finds the record, the secret (256
random bits, URL-safe base64) proves possession. Only ``sha256(salt || secret)`` is stored. A slow
password hash (scrypt, argon2) exists to make guessing low-entropy passwords expensive; a 256-bit
random secret cannot be guessed, so a fast hash loses nothing and keeps the check in the
microseconds every request pays. The salt keeps equal secrets (there are none in practice) from
showing in the file and ties a hash to its record.

The key file (JSON: ``{"keys": [record, ...]}``) lives under ``$KUBETUNE_HOME/access/<namespace>/
<name>/keys.json`` locally and in the deployment's key Secret (key ``keys.json``) on a cluster; it is
replaced atomically on every change and the gateway re-reads it within ``KEY_RELOAD_SECONDS`` (on a
cluster the gateway watches the Secret: :mod:`kubetune.gateway.access.key_watch`).
Revoked keys stay in the file (``revoked`` set), so their ids are never reused and the file keeps
saying authentication is on.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from kubetune.common.files import write_json_atomically

KEY_PREFIX = "kt-"
KEY_FILE_NAME = "keys.json"
SIGNING_KEY_FILE_NAME = "signing.key"
KEY_RELOAD_SECONDS = 1.0
ID_HEX_DIGITS = 12
SECRET_BYTES = 32


class Scope(StrEnum):
    """What a key may do. ``admin`` is every scope, written out so that it is never implied."""

    INFERENCE = "inference"  # completions, chat completions, models
    FEEDBACK = "feedback"  # POST /v1/feedback
    EXPERIMENTS = "experiments"  # GET /v1/experiments (read)
    ADMIN = "admin"  # all of the above


SCOPE_NAMES = ", ".join(scope.value for scope in Scope)


class KeyFileError(ValueError):
    """A key file that cannot be read or is not a valid key file; the message names the field."""


def parse_scopes(text: str) -> frozenset[Scope]:
    """``inference,feedback`` -> the scopes; ValueError naming an unknown one."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError(f"scopes: give at least one of {SCOPE_NAMES}")
    unknown = [name for name in names if name not in Scope.__members__.values()]
    if unknown:
        raise ValueError(f"scopes: unknown scope(s) {', '.join(unknown)} (known: {SCOPE_NAMES})")
    return frozenset(Scope(name) for name in names)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _digest(salt: bytes, secret: str) -> str:
    return hashlib.sha256(salt + secret.encode()).hexdigest()


@dataclass(frozen=True)
class KeyRecord:
    """One key as stored: never the secret, only its salted hash."""

    id: str
    tenant: str
    scopes: frozenset[Scope]
    created: str
    salt: str  # hex
    hash: str  # hex sha256(salt || secret)
    revoked: str | None = None
    description: str = ""

    def allows(self, scope: Scope) -> bool:
        return scope in self.scopes or Scope.ADMIN in self.scopes

    def matches(self, secret: str) -> bool:
        return hmac.compare_digest(_digest(bytes.fromhex(self.salt), secret), self.hash)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "tenant": self.tenant,
            "scopes": sorted(scope.value for scope in self.scopes),
            "created": self.created,
            "revoked": self.revoked,
            "description": self.description,
            "salt": self.salt,
            "hash": self.hash,
        }

    @classmethod
    def from_json(cls, document: Any, where: str) -> KeyRecord:
        if not isinstance(document, dict):
            raise KeyFileError(f"{where}: must be an object")
        values: dict[str, Any] = {}
        for name in ("id", "tenant", "created", "salt", "hash"):
            value = document.get(name)
            if not isinstance(value, str) or not value:
                raise KeyFileError(f"{where}.{name}: must be a non-empty string")
            values[name] = value
        scopes = document.get("scopes")
        if not isinstance(scopes, list) or not all(isinstance(scope, str) for scope in scopes):
            raise KeyFileError(f"{where}.scopes: must be a list of scope names ({SCOPE_NAMES})")
        try:
            parsed_scopes = parse_scopes(",".join(scopes))
        except ValueError as exc:
            raise KeyFileError(f"{where}.{exc}") from exc
        revoked = document.get("revoked")
        if revoked is not None and not isinstance(revoked, str):
            raise KeyFileError(f"{where}.revoked: must be a timestamp string or null")
        try:
            bytes.fromhex(values["salt"])
        except ValueError as exc:
            raise KeyFileError(f"{where}.salt: must be hex") from exc
        return cls(
            scopes=parsed_scopes,
            revoked=revoked,
            description=str(document.get("description") or ""),
            **values,
        )


@dataclass(frozen=True)
class CreatedKey:
    record: KeyRecord
    token: str  # shown once, never stored


@dataclass(frozen=True)
class KeySet:
    """The keys of one deployment, by id."""

    records: Mapping[str, KeyRecord] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.records

    def lookup(self, token: str) -> KeyRecord | None:
        """The live (not revoked) record ``token`` proves, or None."""
        key_id, secret = split_token(token)
        if key_id is None:
            return None
        record = self.records.get(key_id)
        if record is None or record.revoked is not None or not record.matches(secret):
            return None
        return record

    def to_json(self) -> dict[str, Any]:
        return {"keys": [record.to_json() for record in self.records.values()]}

    def to_json_text(self) -> str:
        """The key file's text, as a Secret holds it."""
        return json.dumps(self.to_json(), indent=2) + "\n"

    @classmethod
    def parse(cls, text: str | bytes, source: str) -> KeySet:
        try:
            document = json.loads(text)
        except ValueError as exc:
            raise KeyFileError(f"{source}: not valid JSON: {exc}") from exc
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise KeyFileError(f'{source}: must be a JSON object {{"keys": [...]}}')
        records: dict[str, KeyRecord] = {}
        for index, item in enumerate(document["keys"]):
            record = KeyRecord.from_json(item, f"{source}: keys[{index}]")
            if record.id in records:
                raise KeyFileError(f"{source}: keys[{index}].id: {record.id!r} is repeated")
            records[record.id] = record
        return cls(records)


def split_token(token: str) -> tuple[str | None, str]:
    """(key id, secret) of a ``kt-<id>_<secret>`` token; (None, "") when it has another shape."""
    if not token.startswith(KEY_PREFIX):
        return None, ""
    key_id, separator, secret = token[len(KEY_PREFIX) :].partition("_")
    if not separator or len(key_id) != ID_HEX_DIGITS or not secret:
        return None, ""
    return key_id, secret


def new_key(
    tenant: str, scopes: Iterable[Scope], existing: Iterable[str] = (), description: str = ""
) -> CreatedKey:
    taken = set(existing)
    key_id = secrets.token_hex(ID_HEX_DIGITS // 2)
    while key_id in taken:
        key_id = secrets.token_hex(ID_HEX_DIGITS // 2)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(SECRET_BYTES)).rstrip(b"=").decode()
    salt = secrets.token_bytes(16)
    record = KeyRecord(
        id=key_id,
        tenant=tenant,
        scopes=frozenset(scopes),
        created=_now(),
        salt=salt.hex(),
        hash=_digest(salt, secret),
        description=description,
    )
    return CreatedKey(record, f"{KEY_PREFIX}{key_id}_{secret}")


def access_directory(home: Path, namespace: str, name: str) -> Path:
    """Where a local deployment's keys and feedback signing key live."""
    return home / "access" / namespace / name


def read_key_file(path: Path) -> KeySet:
    """The keys in ``path``; no keys when it does not exist."""
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return KeySet()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the key file: {exc.strerror or exc}") from exc
    return KeySet.parse(text, str(path))


def write_key_file(path: Path, keys: KeySet) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_json_atomically(path, keys.to_json())
    os.chmod(path, 0o600)


def create_key(path: Path, tenant: str, scopes: Iterable[Scope], description: str = "") -> CreatedKey:
    """Add a new key to the file at ``path`` (created when missing) and return it with its token."""
    if not tenant or not tenant.strip():
        raise ValueError("tenant: must not be empty")
    keys = read_key_file(path)
    created = new_key(tenant, scopes, keys.records.keys(), description)
    write_key_file(path, KeySet({**keys.records, created.record.id: created.record}))
    return created


def revoke_key(path: Path, key_id: str) -> KeyRecord:
    """Mark ``key_id`` revoked (kept in the file); KeyError naming the known ids when it is not there."""
    keys = read_key_file(path)
    record = keys.records.get(key_id)
    if record is None:
        known = ", ".join(keys.records) or "none"
        raise KeyError(f"no key {key_id!r} in {path} (known: {known})")
    if record.revoked is not None:
        return record
    revoked = revoked_record(record)
    write_key_file(path, KeySet({**keys.records, key_id: revoked}))
    return revoked


def revoked_record(record: KeyRecord) -> KeyRecord:
    """``record`` revoked now."""
    return KeyRecord(**{**record.__dict__, "revoked": _now()})


def load_or_create_signing_key(path: Path) -> bytes:
    """The HMAC key that signs response ids (so any replica accepts feedback on them); created once."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(secrets.token_bytes(32))
    os.chmod(tmp, 0o600)
    try:
        os.link(tmp, path)  # never replaces one a concurrent caller wrote first
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_bytes()
