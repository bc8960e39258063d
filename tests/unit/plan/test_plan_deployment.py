"""Planning for ModelDeployment: models, gateway config, weights, status; and the reconcile pass."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from kubetune.gateway.config import parse_gateway_config
from kubetune.plan.deployment import CanaryFacts, plan_deployment
from kubetune.plan.gateway import effective_weights, gateway_config
from kubetune.plan.versions import resolve_versions, served_models
from kubetune.reconcile.deployment import (
    DeploymentRef,
    GatewayObservation,
    VersionObservation,
    VersionServing,
    reconcile_deployment,
)
from kubetune.rollout.prometheus import Sample
from kubetune_contract.deployment import ModelDeployment

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def mdep(
    spec: dict[str, Any] | None = None, *, generation: int = 1, status: dict[str, Any] | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "support-bot", "namespace": "ml", "uid": "u-1", "generation": generation},
        "spec": spec
        or {
            "versions": [
                {"name": "tuned", "model": {"fineTuneJobRef": {"name": "support-lora"}}, "weight": 80},
                {"name": "int8", "model": {"quantizeJobRef": {"name": "support-int8"}}, "weight": 20},
            ]
        },
    }
    if status is not None:
        body["status"] = status
    return body


def job(
    succeeded: str | None, *, uri: str | None = None, reason: str = "", message: str = ""
) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": "Running", "conditions": []}
    if succeeded is not None:
        status["conditions"] = [
            {"type": "Succeeded", "status": succeeded, "reason": reason, "message": message}
        ]
    if uri:
        status["output"] = {"uri": uri, "version": "v1"}
    return {"spec": {}, "status": status}


class Jobs:
    def __init__(self, **jobs: dict[str, Any]) -> None:
        self.jobs = jobs
        self.asked: list[tuple[str, str, str]] = []

    def __call__(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        self.asked.append((kind, namespace, name))
        return self.jobs.get(name)


DONE = Jobs(
    **{
        "support-lora": job("True", uri="/store/ml/support-lora/v1"),
        "support-int8": job("True", uri="/store/ml/support-int8/v1"),
    }
)


class FakeServing:
    """A ServingBackend double: versions get URLs at once; readiness is set by the test."""

    def __init__(self, ready: bool = True) -> None:
        self.ready = ready
        self.not_ready: set[str] = set()
        self.refused: set[str] = set()  # the API server refused their objects: no URL, not ready
        self.gave_up: dict[str, str] = {}  # the backend stopped trying them: version -> why
        self.asleep: set[str] = set()  # scaled to zero at minReplicas 0
        self.versions: list[VersionServing] = []
        self.config: dict[str, Any] | None = None
        self.removed: list[DeploymentRef] = []

    async def ensure_versions(
        self, deployment: DeploymentRef, versions: Sequence[VersionServing]
    ) -> Mapping[str, VersionObservation]:
        self.versions = list(versions)
        return {
            v.name: VersionObservation(url=None, ready=False, message="refused")
            if v.name in self.refused
            else VersionObservation(url=None, ready=False, message=self.gave_up[v.name], failed=True)
            if v.name in self.gave_up
            else VersionObservation(
                url=f"http://{deployment.name}-{v.name}.{deployment.namespace}:3000",
                ready=False,
                message="scaled to zero by KEDA",
                scaled_to_zero=True,
            )
            if v.name in self.asleep
            else VersionObservation(
                url=f"http://{deployment.name}-{v.name}.{deployment.namespace}:3000",
                ready=self.ready and v.name not in self.not_ready,
                message=None if self.ready and v.name not in self.not_ready else "0/1 replicas ready",
            )
            for v in versions
        }

    async def ensure_gateway(
        self, deployment: DeploymentRef, config: Mapping[str, Any], replicas: int = 1
    ) -> GatewayObservation:
        self.config = dict(config)
        return GatewayObservation(
            endpoint=f"http://{deployment.name}.{deployment.namespace}:8080/v1", ready=True
        )

    async def remove(self, deployment: DeploymentRef) -> None:
        self.removed.append(deployment)


def condition(status: Mapping[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


def kstatus(body: Mapping[str, Any]) -> str:
    """kstatus's generic rules for custom resources (sigs.k8s.io/cli-utils/pkg/kstatus/status)."""
    status = body.get("status") or {}
    if status.get("observedGeneration") != body["metadata"]["generation"]:
        return "InProgress"
    for c in status.get("conditions") or []:
        if c["type"] == "Reconciling" and c["status"] == "True":
            return "InProgress"
        if c["type"] == "Stalled" and c["status"] == "True":
            return "Failed"
    return "Current"


# -- models -----------------------------------------------------------------------------------------


def test_versions_resolve_to_job_outputs_or_their_uri() -> None:
    spec = ModelDeployment.model_validate(
        mdep(
            {
                "versions": [
                    {"name": "tuned", "model": {"fineTuneJobRef": {"name": "support-lora"}}, "weight": 50},
                    {"name": "int8", "model": {"quantizeJobRef": {"name": "support-int8"}}, "weight": 25},
                    {"name": "hub", "model": {"uri": "hf://org/model@abc"}, "weight": 25},
                ]
            }
        )
    ).spec
    jobs = Jobs(**DONE.jobs)
    resolved = resolve_versions(spec, "ml", jobs)
    assert {name: (r.state, r.model_uri) for name, r in resolved.items()} == {
        "tuned": ("ready", "/store/ml/support-lora/v1"),
        "int8": ("ready", "/store/ml/support-int8/v1"),
        "hub": ("ready", "hf://org/model@abc"),
    }
    assert jobs.asked == [("FineTuneJob", "ml", "support-lora"), ("QuantizeJob", "ml", "support-int8")]


def test_relative_uris_resolve_against_the_base_dir() -> None:
    spec = ModelDeployment.model_validate(
        mdep({"versions": [{"name": "a", "model": {"uri": "models/a"}, "weight": 100}]})
    ).spec
    assert resolve_versions(spec, "ml", Jobs(), Path("/work"))["a"].model_uri == "/work/models/a"


def test_versions_wait_for_missing_or_running_jobs_and_fail_with_failed_ones() -> None:
    spec = ModelDeployment.model_validate(mdep()).spec
    missing = resolve_versions(spec, "ml", Jobs())
    assert (missing["tuned"].state, missing["tuned"].reason) == ("waiting", "WaitingForModel")
    assert missing["tuned"].message == "FineTuneJob/support-lora does not exist (yet)"
    running = resolve_versions(spec, "ml", Jobs(**{"support-int8": job("Unknown", reason="Running")}))
    assert running["int8"].message == "waiting for QuantizeJob/support-int8 to succeed (Running)"
    failed = resolve_versions(
        spec, "ml", Jobs(**{"support-int8": job("False", reason="QualityGateFailed", message="ppl +9%")})
    )
    assert (failed["int8"].state, failed["int8"].reason) == ("failed", "ModelFailed")
    assert failed["int8"].message == "QuantizeJob/support-int8 failed (QualityGateFailed: ppl +9%)"
    empty = resolve_versions(spec, "ml", Jobs(**{"support-lora": job("True")}))
    assert empty["tuned"].message == "FineTuneJob/support-lora succeeded but published no output"


def test_a_version_keeps_its_previous_model_while_a_new_one_is_awaited() -> None:
    spec = ModelDeployment.model_validate(mdep()).spec
    resolved = resolve_versions(spec, "ml", Jobs(**{"support-lora": DONE.jobs["support-lora"]}))
    previous = {"versions": [{"name": "int8", "weight": 20, "modelUri": "/store/ml/old-int8/v1"}]}
    assert served_models(resolved, previous) == {
        "tuned": "/store/ml/support-lora/v1",
        "int8": "/store/ml/old-int8/v1",
    }
    assert served_models(resolved, None) == {"tuned": "/store/ml/support-lora/v1"}


# -- weights and gateway config ----------------------------------------------------------------------


def test_effective_weights_move_the_share_of_versions_that_do_not_answer() -> None:
    planned = {"a": 60, "b": 30, "c": 10}
    assert effective_weights(planned, {"a": True, "b": True, "c": True}, {"a", "b", "c"}) == planned
    assert effective_weights(planned, {"a": True, "b": True, "c": False}, {"a", "b", "c"}) == {
        "a": 67,
        "b": 33,
        "c": 0,
    }
    # nothing answers yet: the served versions keep their planned share
    assert effective_weights(planned, {}, {"a", "c"}) == {"a": 86, "b": 0, "c": 14}
    assert effective_weights(planned, {}, set()) == {"a": 0, "b": 0, "c": 0}


FULL_SPEC: dict[str, Any] = {
    "versions": [
        {"name": "tuned", "model": {"uri": "/m/tuned"}, "weight": 80, "prompt": "v1"},
        {"name": "int8", "model": {"uri": "/m/int8"}, "weight": 20},
    ],
    "routing": {"stickyBy": "header", "header": "x-user-id"},
    "generation": {
        "defaults": {"temperature": "0.7", "topP": "1", "maxTokens": 128},
        "limits": {"maxTemperature": "1.5", "maxTokens": 512},
        "contextWindow": {"maxPromptTokens": 1024, "overflow": "refuse"},
    },
    "prompts": [
        {
            "name": "v1",
            "system": "You are a support assistant.",
            "template": "Ticket: {{input}}",
            "examples": [{"user": "hi", "assistant": "hello"}],
        }
    ],
    "cache": {"ttl": "5m", "maxEntries": 64},
    "fallback": {"version": "tuned", "timeout": "1m30s"},
    "serving": {"batching": {"maxBatchSize": 4, "maxLatencyMs": 20}},
}


def test_gateway_config_follows_the_contract() -> None:
    deployment = ModelDeployment.model_validate(mdep(FULL_SPEC))
    urls = {"tuned": "http://t:3000", "int8": "http://i:3000"}
    config = gateway_config(deployment, urls, {"tuned": 90, "int8": 10})
    assert config == {
        "deployment": "support-bot",
        "namespace": "ml",
        "versions": [
            {"name": "tuned", "url": "http://t:3000", "weight": 90, "prompt": "v1", "pricing": None},
            {"name": "int8", "url": "http://i:3000", "weight": 10, "prompt": None, "pricing": None},
        ],
        "control": "tuned",
        "routing": {"stickyBy": "header", "header": "x-user-id", "overrideHeader": "x-kubetune-version"},
        "generation": {
            "defaults": {"temperature": 0.7, "topP": 1.0, "maxTokens": 128},
            "limits": {"maxTemperature": 1.5, "maxTokens": 512},
            "maxPromptTokens": 1024,
        },
        "prompts": [
            {
                "name": "v1",
                "system": "You are a support assistant.",
                "template": "Ticket: {{input}}",
                "examples": [{"user": "hi", "assistant": "hello"}],
            }
        ],
        "cache": {"enabled": True, "ttlSeconds": 300.0, "maxEntries": 64},
        "fallback": {"version": "tuned", "timeoutSeconds": 90.0},
        # no spec.access: no limits, the audit log on, auth left to the serving backend's default
        "access": {
            "limits": {"perKey": {}, "perTenant": {}, "tenants": {}},
            "store": {"onUnavailable": "failClosed"},
            "audit": {"stdout": True, "logContent": False},
        },
        "scaleFromZero": None,  # no minReplicas 0: a version that is not ready is not waited for
        # no spec.feedback: nothing of the rated completions kept
        "feedback": {
            "capture": False,
            "maxRecords": 10000,
            "maxAgeSeconds": 2592000.0,
            "windowSeconds": 3600.0,
        },
        "guardrails": None,
    }
    parsed = parse_gateway_config(json.dumps(config))
    assert parsed.fallback is not None and parsed.fallback.timeout_seconds == 90


def test_gateway_config_holds_requests_for_versions_that_scale_to_zero() -> None:
    autoscaling = {"minReplicas": 0, "maxHeldRequests": 20, "holdTimeout": "90s"}
    deployment = ModelDeployment.model_validate(mdep({**FULL_SPEC, "serving": {"autoscaling": autoscaling}}))
    config = gateway_config(deployment, {"tuned": "http://t:3000"}, {"tuned": 100, "int8": 0})
    assert config is not None
    assert config["scaleFromZero"] == {"maxHeldRequests": 20, "holdSeconds": 90.0}
    assert parse_gateway_config(json.dumps(config)).scale_from_zero is not None


def test_a_version_asleep_at_zero_replicas_keeps_its_share_so_its_requests_wake_it() -> None:
    urls = {"tuned": "http://t:3000", "int8": "http://i:3000"}
    facts = CanaryFacts(
        None, first_sight=True, spec_changed=False, previous_weights={}, model_changed=False, ready=False
    )
    now = datetime(2026, 1, 1, tzinfo=UTC)
    to_zero = ModelDeployment.model_validate(
        mdep({**FULL_SPEC, "serving": {"autoscaling": {"minReplicas": 0}}})
    )
    plan = plan_deployment(to_zero, facts, answering={"tuned": True}, urls=urls, analysis=None, now=now)
    assert plan.effective == {"tuned": 80, "int8": 20}
    assert plan.gateway_config is not None
    assert [v["ready"] for v in plan.gateway_config["versions"]] == [True, False]  # int8's requests are held
    # without minReplicas 0 a version that does not answer gives its share to the others
    always_up = ModelDeployment.model_validate(mdep(FULL_SPEC))
    plan = plan_deployment(always_up, facts, answering={"tuned": True}, urls=urls, analysis=None, now=now)
    assert plan.effective == {"tuned": 100, "int8": 0}


def test_gateway_config_leaves_out_versions_without_a_server_and_needs_traffic() -> None:
    deployment = ModelDeployment.model_validate(mdep(FULL_SPEC))
    only_int8 = gateway_config(deployment, {"int8": "http://i:3000"}, {"tuned": 0, "int8": 100})
    assert only_int8 is not None
    assert [v["name"] for v in only_int8["versions"]] == ["int8"]
    assert only_int8["control"] == "int8" and only_int8["fallback"] is None
    assert gateway_config(deployment, {"int8": "http://i:3000"}, {"tuned": 100, "int8": 0}) is None
    no_cache = ModelDeployment.model_validate(mdep({**FULL_SPEC, "cache": None}))
    config = gateway_config(no_cache, {"tuned": "http://t:3000"}, {"tuned": 100, "int8": 0})
    assert config is not None and config["cache"] == {"enabled": False}


def test_gateway_config_marks_the_versions_that_do_not_answer_not_ready() -> None:
    deployment = ModelDeployment.model_validate(mdep(FULL_SPEC))
    urls = {"tuned": "http://t:3000", "int8": "http://i:3000"}
    # nothing answers yet: the served versions keep their share, and the gateway is told not to use them
    weights = effective_weights({"tuned": 90, "int8": 10}, {}, set(urls))
    config = gateway_config(deployment, urls, weights, ready={})
    assert config is not None
    assert [(v["name"], v["weight"], v["ready"]) for v in config["versions"]] == [
        ("tuned", 90, False),
        ("int8", 10, False),
    ]
    assert not any(version.ready for version in parse_gateway_config(json.dumps(config)).versions)
    answering = {"tuned": True, "int8": False}
    config = gateway_config(
        deployment, urls, effective_weights({"tuned": 90, "int8": 10}, answering, set(urls)), answering
    )
    assert config is not None
    assert [(v["name"], v["weight"], v["ready"]) for v in config["versions"]] == [
        ("tuned", 100, True),
        ("int8", 0, False),
    ]


def test_a_template_the_gateway_would_refuse_is_refused_by_the_api_first() -> None:
    spec = copy.deepcopy(FULL_SPEC)
    spec["prompts"][0]["template"] = "Ticket without the message"
    with pytest.raises(ValueError, match=r"template must contain \{\{input\}\}"):
        ModelDeployment.model_validate(mdep(spec))


# -- the reconcile pass -----------------------------------------------------------------------------


async def test_first_pass_serves_every_version_at_the_spec_weights_and_reads_current() -> None:
    serving = FakeServing()
    outcome = await reconcile_deployment(
        mdep(FULL_SPEC), lookup=Jobs(), serving=serving, prometheus=None, now=T0
    )
    status = outcome.status
    assert [(v.name, v.model_uri, v.bento) for v in serving.versions] == [
        ("tuned", "/m/tuned", "support-bot-tuned"),
        ("int8", "/m/int8", "support-bot-int8"),
    ]
    assert serving.versions[0].env == {
        "KUBETUNE_DEPLOYMENT": "support-bot",
        "KUBETUNE_VERSION": "tuned",
        "KUBETUNE_MAX_PROMPT_TOKENS": "1024",
        "KUBETUNE_CONTEXT_OVERFLOW": "refuse",
        "KUBETUNE_MAX_BATCH_SIZE": "4",
        "KUBETUNE_MAX_LATENCY_MS": "20",
    }
    assert serving.config is not None
    assert [(v["name"], v["weight"]) for v in serving.config["versions"]] == [("tuned", 80), ("int8", 20)]
    assert status["observedGeneration"] == 1
    assert (status["weights"], status["readyVersions"], status["phase"]) == (
        "tuned=80,int8=20",
        "2/2",
        "Ready",
    )
    assert status["endpoint"] == "http://support-bot.ml:8080/v1"
    assert status["versions"][0] == {
        "name": "tuned",
        "weight": 80,
        "ready": True,
        "modelUri": "/m/tuned",
        "url": "http://support-bot-tuned.ml:3000",
        "bento": "support-bot-tuned",
    }
    assert (condition(status, "Ready")["status"], condition(status, "Ready")["reason"]) == (
        "True",
        "AllVersionsReady",
    )
    assert (condition(status, "Progressing")["status"], condition(status, "Progressing")["reason"]) == (
        "False",
        "Stable",
    )
    assert condition(status, "Stalled")["status"] == "False"
    assert condition(status, "Ready")["lastTransitionTime"] == "2026-01-01T12:00:00Z"
    assert kstatus({**mdep(FULL_SPEC), "status": status}) == "Current"
    assert outcome.requeue_after is None
    assert [e.reason for e in outcome.events] == ["AllVersionsReady"]


async def test_waiting_for_a_model_serves_the_others_and_reads_in_progress() -> None:
    serving = FakeServing()
    jobs = Jobs(
        **{"support-lora": DONE.jobs["support-lora"], "support-int8": job("Unknown", reason="Running")}
    )
    outcome = await reconcile_deployment(mdep(), lookup=jobs, serving=serving, prometheus=None, now=T0)
    status = outcome.status
    assert [v.name for v in serving.versions] == ["tuned"]
    assert serving.config is not None and [v["name"] for v in serving.config["versions"]] == ["tuned"]
    assert status["weights"] == "tuned=100,int8=0" and status["readyVersions"] == "1/2"
    ready, progressing = condition(status, "Ready"), condition(status, "Progressing")
    assert (ready["status"], ready["reason"]) == ("False", "WaitingForModel")
    assert "QuantizeJob/support-int8" in ready["message"]
    assert (progressing["status"], progressing["reason"]) == ("True", "WaitingForModel")
    assert status["versions"][1]["message"] == "waiting for QuantizeJob/support-int8 to succeed (Running)"
    assert kstatus({**mdep(), "status": status}) == "InProgress"
    assert outcome.requeue_after == 5.0
    # The job succeeds: both versions, spec weights, no rollout (the spec has none).
    later = await reconcile_deployment(
        mdep(status=status), lookup=DONE, serving=serving, prometheus=None, now=T0
    )
    assert later.status["weights"] == "tuned=80,int8=20"
    assert condition(later.status, "Ready")["status"] == "True"


async def test_a_failed_job_stalls_the_deployment() -> None:
    jobs = Jobs(
        **{
            "support-lora": DONE.jobs["support-lora"],
            "support-int8": job("False", reason="QualityGateFailed", message="too weak"),
        }
    )
    outcome = await reconcile_deployment(mdep(), lookup=jobs, serving=FakeServing(), prometheus=None, now=T0)
    ready = condition(outcome.status, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ModelFailed")
    assert ready["message"] == "version int8: QuantizeJob/support-int8 failed (QualityGateFailed: too weak)"
    assert condition(outcome.status, "Stalled")["status"] == "True"
    assert outcome.status["phase"] == "Failed"
    assert kstatus({**mdep(), "status": outcome.status}) == "Failed"
    assert [(e.type, e.reason) for e in outcome.events] == [("Warning", "ModelFailed")]


async def test_a_version_its_backend_gave_up_on_stalls_the_deployment_at_once() -> None:
    serving = FakeServing()
    why = "building the Bento failed (exit code 1): not a model; it failed the same way twice (log: /b.log)"
    serving.gave_up = {"int8": why}
    outcome = await reconcile_deployment(mdep(), lookup=DONE, serving=serving, prometheus=None, now=T0)
    for type_ in ("Ready", "Progressing", "Stalled"):
        assert condition(outcome.status, type_)["reason"] == "ModelInvalid"
    assert condition(outcome.status, "Ready")["message"] == f"version int8: {why}"
    assert condition(outcome.status, "Stalled")["status"] == "True"
    assert condition(outcome.status, "Reconciling")["status"] == "False"
    assert kstatus({**mdep(), "status": outcome.status}) == "Failed"
    assert [(e.type, e.reason) for e in outcome.events] == [("Warning", "ModelInvalid")]
    assert outcome.status["weights"] == "tuned=100,int8=0"  # the version that answers keeps serving


async def test_a_version_scaled_to_zero_keeps_the_deployment_ready_saying_so() -> None:
    serving = FakeServing()
    serving.asleep = {"int8"}
    to_zero = mdep({**FULL_SPEC, "serving": {"autoscaling": {"minReplicas": 0}}})
    outcome = await reconcile_deployment(to_zero, lookup=DONE, serving=serving, prometheus=None, now=T0)
    ready = condition(outcome.status, "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "ScaledToZero")
    assert "scaled to zero (minReplicas 0): int8" in ready["message"]
    assert condition(outcome.status, "Stalled")["status"] == "False"
    assert outcome.status["weights"] == "tuned=80,int8=20"  # its share stays: its requests wake it
    assert outcome.status["versions"][1]["ready"] is False
    assert outcome.status["versions"][1]["message"] == "scaled to zero by KEDA"
    assert kstatus({**to_zero, "status": outcome.status}) == "Current"
    # a version that is starting (not asleep) still makes it not ready
    serving.asleep, serving.not_ready = set(), {"int8"}
    starting = await reconcile_deployment(to_zero, lookup=DONE, serving=serving, prometheus=None, now=T0)
    assert condition(starting.status, "Ready")["reason"] == "VersionNotReady"


async def test_servers_that_are_starting_get_no_traffic_yet() -> None:
    serving = FakeServing()
    serving.not_ready = {"int8"}
    outcome = await reconcile_deployment(mdep(), lookup=DONE, serving=serving, prometheus=None, now=T0)
    assert outcome.status["weights"] == "tuned=100,int8=0"
    assert serving.config is not None and serving.config["versions"][1]["weight"] == 0
    # The gateway is told too, so a request pinned to int8 is not sent to a server that cannot answer.
    assert [(v["name"], v["ready"]) for v in serving.config["versions"]] == [("tuned", True), ("int8", False)]
    ready = condition(outcome.status, "Ready")
    assert (ready["reason"], ready["message"]) == ("VersionNotReady", "version int8: 0/1 replicas ready")
    assert condition(outcome.status, "Progressing")["reason"] == "WaitingForVersions"


async def test_a_version_without_a_server_gets_no_share_even_before_any_answers() -> None:
    # Nothing answers yet, and int8's objects were refused: the gateway can only send to tuned, and
    # the status must say so rather than show int8's planned share.
    serving = FakeServing(ready=False)
    serving.refused = {"int8"}
    outcome = await reconcile_deployment(mdep(), lookup=DONE, serving=serving, prometheus=None, now=T0)
    assert outcome.status["weights"] == "tuned=100,int8=0"
    assert serving.config is not None
    assert [(v["name"], v["weight"]) for v in serving.config["versions"]] == [("tuned", 100)]


async def test_an_invalid_spec_changes_nothing_and_says_why() -> None:
    body = mdep({"versions": [{"name": "a", "model": {"uri": "/m/a"}, "weight": 90}]})
    body["status"] = {"weights": "a=100", "endpoint": "http://x/v1"}
    serving = FakeServing()
    outcome = await reconcile_deployment(body, lookup=Jobs(), serving=serving, prometheus=None, now=T0)
    assert serving.versions == [] and serving.config is None
    ready = condition(outcome.status, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert "weights must sum to 100, got 90" in ready["message"]
    assert outcome.status["weights"] == "a=100" and outcome.status["endpoint"] == "http://x/v1"
    assert kstatus({**body, "status": outcome.status}) == "Failed"


async def test_a_prompt_the_gateway_would_refuse_is_an_invalid_spec() -> None:
    spec = copy.deepcopy(FULL_SPEC)
    spec["prompts"][0]["template"] = "no input here"
    serving = FakeServing()
    outcome = await reconcile_deployment(mdep(spec), lookup=Jobs(), serving=serving, prometheus=None, now=T0)
    assert serving.config is None
    ready = condition(outcome.status, "Ready")
    assert (ready["reason"], condition(outcome.status, "Stalled")["status"]) == ("InvalidSpec", "True")
    assert "{{input}}" in ready["message"]


ROLLOUT_SPEC: dict[str, Any] = {
    "versions": [
        {"name": "tuned", "model": {"uri": "/m/tuned"}, "weight": 80},
        {"name": "int8", "model": {"uri": "/m/int8"}, "weight": 20},
    ],
    "rollout": {
        "steps": [{"weight": 10, "pause": "2s"}, {"weight": 50, "pause": "2s"}],
        "analysis": {"interval": "1s", "window": "5s", "metrics": [{"name": "errorRate", "max": "0.05"}]},
    },
}

STABLE_SPEC: dict[str, Any] = {"versions": [{"name": "tuned", "model": {"uri": "/m/tuned"}, "weight": 100}]}


class ErrorRate:
    def __init__(self, value: float) -> None:
        self.value = value
        self.queries: list[str] = []

    async def query(self, promql: str, at: datetime | None = None) -> list[Sample]:
        self.queries.append(promql)
        return [Sample({}, self.value)]


async def tick(
    spec: dict[str, Any], status: dict[str, Any] | None, at: datetime, prometheus: Any, generation: int = 1
) -> Any:
    return await reconcile_deployment(
        mdep(spec, generation=generation, status=status),
        lookup=Jobs(),
        serving=FakeServing(),
        prometheus=prometheus,
        now=at,
    )


async def test_a_rollout_through_the_controller_rolls_back_on_a_failing_error_rate() -> None:
    first = await tick(STABLE_SPEC, None, T0, None)
    prometheus = ErrorRate(0.4)
    started = await tick(ROLLOUT_SPEC, first.status, T0, prometheus, generation=2)
    assert started.status["weights"] == "tuned=90,int8=10"
    assert started.status["rollout"]["state"] == "Progressing"
    assert condition(started.status, "Progressing")["reason"] == "RolloutInProgress"
    assert kstatus({**mdep(ROLLOUT_SPEC, generation=2), "status": started.status}) == "InProgress"
    assert started.requeue_after == pytest.approx(1.0)
    rolled = await tick(ROLLOUT_SPEC, started.status, T0 + timedelta(seconds=1), prometheus, generation=2)
    assert prometheus.queries and 'version="int8"' in prometheus.queries[0]
    rollout = rolled.status["rollout"]
    assert rollout["state"] == "RolledBack"
    assert (rollout["lastAnalysis"]["metric"], rollout["lastAnalysis"]["value"]) == ("errorRate", 0.4)
    assert rollout["lastAnalysis"]["threshold"] == "0.05"
    assert rolled.status["weights"] == "tuned=100,int8=0"
    assert (condition(rolled.status, "Ready")["reason"], condition(rolled.status, "Stalled")["status"]) == (
        "RolledBack",
        "True",
    )
    assert kstatus({**mdep(ROLLOUT_SPEC, generation=2), "status": rolled.status}) == "Failed"
    assert [(e.type, e.reason) for e in rolled.events] == [("Warning", "RolledBack")]


def with_inconclusive_limit(limit: int) -> dict[str, Any]:
    spec = copy.deepcopy(ROLLOUT_SPEC)
    spec["rollout"]["analysis"]["inconclusiveLimit"] = limit
    return spec


async def test_without_prometheus_the_analysis_is_inconclusive_and_the_canary_proceeds_within_the_limit() -> (
    None
):
    spec = with_inconclusive_limit(1)
    first = await tick(STABLE_SPEC, None, T0, None)
    started = await tick(spec, first.status, T0, None, generation=2)
    at = T0 + timedelta(seconds=2)
    moved = await tick(spec, started.status, at, None, generation=2)
    rollout = moved.status["rollout"]
    assert rollout["step"] == 1 and moved.status["weights"] == "tuned=50,int8=50"
    assert rollout["lastAnalysis"]["message"].startswith("no Prometheus is configured")
    assert rollout["lastAnalysis"]["results"][0] == {"name": "errorRate", "max": "0.05"}


async def test_without_prometheus_a_canary_is_paused_not_promoted_unchecked() -> None:
    first = await tick(STABLE_SPEC, None, T0, None)
    started = await tick(ROLLOUT_SPEC, first.status, T0, None, generation=2)
    paused = await tick(ROLLOUT_SPEC, started.status, T0 + timedelta(seconds=1), None, generation=2)
    rollout = paused.status["rollout"]
    assert (rollout["state"], rollout["reason"], rollout["step"]) == ("Paused", "AnalysisInconclusive", 0)
    assert paused.status["weights"] == "tuned=90,int8=10"
    ready = condition(paused.status, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "AnalysisInconclusive")
    assert "no Prometheus is configured" in ready["message"] and "inconclusiveLimit" in ready["message"]
    assert condition(paused.status, "Stalled")["status"] == "True"
    assert kstatus({**mdep(ROLLOUT_SPEC, generation=2), "status": paused.status}) == "Failed"
    assert [(e.type, e.reason) for e in paused.events] == [("Warning", "AnalysisInconclusive")]
    later = await tick(ROLLOUT_SPEC, paused.status, T0 + timedelta(minutes=10), None, generation=2)
    assert later.status["rollout"]["state"] == "Paused" and later.status["weights"] == "tuned=90,int8=10"


async def test_a_healthy_canary_is_promoted_through_the_controller() -> None:
    first = await tick(STABLE_SPEC, None, T0, None)
    prometheus = ErrorRate(0.0)
    status = (await tick(ROLLOUT_SPEC, first.status, T0, prometheus, generation=2)).status
    seen = [status["weights"]]
    for second in range(1, 6):
        at = T0 + timedelta(seconds=second)
        status = (await tick(ROLLOUT_SPEC, status, at, prometheus, generation=2)).status
        seen.append(status["weights"])
    assert seen == [
        "tuned=90,int8=10",
        "tuned=90,int8=10",
        "tuned=50,int8=50",
        "tuned=50,int8=50",
        "tuned=80,int8=20",
        "tuned=80,int8=20",
    ]
    assert status["rollout"]["state"] == "Promoted"
    assert (condition(status, "Progressing")["status"], condition(status, "Progressing")["reason"]) == (
        "False",
        "RolloutComplete",
    )
    assert kstatus({**mdep(ROLLOUT_SPEC, generation=2), "status": status}) == "Current"


async def test_the_serving_backend_is_told_the_base_model_of_an_unmerged_adapter() -> None:
    """So a cluster's version pod can mount the base's claim beside the adapter's (kube/children.py)."""
    serving = FakeServing()
    adapter = job("True", uri="/store/ml/support-lora/v1")
    adapter["spec"] = {"baseModel": {"uri": "pvc://models/tiny-base"}}
    jobs = Jobs(**{"support-lora": adapter, "support-int8": DONE.jobs["support-int8"]})
    await reconcile_deployment(mdep(), lookup=jobs, serving=serving, prometheus=None, now=T0)
    assert {v.name: v.base_model_uri for v in serving.versions} == {
        "tuned": "pvc://models/tiny-base",
        "int8": None,  # a QuantizeJob publishes full weights
    }
