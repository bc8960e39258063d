from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from kubetune.gateway.config import (
    ConfigReloader,
    GatewayConfig,
    GatewayConfigError,
    load_gateway_config,
    parse_gateway_config,
)

CONTRACT_EXAMPLE: dict[str, Any] = {
    "deployment": "support-bot",
    "namespace": "default",
    "versions": [
        {
            "name": "tuned",
            "url": "http://127.0.0.1:3001",
            "weight": 80,
            "prompt": "v1",
            "ready": True,
            "pricing": {"inputPerMillion": 0.5, "outputPerMillion": 1.5},
            "modelCard": {
                "markdown": "pvc://artifacts/default/router/v1/MODEL_CARD.md",
                "json": "pvc://artifacts/default/router/v1/model-card.json",
            },
        },
        {
            "name": "int8",
            "url": "http://127.0.0.1:3002",
            "weight": 20,
            "prompt": None,
            "ready": False,
            "pricing": None,
            "modelCard": None,
        },
    ],
    "control": "tuned",
    "routing": {"stickyBy": "user", "header": None, "overrideHeader": "x-kubetune-version"},
    "generation": {
        "defaults": {"temperature": 0.7, "topP": 1.0, "maxTokens": 128},
        "limits": {"maxTemperature": 1.5, "maxTopP": 1.0, "maxTokens": 512},
        "maxPromptTokens": 2048,
    },
    "prompts": [
        {
            "name": "v1",
            "systemParts": [{"name": "role", "text": "..."}, {"name": "format-instructions", "text": None}],
            "system": "...",
            "template": "Ticket: {{input}}",
            "examples": [{"user": "...", "assistant": "..."}],
            "fewShot": {"uri": "/etc/kubetune/pools/support.jsonl", "k": 3, "select": "similar"},
            "reasoning": {"open": "<think>", "close": "</think>"},
            "constitution": {"principles": [{"name": "polite", "text": "Be polite."}], "revise": True},
        }
    ],
    "cache": {"enabled": True, "ttlSeconds": 300, "maxEntries": 1024},
    "fallback": {"version": "tuned", "timeoutSeconds": 30},
    "timeouts": {"connectSeconds": 5, "firstByteSeconds": 60, "responseSeconds": 60, "streamIdleSeconds": 60},
    "health": {"markDownSeconds": 5},
    "scaleFromZero": {"maxHeldRequests": 100, "holdSeconds": 120.0},
    "access": {
        "auth": "required",
        "keysFile": "/etc/kubetune/keys/keys.json",
        "keysSecret": "support-bot-gateway-access",
        "signingKeyFile": "/etc/kubetune/keys/signing.key",
        "limits": {
            "perKey": {
                "requestsPerMinute": 60,
                "tokensPerMinute": 10000,
                "tokensPerDay": None,
                "tokensPerMonth": 1000000,
                "costPerDay": None,
                "costPerMonth": 25.0,
            },
            "perTenant": {
                "requestsPerMinute": None,
                "tokensPerMinute": None,
                "tokensPerDay": 500000,
                "tokensPerMonth": None,
                "costPerDay": None,
                "costPerMonth": None,
            },
            "tenants": {},
        },
        "store": {
            "redisUrl": "redis://kubetune-redis:6379/0",
            "redisPasswordFile": None,
            "redisPasswordSecret": {"name": "redis-auth", "key": "password"},
            "keyPrefix": "kubetune",
            "onUnavailable": "failClosed",
            "timeoutSeconds": 0.25,
        },
        "audit": {"path": None, "stdout": True, "maxBytes": 67108864, "keepFiles": 10, "logContent": False},
    },
    "feedback": {
        "capture": True,
        "maxRecords": 500,
        "maxAgeSeconds": 86400.0,
        "windowSeconds": 600.0,
        "path": None,
    },
    "guardrails": {
        "promptInjection": {"action": "block", "threshold": "0.5", "classifier": None, "spotlighting": "off"},
        "pii": None,
        "output": {"allowedLinkDomains": ["example.com"], "stripHtml": True, "detectPromptLeak": True},
        "moderation": {
            "action": "block",
            "categories": [{"name": "self_harm", "action": "flag", "keywords": [], "patterns": []}],
            "classifier": None,
            "threshold": "0.5",
        },
    },
}


def with_changes(**changes: Any) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(json.dumps(CONTRACT_EXAMPLE))
    document.update(changes)
    return document


def test_contract_example_parses_and_round_trips() -> None:
    config = parse_gateway_config(json.dumps(CONTRACT_EXAMPLE))
    assert config.versions[0].weight == 80
    assert config.generation.defaults.top_p == 1.0
    assert config.cache.ttl_seconds == 300
    assert config.fallback is not None and config.fallback.timeout_seconds == 30
    assert config.control_version == "tuned"
    assert config.prompt_for("tuned") is not None and config.prompt_for("int8") is None
    wire = config.model_dump(by_alias=True, mode="json")
    assert wire == CONTRACT_EXAMPLE
    assert GatewayConfig.model_validate(wire) == config


def test_snake_case_names_are_accepted_too() -> None:
    config = GatewayConfig.model_validate(
        {
            "deployment": "d",
            "versions": [{"name": "a", "url": "http://x:1", "weight": 100}],
            "timeouts": {"stream_idle_seconds": 5},
            "routing": {"sticky_by": "header", "header": "X-User-Id"},
        }
    )
    assert config.timeouts.stream_idle_seconds == 5
    assert config.versions[0].ready  # a version is ready unless the config says otherwise
    assert config.routing.header == "x-user-id"  # header names are compared lowercased
    assert config.control_version == "a"  # default: the first version
    assert config.fallback is None and not config.cache.enabled


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        (with_changes(tenant="x"), "tenant: Extra inputs are not permitted"),
        (with_changes(control="missing"), "control: 'missing' is not a version (known: tuned, int8)"),
        (with_changes(fallback={"version": "nope", "timeoutSeconds": 1}), "fallback.version: 'nope'"),
        (with_changes(fallback={"version": "tuned", "timeoutSeconds": 0}), "fallback.timeoutSeconds"),
        (
            with_changes(timeouts={"connectSeconds": -1}),
            "timeouts.connectSeconds: Input should be greater than 0",
        ),
        (
            with_changes(timeouts={"firstByteSeconds": 0}),
            "timeouts.firstByteSeconds: Input should be greater",
        ),
        (with_changes(timeouts={"responseSeconds": 0}), "timeouts.responseSeconds: Input should be greater"),
        (
            with_changes(timeouts={"streamIdleSeconds": 0}),
            "timeouts.streamIdleSeconds: Input should be greater",
        ),
        (
            with_changes(health={"markDownSeconds": 0}),
            "health.markDownSeconds: Input should be greater than 0",
        ),
        (with_changes(upstreamTimeoutSeconds=60), "upstreamTimeoutSeconds: Extra inputs are not permitted"),
        (with_changes(routing={"stickyBy": "header"}), "header is required when stickyBy is 'header'"),
        (with_changes(routing={"stickyBy": "cookie"}), "routing.stickyBy"),
        (with_changes(routing={"overrideHeader": "bad header"}), "routing.overrideHeader"),
        (with_changes(cache={"enabled": True, "maxEntries": 0}), "cache.maxEntries"),
        (with_changes(prompts=[]), "versions[0].prompt: 'v1' is not in prompts"),
        (
            with_changes(prompts=[{"name": "v1", "template": "no input here"}]),
            "template must contain {{input}}",
        ),
        (
            with_changes(prompts=[{"name": "v1"}, {"name": "v1"}]),
            "prompts: names must be unique, repeated: v1",
        ),
        (
            with_changes(generation={"defaults": {"temperature": 2.0}, "limits": {"maxTemperature": 1.5}}),
            "defaults.temperature 2.0 is above limits.maxTemperature 1.5",
        ),
        (with_changes(generation={"defaults": {"topP": 1.5}}), "generation.defaults.topP"),
        (with_changes(versions=[]), "versions: List should have at least 1 item"),
        (with_changes(generation={"maxPromptTokens": 0}), "generation.maxPromptTokens"),
        (
            with_changes(prompts=[{"name": "v1", "fewShot": {"uri": "p.jsonl", "select": "best"}}]),
            "prompts.0.fewShot.select",
        ),
        (
            with_changes(prompts=[{"name": "v1", "fewShot": {"uri": "p.jsonl", "k": 0}}]),
            "prompts.0.fewShot.k",
        ),
        (
            with_changes(prompts=[{"name": "v1", "fewShot": {"k": 2}}]),
            "prompts.0.fewShot.uri: Field required",
        ),
        (
            with_changes(prompts=[{"name": "v1", "reasoning": {"open": "", "close": "</t>"}}]),
            "prompts.0.reasoning.open",
        ),
    ],
)
def test_invalid_configs_name_the_field(document: dict[str, Any], expected: str) -> None:
    with pytest.raises(GatewayConfigError) as raised:
        parse_gateway_config(json.dumps(document), "gw.json")
    assert str(raised.value).startswith("gw.json: ")
    assert expected in str(raised.value)


@pytest.mark.parametrize(
    ("versions", "expected"),
    [
        (
            [
                {"name": "a", "url": "http://x:1", "weight": 50},
                {"name": "a", "url": "http://x:2", "weight": 50},
            ],
            "versions: names must be unique, repeated: a",
        ),
        ([{"name": "a", "url": "http://x:1", "weight": 0}], "at least one version needs a weight above 0"),
        ([{"name": "a", "url": "http://x:1", "weight": 101}], "versions.0.weight"),
        ([{"name": "Bad_Name", "url": "http://x:1", "weight": 1}], "versions.0.name"),
        ([{"name": "a" * 21, "url": "http://x:1", "weight": 1}], "at most 20 characters"),
        ([{"name": "a", "url": "ftp://x", "weight": 1}], "versions.0.url: Value error, 'ftp://x' must be"),
        ([{"name": "a", "url": "/relative", "weight": 1}], "versions.0.url"),
        ([{"name": "a", "weight": 1}], "versions.0.url: Field required"),
    ],
)
def test_invalid_versions_name_the_field(versions: list[dict[str, Any]], expected: str) -> None:
    with pytest.raises(GatewayConfigError, match="gateway config: ") as raised:
        parse_gateway_config(json.dumps({"deployment": "d", "versions": versions}))
    assert expected in str(raised.value)


def test_url_trailing_slash_is_dropped() -> None:
    config = GatewayConfig.model_validate(
        {"deployment": "d", "versions": [{"name": "a", "url": "http://127.0.0.1:9/", "weight": 1}]}
    )
    assert config.versions[0].url == "http://127.0.0.1:9"


def test_load_reports_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(GatewayConfigError, match=r"missing\.json: cannot read gateway config"):
        load_gateway_config(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(GatewayConfigError, match=r"broken\.json: not valid JSON"):
        load_gateway_config(broken)
    broken.write_text("[1, 2]")
    with pytest.raises(GatewayConfigError, match="must be a JSON object, got list"):
        load_gateway_config(broken)
    good = tmp_path / "gateway.json"
    good.write_text(json.dumps(CONTRACT_EXAMPLE))
    assert load_gateway_config(good).deployment == "support-bot"


def _write(path: Path, document: dict[str, Any], mtime_ns: int) -> None:
    path.write_text(json.dumps(document))
    # An explicit mtime, so two writes within the filesystem's timestamp granularity still differ.
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_reloader_picks_up_changes_and_keeps_the_last_good_config(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "gateway.json"
    _write(path, CONTRACT_EXAMPLE, 1_000_000_000_000_000_000)
    reloader = ConfigReloader(path)
    seen: list[GatewayConfig] = []
    reloader.subscribe(seen.append)
    assert reloader.poll() is False  # unchanged

    reweighted = with_changes(
        versions=[
            {"name": "tuned", "url": "http://127.0.0.1:3001", "weight": 50, "prompt": "v1"},
            {"name": "int8", "url": "http://127.0.0.1:3002", "weight": 50},
        ]
    )
    _write(path, reweighted, 1_000_000_001_000_000_000)
    assert reloader.poll() is True
    assert [v.weight for v in reloader.current.versions] == [50, 50]
    assert seen == [reloader.current]

    with caplog.at_level(logging.ERROR, logger="kubetune.gateway.config"):
        _write(path, with_changes(control="ghost"), 1_000_000_002_000_000_000)
        assert reloader.poll() is False
        assert reloader.poll() is False
    assert [v.weight for v in reloader.current.versions] == [50, 50]
    assert reloader.last_error is not None and "control: 'ghost' is not a version" in reloader.last_error
    assert [r.getMessage() for r in caplog.records].count(
        f"{reloader.last_error}"
    ) == 1  # logged once, not on every poll

    path.unlink()
    assert reloader.poll() is False
    assert reloader.last_error is not None and "cannot stat" in reloader.last_error

    _write(path, CONTRACT_EXAMPLE, 1_000_000_003_000_000_000)
    assert reloader.poll() is True
    assert reloader.last_error is None
    assert [v.weight for v in reloader.current.versions] == [80, 20]
    assert len(seen) == 2


def test_reloader_refuses_a_bad_initial_file(tmp_path: Path) -> None:
    path = tmp_path / "gateway.json"
    path.write_text(json.dumps(with_changes(versions=[])))
    with pytest.raises(GatewayConfigError, match="versions"):
        ConfigReloader(path)


def test_reloader_applies_an_update_that_lands_while_it_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rollout's weight change written just as the gateway reads its first config is applied by
    the next poll, not lost because the reloader thinks it already has that content."""
    path = tmp_path / "gateway.json"
    _write(path, CONTRACT_EXAMPLE, 1_000_000_000_000_000_000)
    reweighted = with_changes(
        versions=[
            {"name": "tuned", "url": "http://127.0.0.1:3001", "weight": 10, "prompt": "v1"},
            {"name": "int8", "url": "http://127.0.0.1:3002", "weight": 90},
        ]
    )
    real_read_bytes = Path.read_bytes
    reads = 0

    def read_then_update(self: Path) -> bytes:
        nonlocal reads
        content = real_read_bytes(self)
        reads += 1
        if self == path and reads == 1:
            _write(path, reweighted, 1_000_000_001_000_000_000)
        return content

    monkeypatch.setattr(Path, "read_bytes", read_then_update)
    reloader = ConfigReloader(path)
    assert [v.weight for v in reloader.current.versions] == [80, 20]
    assert reloader.poll() is True
    assert [v.weight for v in reloader.current.versions] == [10, 90]
