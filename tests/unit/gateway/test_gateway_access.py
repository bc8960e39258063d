"""Keys, the local limit store and the audit chain, on their own (the Redis and two-replica
behaviour is in tests/integration/test_gateway_access_replicas.py)."""

from __future__ import annotations

import asyncio
import datetime
import json
import time
from pathlib import Path

import httpx
import pytest
from gateway_doubles import GatewayServer, StubModelServer, base_config, chat_body

from kubetune.cli import main
from kubetune.gateway.access.audit import AuditLog, verify
from kubetune.gateway.access.keys import (
    KEY_RELOAD_SECONDS,
    KeyFileError,
    Scope,
    create_key,
    parse_scopes,
    read_key_file,
    revoke_key,
)
from kubetune.gateway.access.limits import LocalLimitStore, rules_for
from kubetune.gateway.access.usage import usage_rows
from kubetune.gateway.config import RateLimits


def test_keys_are_stored_as_hashes_and_checked_by_id_and_secret(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    created = create_key(path, "team-a", parse_scopes("inference,feedback"))
    stored = path.read_text()
    assert created.token.startswith("kt-") and created.token.split("_", 1)[1] not in stored
    keys = read_key_file(path)
    record = keys.lookup(created.token)
    assert record is not None and record.tenant == "team-a"
    assert record.allows(Scope.FEEDBACK) and not record.allows(Scope.EXPERIMENTS)
    assert keys.lookup(created.token[:-1] + "x") is None and keys.lookup("sk-other") is None
    revoke_key(path, record.id)
    assert read_key_file(path).lookup(created.token) is None
    assert not read_key_file(path).empty  # a revoked key keeps authentication on


def test_scopes_and_key_files_are_checked_naming_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown scope\\(s\\) write"):
        parse_scopes("inference,write")
    bad = tmp_path / "keys.json"
    bad.write_text(
        json.dumps(
            {
                "keys": [
                    {
                        "id": "x",
                        "tenant": "t",
                        "created": "c",
                        "salt": "zz",
                        "hash": "h",
                        "scopes": ["inference"],
                    }
                ]
            }
        )
    )
    with pytest.raises(KeyFileError, match=r"keys\[0\]\.salt: must be hex"):
        read_key_file(bad)


def test_a_request_rate_admits_its_limit_then_refuses_with_retry_after() -> None:
    store = LocalLimitStore()
    now = datetime.datetime.now(datetime.UTC)
    rules = rules_for("key:a", RateLimits(requests_per_minute=3), now)
    outcomes = [asyncio.run(store.admit(rules)) for _ in range(4)]
    assert outcomes[:3] == [None, None, None]
    refusal = outcomes[3]
    assert (
        refusal is not None
        and refusal.rule.name == "requestsPerMinute"
        and 1 <= refusal.retry_after_seconds <= 20
    )


def test_a_token_budget_counts_charged_tokens() -> None:
    store = LocalLimitStore()
    rules = rules_for("key:a", RateLimits(tokens_per_day=20), datetime.datetime.now(datetime.UTC))
    assert asyncio.run(store.admit(rules)) is None
    asyncio.run(store.charge(rules, 12, 0.0))
    assert asyncio.run(store.admit(rules)) is None
    asyncio.run(store.charge(rules, 12, 0.0))
    refusal = asyncio.run(store.admit(rules))
    assert refusal is not None and refusal.is_budget and refusal.rule.name == "tokensPerDay"


def _log(path: Path, count: int, max_bytes: int = 1 << 20) -> None:
    audit = AuditLog(path, to_stdout=False, max_bytes=max_bytes, keep_files=50)
    for index in range(count):
        audit.write({"requestId": f"req-{index}", "keyId": "k", "decision": "served", "status": 200})
    audit.close()


def _verify_cli(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exited:
        main(["audit", "verify", str(path)])
    captured = capsys.readouterr()
    return int(exited.value.code or 0), captured.out + captured.err


def test_audit_verify_names_the_altered_removed_or_swapped_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "audit.jsonl"
    _log(path, 6)
    code, output = _verify_cli(path, capsys)
    assert code == 0 and output.startswith("OK: 6 lines") and "seq 1..6" in output
    original = path.read_text().splitlines(keepends=True)

    altered = list(original)
    altered[2] = altered[2].replace('"status":200', '"status":500')
    path.write_text("".join(altered))
    code, output = _verify_cli(path, capsys)
    assert code == 1 and f"{path}:3: altered" in output

    path.write_text("".join(original[:3] + original[4:]))  # line 4 removed
    code, output = _verify_cli(path, capsys)
    assert code == 1 and f"{path}:4: expected seq 4, found 5: seq 4 removed or moved" in output

    swapped = list(original)
    swapped[1], swapped[2] = swapped[2], swapped[1]
    path.write_text("".join(swapped))
    code, output = _verify_cli(path, capsys)
    assert code == 1 and f"{path}:2: expected seq 2, found 3" in output


def test_rotation_keeps_one_chain_across_files_and_a_restart_continues_it(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _log(path, 40, max_bytes=1024)
    _log(path, 5, max_bytes=1024)  # a restarted gateway continues the chain it finds
    assert path.with_name("audit.jsonl.1").exists()
    result = verify(path)
    assert result.ok and (result.lines, result.first_seq, result.last_seq) == (45, 1, 45)
    assert len(result.files) > 2
    newest_rotated = path.with_name("audit.jsonl.1")
    newest_rotated.write_text("".join(newest_rotated.read_text().splitlines(keepends=True)[:-1]))
    broken = verify(path)
    assert not broken.ok and broken.problem is not None and "removed or moved" in broken.problem


def test_a_gateway_without_keys_is_open_and_its_first_key_turns_auth_on(
    tmp_path: Path, stubs: dict[str, StubModelServer], gateway_server: GatewayServer
) -> None:
    keys_file = tmp_path / "keys.json"
    config = base_config(stubs, access={"keysFile": str(keys_file)})
    with gateway_server(config) as (url, _gateway), httpx.Client(base_url=url) as client:
        assert client.post("/v1/chat/completions", json=chat_body()).status_code == 200
        token = create_key(keys_file, "team-a", [Scope.INFERENCE]).token
        time.sleep(KEY_RELOAD_SECONDS + 0.2)  # the next request re-reads the changed file
        refused = client.post("/v1/chat/completions", json=chat_body())
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        allowed = client.post(
            "/v1/chat/completions", json=chat_body(), headers={"authorization": f"Bearer {token}"}
        )
        assert allowed.status_code == 200
        by_caller: dict[tuple[str, str], tuple[int, int]] = {}
        for row in usage_rows(client.get("/metrics").text, "support-bot"):
            requests, refused_count = by_caller.get((row.key, row.tenant), (0, 0))
            by_caller[row.key, row.tenant] = (requests + row.requests, refused_count + row.refused)
        key_id = token.removeprefix("kt-").split("_")[0]
        assert by_caller == {("-", "-"): (1, 1), (key_id, "team-a"): (1, 0)}


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    captured = capsys.readouterr()
    return int(exited.value.code or 0), captured.out, captured.err


def test_keys_are_created_listed_and_revoked_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = ["--home", str(tmp_path)]
    code, out, err = _cli(
        [*home, "keys", "create", "mdep/support-bot", "--tenant", "team-a", "--scopes", "inference,feedback"],
        capsys,
    )
    token = out.strip()
    assert code == 0 and token.startswith("kt-") and "shown once" in err
    key_id = token.removeprefix("kt-").split("_")[0]
    key_file = tmp_path / "access" / "default" / "support-bot" / "keys.json"
    assert read_key_file(key_file).lookup(token) is not None
    code, out, _ = _cli([*home, "keys", "list", "mdep/support-bot", "-o", "json"], capsys)
    (listed,) = json.loads(out)["keys"]
    assert (listed["id"], listed["tenant"], listed["scopes"]) == (key_id, "team-a", ["feedback", "inference"])
    assert "hash" not in listed and "salt" not in listed and token not in out
    code, out, _ = _cli([*home, "keys", "revoke", "mdep/support-bot", key_id], capsys)
    assert code == 0 and f"key {key_id} revoked" in out
    assert read_key_file(key_file).lookup(token) is None
    code, _, err = _cli([*home, "keys", "revoke", "mdep/support-bot", "nope"], capsys)
    assert code == 1 and "no key 'nope'" in err
    code, _, err = _cli([*home, "keys", "create", "ftj/job", "--tenant", "t"], capsys)
    assert code == 2 and "mdep/NAME" in err
    code, _, err = _cli([*home, "keys", "create", "mdep/x", "--tenant", "t", "--scopes", "root"], capsys)
    assert code == 2 and "unknown scope(s) root" in err


def test_usage_shows_tokens_and_cost_per_key_and_version(
    tmp_path: Path,
    stubs: dict[str, StubModelServer],
    gateway_server: GatewayServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    keys_file = tmp_path / "keys.json"
    token = create_key(keys_file, "team-a", [Scope.INFERENCE]).token
    config = base_config(stubs, access={"keysFile": str(keys_file)})
    config["versions"][0]["pricing"] = {"inputPerMillion": 1_000_000, "outputPerMillion": 2_000_000}
    with gateway_server(config) as (url, _gateway), httpx.Client(base_url=url) as client:
        headers = {"authorization": f"Bearer {token}", "x-kubetune-version": "alpha"}
        answer = client.post("/v1/chat/completions", json=chat_body("two words"), headers=headers)
        usage = answer.json()["usage"]
        assert client.post("/v1/chat/completions", json=chat_body()).status_code == 401
        code, out, _ = _cli(["usage", "mdep/support-bot", "--gateway", url, "-o", "json"], capsys)
        table_code, table, _ = _cli(["usage", "mdep/support-bot", "--gateway", url], capsys)
    key_id = token.removeprefix("kt-").split("_")[0]
    rows = {(row["version"], row["key"]): row for row in json.loads(out)["usage"]}
    served = rows["alpha", key_id]
    assert (served["requests"], served["refused"], served["tenant"]) == (1, 0, "team-a")
    assert (served["tokensIn"], served["tokensOut"]) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert served["cost"] == pytest.approx(usage["prompt_tokens"] * 1 + usage["completion_tokens"] * 2)
    assert rows["-", "-"]["refused"] == 1
    assert code == 0 and table_code == 0 and table.splitlines()[0].split()[:3] == ["VERSION", "KEY", "TENANT"]
