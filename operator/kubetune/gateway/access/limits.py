"""Rate limits and budgets per key and per tenant, in Redis (shared by gateway replicas) or in process.

Two kinds of rule, each on one counter:

- a *rate* (requests or tokens per minute) is a token bucket holding up to ``limit``, refilled at
  ``limit / 60`` per second, so a burst of ``limit`` passes and then the steady rate; it has no
  window edge where twice the limit passes;
- a *budget* (tokens or cost per UTC day or month) is a counter of the calendar window, expiring
  with it.

A request is *admitted* when every rule of its key and tenant has room (a request rate needs one
request's room, every other rule needs to be not yet exhausted), and the request rates are debited
at once, all in one step. When the answer is known it is *charged*: its tokens (prompt +
completion, as generated, streams included) and cost are debited from the token rates and added to
the budgets, which may then overshoot by that one answer; the next request is refused.

In Redis each step is one Lua script (EVALSHA; Redis runs a script atomically, so replicas never
read-modify-write a counter between them), and the clock is the Redis server's (``TIME``), so the
replicas' clocks do not matter. The in-process store runs the same steps on the event loop's
thread, where nothing interleaves with them.
"""

from __future__ import annotations

import datetime
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from kubetune.gateway.config import LimitsConfig, RateLimits

SECONDS_PER_MINUTE = 60.0
EXPIRY_MARGIN_SECONDS = 3600  # a budget counter outlives its window a little, never forever


class RuleKind(StrEnum):
    RATE = "rate"
    BUDGET = "budget"


class Measure(StrEnum):
    REQUESTS = "requests"
    TOKENS = "tokens"
    COST = "cost"


@dataclass(frozen=True)
class Rule:
    """One limit on one subject (``key:<id>`` or ``tenant:<name>``)."""

    subject: str
    name: str  # the limit's field name, e.g. requestsPerMinute
    kind: RuleKind
    measure: Measure
    limit: float
    window: str = ""  # a budget's window id, e.g. 2026-12-02; part of its counter's name
    window_ends_in: float = 0.0  # seconds until a budget's window ends

    def counter(self, prefix: str) -> str:
        suffix = f":{self.window}" if self.window else ""
        return f"{prefix}:{self.subject}:{self.name}{suffix}"

    def admit_amount(self) -> float:
        return 1.0 if self.measure is Measure.REQUESTS else 0.0


@dataclass(frozen=True)
class Refusal:
    rule: Rule
    retry_after_seconds: int

    @property
    def is_budget(self) -> bool:
        return self.rule.kind is RuleKind.BUDGET


class LimitStoreUnavailable(RuntimeError):
    """The limit store (Redis) could not be asked; the message says why, for the log and /healthz."""


def _window_end(now: datetime.datetime, period: str) -> tuple[str, float]:
    if period == "day":
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        end = start + datetime.timedelta(days=1)
        window = start.strftime("%Y-%m-%d")
    else:
        start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = (start + datetime.timedelta(days=32)).replace(day=1)
        window = start.strftime("%Y-%m")
    return window, (end - now).total_seconds()


def rules_for(subject: str, limits: RateLimits, now: datetime.datetime) -> list[Rule]:
    """The rules ``limits`` sets on ``subject`` at ``now`` (UTC)."""
    rules: list[Rule] = []
    if limits.requests_per_minute is not None:
        rules.append(
            Rule(subject, "requestsPerMinute", RuleKind.RATE, Measure.REQUESTS, limits.requests_per_minute)
        )
    if limits.tokens_per_minute is not None:
        rules.append(
            Rule(subject, "tokensPerMinute", RuleKind.RATE, Measure.TOKENS, limits.tokens_per_minute)
        )
    budgets = (
        ("tokensPerDay", Measure.TOKENS, limits.tokens_per_day, "day"),
        ("tokensPerMonth", Measure.TOKENS, limits.tokens_per_month, "month"),
        ("costPerDay", Measure.COST, limits.cost_per_day, "day"),
        ("costPerMonth", Measure.COST, limits.cost_per_month, "month"),
    )
    for name, measure, limit, period in budgets:
        if limit is not None:
            window, ends_in = _window_end(now, period)
            rules.append(Rule(subject, name, RuleKind.BUDGET, measure, float(limit), window, ends_in))
    return rules


def principal_rules(config: LimitsConfig, key_id: str, tenant: str) -> list[Rule]:
    """Every rule that applies to a request with key ``key_id`` of ``tenant``."""
    now = datetime.datetime.now(datetime.UTC)
    tenant_limits = config.tenants.get(tenant, config.per_tenant)
    return rules_for(f"key:{key_id}", config.per_key, now) + rules_for(f"tenant:{tenant}", tenant_limits, now)


def _charge_amount(rule: Rule, tokens: int, cost: float) -> float:
    if rule.measure is Measure.TOKENS:
        return float(tokens)
    if rule.measure is Measure.COST:
        return cost
    return 0.0


class LimitStore(Protocol):
    async def admit(self, rules: list[Rule]) -> Refusal | None: ...

    async def charge(self, rules: list[Rule], tokens: int, cost: float) -> None: ...

    async def first_time(self, name: str, ttl_seconds: int) -> bool:
        """True the first time ``name`` is marked (within ``ttl_seconds``), False after."""
        ...

    async def close(self) -> None: ...


# ARGV[1] = "admit" | "charge"; then per rule (KEYS[i]): kind, limit, amount, expiry seconds.
# Returns {1} when admitted (or charged), {0, i, retry_ms} naming the first rule without room.
_LIMIT_SCRIPT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local mode = ARGV[1]
local levels = {}
for i = 1, #KEYS do
  local base = 2 + (i - 1) * 4
  local kind, limit = ARGV[base], tonumber(ARGV[base + 1])
  local amount = tonumber(ARGV[base + 2])
  if kind == 'rate' then
    local state = redis.call('HMGET', KEYS[i], 'level', 'at')
    local level, at = tonumber(state[1]), tonumber(state[2])
    if level == nil then level, at = limit, now end
    level = math.min(limit, level + math.max(0, now - at) * limit / 60)
    levels[i] = level
    if mode == 'admit' then
      local needed = amount > 0 and amount or 1e-9
      if level < needed then
        return {0, i, math.ceil((needed - level) / (limit / 60) * 1000)}
      end
    end
  else
    local used = tonumber(redis.call('GET', KEYS[i]) or '0')
    levels[i] = used
    if mode == 'admit' and used >= limit then
      return {0, i, math.ceil(tonumber(ARGV[base + 3]) * 1000)}
    end
  end
end
for i = 1, #KEYS do
  local base = 2 + (i - 1) * 4
  local kind, limit = ARGV[base], tonumber(ARGV[base + 1])
  local amount, expiry = tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3])
  if kind == 'rate' then
    redis.call('HSET', KEYS[i], 'level', tostring(levels[i] - amount), 'at', tostring(now))
    redis.call('EXPIRE', KEYS[i], 120)
  elseif amount > 0 then
    redis.call('INCRBYFLOAT', KEYS[i], amount)
    redis.call('EXPIRE', KEYS[i], math.ceil(expiry))
  end
end
return {1}
"""


def _retry_seconds(milliseconds: float) -> int:
    return max(1, math.ceil(milliseconds / 1000))


class RedisLimitStore:
    """Counters in Redis, shared by every gateway replica that names the same server and prefix."""

    def __init__(
        self,
        url: str,
        prefix: str,
        timeout_seconds: float,
        password: str | None = None,
        unusable: str | None = None,
    ) -> None:
        self.prefix = prefix
        # why this store must not be asked at all (its password is missing): every call says so
        self.unusable = unusable
        self.client = aioredis.Redis.from_url(
            url,
            password=password,
            socket_timeout=timeout_seconds,
            socket_connect_timeout=timeout_seconds,
            retry_on_timeout=False,
        )
        self.script = self.client.register_script(_LIMIT_SCRIPT)

    def _check_usable(self) -> None:
        if self.unusable is not None:
            raise LimitStoreUnavailable(f"the limit store (Redis) cannot be used: {self.unusable}")

    async def _run(self, mode: str, rules: list[Rule], amounts: list[float]) -> list[int]:
        self._check_usable()
        keys = [rule.counter(self.prefix) for rule in rules]
        args: list[str | float] = [mode]
        for rule, amount in zip(rules, amounts, strict=True):
            args += [rule.kind.value, rule.limit, amount, rule.window_ends_in + EXPIRY_MARGIN_SECONDS]
        try:
            result = await self.script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise LimitStoreUnavailable(
                f"the limit store (Redis) failed: {type(exc).__name__}: {exc}"
            ) from exc
        return [int(value) for value in result]

    async def admit(self, rules: list[Rule]) -> Refusal | None:
        if not rules:
            return None
        result = await self._run("admit", rules, [rule.admit_amount() for rule in rules])
        if result[0] == 1:
            return None
        rule = rules[result[1] - 1]
        retry_ms = result[2] if rule.kind is RuleKind.RATE else rule.window_ends_in * 1000
        return Refusal(rule, _retry_seconds(retry_ms))

    async def charge(self, rules: list[Rule], tokens: int, cost: float) -> None:
        amounts = [_charge_amount(rule, tokens, cost) for rule in rules]
        if any(amounts):
            await self._run("charge", rules, amounts)

    async def first_time(self, name: str, ttl_seconds: int) -> bool:
        self._check_usable()
        try:
            marked = await self.client.set(f"{self.prefix}:{name}", b"1", nx=True, ex=ttl_seconds)
        except (RedisError, OSError) as exc:
            raise LimitStoreUnavailable(
                f"the limit store (Redis) failed: {type(exc).__name__}: {exc}"
            ) from exc
        return bool(marked)

    async def ping(self) -> None:
        self._check_usable()
        try:
            await self.client.ping()
        except (RedisError, OSError) as exc:
            raise LimitStoreUnavailable(
                f"the limit store (Redis) failed: {type(exc).__name__}: {exc}"
            ) from exc

    async def close(self) -> None:
        await self.client.aclose()


@dataclass
class _Bucket:
    level: float
    at: float


class LocalLimitStore:
    """The same rules in this process (one gateway, no Redis). Steps never await, so they are atomic."""

    def __init__(self, remembered: int = 100_000) -> None:
        self._buckets: dict[str, _Bucket] = {}
        self._used: dict[str, float] = {}
        self._marked: OrderedDict[str, float] = OrderedDict()
        self._remembered = remembered

    def _level(self, rule: Rule, now: float) -> _Bucket:
        key = rule.counter("local")
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(rule.limit, now)
        bucket.level = min(
            rule.limit, bucket.level + max(0.0, now - bucket.at) * rule.limit / SECONDS_PER_MINUTE
        )
        bucket.at = now
        return bucket

    async def admit(self, rules: list[Rule]) -> Refusal | None:
        now = time.monotonic()
        for rule in rules:
            if rule.kind is RuleKind.RATE:
                level = self._level(rule, now).level
                needed = rule.admit_amount() or 1e-9
                if level < needed:
                    retry_ms = (needed - level) / (rule.limit / SECONDS_PER_MINUTE) * 1000
                    return Refusal(rule, _retry_seconds(retry_ms))
            elif self._used.get(rule.counter("local"), 0.0) >= rule.limit:
                return Refusal(rule, _retry_seconds(rule.window_ends_in * 1000))
        for rule in rules:
            if rule.kind is RuleKind.RATE:
                self._level(rule, now).level -= rule.admit_amount()
        return None

    async def charge(self, rules: list[Rule], tokens: int, cost: float) -> None:
        now = time.monotonic()
        for rule in rules:
            amount = _charge_amount(rule, tokens, cost)
            if not amount:
                continue
            if rule.kind is RuleKind.RATE:
                self._level(rule, now).level -= amount
            else:
                key = rule.counter("local")
                self._used[key] = self._used.get(key, 0.0) + amount

    async def first_time(self, name: str, ttl_seconds: int) -> bool:
        now = time.monotonic()
        expires = self._marked.get(name)
        if expires is not None and expires > now:
            return False
        self._marked[name] = now + ttl_seconds
        self._marked.move_to_end(name)
        if len(self._marked) > self._remembered:
            self._marked.popitem(last=False)
        return True

    async def close(self) -> None:
        return None
