"""Content the gateway keeps: prompts and completions for the audit log (``access.audit.logContent``) and
for the completions that receive feedback (``spec.feedback.capture``), always PII-redacted.

Redaction: the text goes through Presidio (kubetune_guardrails.pii) with the entities of
``spec.guardrails.pii`` when the deployment has one, else with every supported entity: content is never
kept unredacted, whatever the guards' modes (an input guard in ``flag`` mode serves the text unchanged,
but the log still gets it redacted). The prompt is the client's (its messages, or its prompt), before the
deployment's prompt template and spotlighting; the completion is the first choice's text as the client
got it (after the output guards; a stream's text as it was sent).

Capture: a served completion's content is held for ``window`` seconds under its (signed) response id;
feedback on it within that time moves it, with the score, to the rated records, of which at most
``maxRecords`` no older than ``maxAge`` are kept. With Redis configured (``access.store.redisUrl``) both
live there, so feedback on any replica finds the content any replica held; otherwise the held content is
this process's and the rated records are a JSON-lines file (``path``; locally under $KUBETUNE_HOME) or,
without one, this process's memory. ``GET /v1/feedback/records`` (scope ``admin``) returns the rated
records; ``kubetune feedback export`` turns them into a KTO or preference dataset (:func:`kto_rows`,
:func:`preference_rows`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from kubetune.gateway.config import FeedbackCaptureConfig, GatewayConfig
from kubetune_contract.guardrails import PII_ENTITIES

log = logging.getLogger(__name__)

FEEDBACK_FILE_NAME = "feedback.jsonl"
GOOD_SCORE = 0.5
"""Feedback scores at or above this are good (KTO label true), below it bad."""
EXPORT_FORMATS = ("kto", "preference")


class ContentRedactor:
    """Redacts the prompts and completions the gateway keeps; the analyzer is built once (a second or two)."""

    def __init__(self, entities: Iterable[str]) -> None:
        from kubetune_guardrails.pii import pii_detector

        self._detector = pii_detector(entities)

    @classmethod
    def for_config(cls, config: GatewayConfig) -> ContentRedactor | None:
        """The redactor ``config`` needs: None when it keeps no content."""
        audit = config.access.audit
        if not (audit.enabled and audit.log_content) and not config.feedback.capture:
            return None
        pii = config.guardrails.pii if config.guardrails is not None else None
        return cls(pii.entities if pii is not None else PII_ENTITIES)

    def text(self, text: str) -> str:
        return self._detector.redact(text).text

    def prompt(self, endpoint_is_chat: bool, body: dict[str, Any]) -> Any:
        """The request's prompt, redacted: chat messages as ``[{role, content}]`` (text parts joined),
        a completion's prompt as its string (or list of strings)."""
        if not endpoint_is_chat:
            prompt = body.get("prompt")
            if isinstance(prompt, list):
                return [self.text(item) if isinstance(item, str) else item for item in prompt]
            return self.text(prompt) if isinstance(prompt, str) else prompt
        messages = []
        for message in body.get("messages") or []:
            if not isinstance(message, dict):
                continue
            content = message.get("content")
            if isinstance(content, list):
                texts = [
                    part["text"]
                    for part in content
                    if isinstance(part, dict) and isinstance(part.get("text"), str)
                ]
                content = "\n".join(texts)
            messages.append(
                {
                    "role": str(message.get("role")),
                    "content": self.text(content) if isinstance(content, str) else "",
                }
            )
        return messages


def answer_text(body: dict[str, Any]) -> str | None:
    """The first choice's text of a completion or chat completion body."""
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    choice = choices[0]
    message = choice.get("message")
    if isinstance(message, dict):
        content = message.get("content")
        return content if isinstance(content, str) else None
    text = choice.get("text")
    return text if isinstance(text, str) else None


class SentText:
    """The first choice's text of a stream, collected from the chunks as they are sent to the client."""

    def __init__(self) -> None:
        self._parts: list[str] = []

    def add(self, chunk: dict[str, Any]) -> None:
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            piece = delta.get("content") if isinstance(delta, dict) else choice.get("text")
            if isinstance(piece, str):
                self._parts.append(piece)

    @property
    def text(self) -> str:
        return "".join(self._parts)


class CaptureUnavailable(Exception):
    """The capture store (Redis) could not be asked."""


class CaptureStore(Protocol):
    async def hold(self, record: dict[str, Any]) -> None:
        """Keep a served completion's content (``record["id"]`` its response id) for the window."""

    async def rate(self, response_id: str, score: float) -> bool:
        """Move the held content of ``response_id`` to the rated records; False when none is held."""

    async def rated(self) -> list[dict[str, Any]]:
        """The rated records kept, oldest first."""


def _now() -> float:
    return time.time()


class LocalCaptureStore:
    """Held content in this process's memory; rated records in a JSON-lines file (or memory)."""

    def __init__(self, settings: FeedbackCaptureConfig) -> None:
        self.settings = settings
        self.path = Path(settings.path) if settings.path is not None else None
        self._held: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._rated: list[dict[str, Any]] = self._load()
        self._appended = 0

    def _load(self) -> list[dict[str, Any]]:
        if self.path is None or not self.path.exists():
            return []
        records = []
        for number, line in enumerate(self.path.read_text().splitlines(), start=1):
            try:
                record = json.loads(line)
            except ValueError:
                log.warning("%s:%d is not a feedback record (skipped)", self.path, number)
                continue
            if isinstance(record, dict):
                records.append(record)
        return self._bounded(records)

    def _bounded(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        oldest = _now() - self.settings.max_age_seconds
        kept = [r for r in records if isinstance(r.get("ratedAt"), int | float) and r["ratedAt"] >= oldest]
        return kept[-self.settings.max_records :]

    async def hold(self, record: dict[str, Any]) -> None:
        now = _now()
        self._held[record["id"]] = {**record, "heldUntil": now + self.settings.window_seconds}
        while self._held:
            first = next(iter(self._held.values()))
            if len(self._held) <= self.settings.max_records and first["heldUntil"] >= now:
                break
            self._held.popitem(last=False)

    async def rate(self, response_id: str, score: float) -> bool:
        held = self._held.pop(response_id, None)
        if held is None or held.pop("heldUntil") < _now():
            return False
        record = {**held, "score": score, "ratedAt": _now()}
        self._rated.append(record)
        before = len(self._rated)
        self._rated = self._bounded(self._rated)
        if self.path is not None:
            self._appended += 1
            if len(self._rated) < before or self._appended > self.settings.max_records:
                self._rewrite()
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a") as file:
                    file.write(json.dumps(record, ensure_ascii=False) + "\n")
        return True

    def _rewrite(self) -> None:
        """The kept records written anew (a new file swapped in: never half a file)."""
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self._rated))
        os.replace(tmp, self.path)
        self._appended = 0

    async def rated(self) -> list[dict[str, Any]]:
        self._rated = self._bounded(self._rated)
        return list(self._rated)


class RedisCaptureStore:
    """Held content as keys expiring after the window; rated records in a sorted set by rating time,
    trimmed to maxRecords and maxAge in the transaction that adds one."""

    def __init__(self, client: Redis, prefix: str, settings: FeedbackCaptureConfig) -> None:
        self.client = client
        self.settings = settings
        self._held_prefix = f"{prefix}:capture:held:"
        self._rated_key = f"{prefix}:capture:rated"

    async def hold(self, record: dict[str, Any]) -> None:
        window = max(1, round(self.settings.window_seconds))
        try:
            await self.client.set(self._held_prefix + record["id"], json.dumps(record), ex=window)
        except (RedisError, OSError) as exc:
            raise CaptureUnavailable(
                f"the capture store (Redis) failed: {type(exc).__name__}: {exc}"
            ) from exc

    async def rate(self, response_id: str, score: float) -> bool:
        try:
            held = await self.client.getdel(self._held_prefix + response_id)
            if held is None:
                return False
            now = _now()
            record = {**json.loads(held), "score": score, "ratedAt": now}
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.zadd(self._rated_key, {json.dumps(record, ensure_ascii=False): now})
                pipe.zremrangebyscore(self._rated_key, "-inf", now - self.settings.max_age_seconds)
                pipe.zremrangebyrank(self._rated_key, 0, -(self.settings.max_records + 1))
                pipe.expire(self._rated_key, max(1, round(self.settings.max_age_seconds)))
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise CaptureUnavailable(
                f"the capture store (Redis) failed: {type(exc).__name__}: {exc}"
            ) from exc
        return True

    async def rated(self) -> list[dict[str, Any]]:
        try:
            await self.client.zremrangebyscore(
                self._rated_key, "-inf", _now() - self.settings.max_age_seconds
            )
            members = await self.client.zrange(self._rated_key, 0, -1)
        except (RedisError, OSError) as exc:
            raise CaptureUnavailable(
                f"the capture store (Redis) failed: {type(exc).__name__}: {exc}"
            ) from exc
        return [json.loads(member) for member in members if isinstance(member, bytes | str)]


class FeedbackCapture:
    """``spec.feedback.capture`` of one gateway process: holds served content, keeps it when rated."""

    def __init__(self, settings: FeedbackCaptureConfig, shared: tuple[Redis, str] | None) -> None:
        self.settings = settings
        self.shared = shared
        self.store: CaptureStore | None = None
        if settings.capture:
            self.store = (
                RedisCaptureStore(shared[0], shared[1], settings)
                if shared is not None
                else LocalCaptureStore(settings)
            )

    @property
    def on(self) -> bool:
        return self.store is not None

    async def hold(self, response_id: str, version: str, endpoint: str, prompt: Any, completion: str) -> None:
        """Hold a served completion's (redacted) content; a store failure is logged, the answer stands."""
        if self.store is None:
            return
        record = {
            "id": response_id,
            "version": version,
            "endpoint": endpoint,
            "prompt": prompt,
            "completion": completion,
            "time": _now(),
        }
        try:
            await self.store.hold(record)
        except CaptureUnavailable as exc:
            log.error("%s; the content of %s is not kept for feedback", exc, response_id)

    async def rate(self, response_id: str, score: float) -> None:
        """Keep the rated completion's content; feedback without held content is still feedback."""
        if self.store is None:
            return
        try:
            kept = await self.store.rate(response_id, score)
        except CaptureUnavailable as exc:
            log.error("%s; the content of %s is not kept with its feedback", exc, response_id)
            return
        if not kept:
            log.info(
                "feedback on %s: no content held for it (older than feedback.window, or served before "
                "capture was on)",
                response_id,
            )

    async def records(self) -> list[dict[str, Any]]:
        if self.store is None:
            return []
        return await self.store.rated()


# -- datasets ----------------------------------------------------------------------------------


def _completion_field(record: dict[str, Any], text: str) -> Any:
    """A completion in the record's style: a message list for a chat prompt (TRL's conversational
    format), a string for a plain prompt."""
    return [{"role": "assistant", "content": text}] if isinstance(record.get("prompt"), list) else text


def _usable(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        r
        for r in records
        if isinstance(r.get("completion"), str)
        and isinstance(r.get("score"), int | float)
        and isinstance(r.get("prompt"), str | list)
    ]


def kto_rows(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per rated completion: prompt, completion, label (score >= 0.5)."""
    return [
        {
            "prompt": record["prompt"],
            "completion": _completion_field(record, record["completion"]),
            "label": record["score"] >= GOOD_SCORE,
        }
        for record in _usable(records)
    ]


def preference_rows(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pairs of completions of the same prompt with opposite feedback: prompt, chosen, rejected.

    Within a prompt the best-rated good completion is paired with the worst-rated bad one, the next
    with the next, each completion used once; pairs whose texts are equal teach nothing and are left out.
    """
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    for record in _usable(records):
        key = json.dumps(record["prompt"], sort_keys=True, ensure_ascii=False)
        by_prompt.setdefault(key, []).append(record)
    rows = []
    for group in by_prompt.values():
        good = sorted((r for r in group if r["score"] >= GOOD_SCORE), key=lambda r: -r["score"])
        bad = sorted((r for r in group if r["score"] < GOOD_SCORE), key=lambda r: r["score"])
        for chosen, rejected in zip(good, bad, strict=False):
            if chosen["completion"] == rejected["completion"]:
                continue
            rows.append(
                {
                    "prompt": chosen["prompt"],
                    "chosen": _completion_field(chosen, chosen["completion"]),
                    "rejected": _completion_field(rejected, rejected["completion"]),
                }
            )
    return rows


def dataset_rows(records: Iterable[dict[str, Any]], fmt: str) -> list[dict[str, Any]]:
    if fmt == "kto":
        return kto_rows(records)
    if fmt == "preference":
        return preference_rows(records)
    raise ValueError(f"--format: {fmt!r} is not one of {', '.join(EXPORT_FORMATS)}")


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` as JSON lines, whole or not at all (a new file swapped in)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
