"""Settings read from the operator's environment (kubetune.config)."""

from __future__ import annotations

import pytest

from kubetune.config import OPERATOR_IMAGE, RETIRE_AFTER_S, DeploymentSettings


def test_settings_come_from_the_environment() -> None:
    defaults = DeploymentSettings.from_env({"KUBETUNE_RUNTIME_IMAGE": "registry.example/runtime:2"})
    assert defaults.serving_image == "registry.example/runtime:2"  # the pipeline steps' image
    assert defaults.gateway_image == OPERATOR_IMAGE
    assert defaults.prometheus_url is None
    custom = DeploymentSettings.from_env(
        {
            "KUBETUNE_SERVING_IMAGE": "registry.example/serving:3",
            "KUBETUNE_GATEWAY_IMAGE": "registry.example/gateway:3",
            "KUBETUNE_PROMETHEUS_URL": "http://prometheus.monitoring:9090",
        }
    )
    assert (custom.serving_image, custom.gateway_image) == (
        "registry.example/serving:3",
        "registry.example/gateway:3",
    )
    assert custom.prometheus_url == "http://prometheus.monitoring:9090"
    with pytest.raises(ValueError, match="KUBETUNE_PROMETHEUS_URL must be an http:// or https:// URL"):
        DeploymentSettings.from_env({"KUBETUNE_PROMETHEUS_URL": "prometheus:9090"})
    assert defaults.retire_after_s == RETIRE_AFTER_S
    assert DeploymentSettings.from_env({"KUBETUNE_RETIRE_GRACE_SECONDS": "0"}).retire_after_s == 0
    for bad in ("-1", "soon", "inf", "nan"):
        with pytest.raises(ValueError, match=f"KUBETUNE_RETIRE_GRACE_SECONDS must be .* not '{bad}'"):
            DeploymentSettings.from_env({"KUBETUNE_RETIRE_GRACE_SECONDS": bad})
