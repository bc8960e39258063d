"""Feedback, experiments, live config reload, metrics, models and health, through a served gateway."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from gateway_doubles import GatewayServer, StubModelServer, base_config, chat_body, metric_value
from prometheus_client.parser import text_string_to_metric_families

from kubetune.gateway.app import create_app
from kubetune.gateway.config import GatewayConfigError

Stubs = dict[str, StubModelServer]


def ask(client: httpx.Client, version: str) -> httpx.Response:
    return client.post("/v1/chat/completions", json=chat_body(), headers={"x-kubetune-version": version})


def test_feedback_is_recorded_per_version_and_tested_against_the_control(
    stubs: Stubs, gateway_server: GatewayServer
) -> None:
    config = base_config(stubs, control="beta")
    config["versions"].append({"name": "gamma", "url": stubs["gamma"].url, "weight": 0})
    stubs["gamma"].behavior = "error"
    with gateway_server(config) as (url, _), httpx.Client(base_url=url, timeout=10) as client:
        for index in range(12):
            alpha_id = ask(client, "alpha").headers["x-request-id"]
            beta_id = ask(client, "beta").headers["x-request-id"]
            rated = client.post(
                "/v1/feedback", json={"requestId": alpha_id, "score": 0.9 if index % 2 else 1.0}
            )
            assert rated.status_code == 200
            assert rated.json() == {
                "requestId": alpha_id,
                "version": "alpha",
                "score": 0.9 if index % 2 else 1.0,
            }
            assert rated.headers["x-kubetune-version"] == "alpha"
            snake = client.post(
                "/v1/feedback", json={"request_id": beta_id, "score": 0.2 if index % 2 else 0.4}
            )
            assert snake.status_code == 200 and snake.json()["version"] == "beta"
        for _ in range(4):
            assert ask(client, "gamma").status_code == 502

        again = client.post("/v1/feedback", json={"requestId": alpha_id, "score": 1})
        assert again.status_code == 409 and again.json()["error"]["param"] == "requestId"
        unknown = client.post("/v1/feedback", json={"requestId": "chatcmpl-nope", "score": 1})
        assert unknown.status_code == 404
        assert unknown.json()["error"]["param"] == "requestId"
        assert "chatcmpl-nope" in unknown.json()["error"]["message"]
        for bad, param in [
            ({"requestId": beta_id, "score": 1.5}, "score"),
            ({"requestId": beta_id, "score": -1}, "score"),
            ({"requestId": beta_id, "score": "good"}, "score"),
            ({"requestId": beta_id, "score": True}, "score"),
            ({"score": 1}, "requestId"),
            ({"requestId": alpha_id, "request_id": beta_id, "score": 1}, "requestId"),
            ({"requestId": beta_id, "score": 1, "comment": "nice"}, "comment"),
        ]:
            refused = client.post("/v1/feedback", json=bad)
            assert refused.status_code == 400, bad
            assert refused.json()["error"]["param"] == param, bad

        report = client.get("/v1/experiments").json()
        metrics = client.get("/metrics").text

    assert report["deployment"] == "support-bot" and report["control"] == "beta"
    by_name = {entry["name"]: entry for entry in report["versions"]}
    alpha, beta, gamma = by_name["alpha"], by_name["beta"], by_name["gamma"]
    assert (alpha["requests"], alpha["errors"], alpha["errorRate"]) == (12, 0, 0.0)
    assert alpha["feedbackCount"] == 12 and alpha["meanFeedback"] == pytest.approx(0.95)
    assert beta["feedbackCount"] == 12 and beta["meanFeedback"] == pytest.approx(0.3)
    assert 0 < alpha["latencyP50Seconds"] <= alpha["latencyP95Seconds"] < 1
    assert beta["comparison"] is None
    feedback_test = alpha["comparison"]["feedback"]
    assert alpha["comparison"]["against"] == "beta"
    assert feedback_test["test"] == "welch-t"
    assert feedback_test["difference"] == pytest.approx(0.65)
    assert feedback_test["pValue"] < 1e-6
    assert (gamma["requests"], gamma["errorRate"], gamma["feedbackCount"]) == (4, 1.0, 0)
    error_test = gamma["comparison"]["errorRate"]
    assert error_test["test"] == "two-proportion-z" and error_test["pValue"] < 0.001
    assert alpha["comparison"]["errorRate"]["pValue"] == 1.0

    labels = {"deployment": "support-bot", "version": "alpha"}
    assert metric_value(metrics, "kubetune_gateway_feedback_score_count", **labels) == 12
    assert metric_value(metrics, "kubetune_gateway_feedback_score_sum", **labels) == pytest.approx(11.4)


def replace_file(path: Path, text: str) -> None:
    """Swap in new content at once, as a ConfigMap update does: the gateway polling the file never
    reads a half-written one (write_text truncates first, and an empty file is a config error)."""
    staged = path.with_suffix(".staged")
    staged.write_text(text)
    os.replace(staged, path)


def test_weights_change_on_config_reload_without_a_restart(
    stubs: Stubs, gateway_server: GatewayServer, tmp_path: Path
) -> None:
    path = tmp_path / "gateway.json"
    config: dict[str, Any] = base_config(stubs)
    config["versions"][0]["weight"], config["versions"][1]["weight"] = 100, 0
    path.write_text(json.dumps(config))

    def versions_for_users(client: httpx.Client) -> set[str]:
        return {
            client.post("/v1/chat/completions", json=chat_body(user=f"u{i}")).headers["x-kubetune-version"]
            for i in range(20)
        }

    def wait_for(client: httpx.Client, condition: Any) -> dict[str, Any]:
        deadline = time.monotonic() + 5
        while True:
            health: dict[str, Any] = client.get("/healthz").json()
            if condition(health) or time.monotonic() > deadline:
                return health
            time.sleep(0.02)

    with (
        gateway_server(path, reload_interval_seconds=0.05) as (url, _),
        httpx.Client(base_url=url, timeout=10) as client,
    ):
        assert versions_for_users(client) == {"alpha"}
        config["versions"][0]["weight"], config["versions"][1]["weight"] = 0, 100
        replace_file(path, json.dumps(config))
        health = wait_for(client, lambda h: h["versions"]["beta"] == 100)
        assert health["versions"] == {"alpha": 0, "beta": 100}
        assert versions_for_users(client) == {"beta"}

        replace_file(path, json.dumps({**config, "control": "nobody"}))  # a bad edit
        health = wait_for(client, lambda h: h["configError"] is not None)
        assert "control: 'nobody' is not a version" in health["configError"]
        assert health["status"] == "ok"
        assert versions_for_users(client) == {"beta"}  # the last good config still serves


def test_create_app_refuses_a_bad_config_file(tmp_path: Path) -> None:
    path = tmp_path / "gateway.json"
    path.write_text(json.dumps({"deployment": "d", "versions": [{"name": "a", "weight": 1}]}))
    with pytest.raises(GatewayConfigError, match=r"versions\.0\.url: Field required"):
        create_app(path)


CONTRACT_SERIES = {
    "kubetune_gateway_requests_total": {"deployment", "version", "endpoint", "code"},
    "kubetune_gateway_request_duration_seconds_bucket": {"deployment", "version", "endpoint", "le"},
    "kubetune_gateway_time_to_first_token_seconds_bucket": {"deployment", "version", "le"},
    "kubetune_gateway_tokens_total": {"deployment", "version", "direction"},
    "kubetune_gateway_feedback_score_sum": {"deployment", "version"},
    "kubetune_gateway_feedback_score_count": {"deployment", "version"},
    "kubetune_gateway_cache_hits_total": {"deployment"},
    "kubetune_gateway_cache_misses_total": {"deployment"},
    "kubetune_gateway_fallbacks_total": {"deployment", "from_version", "to_version"},
}


def test_metrics_use_the_contract_names_and_labels(stubs: Stubs, gateway_server: GatewayServer) -> None:
    config = base_config(stubs, cache={"enabled": True}, fallback={"version": "beta", "timeoutSeconds": 5})
    stubs["gamma"].behavior = "error"
    config["versions"].append({"name": "gamma", "url": stubs["gamma"].url, "weight": 0})
    with gateway_server(config) as (url, _), httpx.Client(base_url=url, timeout=10) as client:
        answer = client.post("/v1/chat/completions", json=chat_body(temperature=0, user="u"))
        client.post("/v1/chat/completions", json=chat_body(temperature=0, user="u"))
        client.post("/v1/completions", json={"model": "support-bot", "prompt": "x", "stream": True})
        client.post("/v1/feedback", json={"requestId": answer.headers["x-request-id"], "score": 1})
        ask(client, "gamma")
        response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    labels_by_sample: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels_by_sample.setdefault(sample.name, set()).update(sample.labels)
    for name, labels in CONTRACT_SERIES.items():
        assert labels_by_sample.get(name) == labels, name
    assert metric_value(response.text, "kubetune_gateway_requests_total", version="gamma", code="500") == 1
    assert not [
        name
        for name in labels_by_sample
        if name.startswith("kubetune_gateway_feedback_score") and "quantile" in labels_by_sample[name]
    ]


def test_models_and_health(stubs: Stubs, gateway_server: GatewayServer) -> None:
    with gateway_server(base_config(stubs)) as (url, _), httpx.Client(base_url=url, timeout=10) as client:
        models = client.get("/v1/models").json()
        health = client.get("/healthz").json()
    assert models["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"]) for m in models["data"]] == [
        ("support-bot", "model", "kubetune")
    ]
    assert health == {
        "status": "ok",
        "deployment": "support-bot",
        "versions": {"alpha": 80, "beta": 20},
        "notRouted": [],
        "configError": None,
        "auth": "off",
        "limitStoreError": None,
        "keysError": None,
    }
