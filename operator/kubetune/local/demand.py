"""What the gateway says of each version's requests, for `kubetune up`'s scale to zero.

`kubetune up` does locally what KEDA does on a cluster for a version with
``spec.serving.autoscaling.minReplicas: 0``, from the same series: it reads the deployment's gateway's
``/metrics`` once per pass. A version with open requests (held while it is asleep, or in flight) is
woken or kept awake; one whose upstream attempts have not grown for ``scaleToZeroAfter`` is stopped
(:class:`~kubetune.local.version_server.VersionServer`). A gateway that cannot be read tells nothing:
nothing is stopped or woken on it.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from kubetune.gateway.metrics import OPEN_REQUESTS_METRIC
from kubetune.local.serving_host import ServingHost

REQUESTS_METRIC = "kubetune_gateway_requests_total"


@dataclass(frozen=True)
class VersionDemand:
    open: float
    """Requests the gateway holds for the version or has sent it and not yet had answered."""
    attempts: float
    """Requests the gateway has sent the version since it started (grows with every request)."""


def parse_demand(metrics_text: str, deployment: str) -> dict[str, VersionDemand]:
    """Each version's demand in a gateway's Prometheus exposition text."""
    open_by_version: dict[str, float] = {}
    attempts_by_version: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.labels.get("deployment") != deployment or "version" not in sample.labels:
                continue
            version = sample.labels["version"]
            if sample.name == OPEN_REQUESTS_METRIC:
                open_by_version[version] = open_by_version.get(version, 0.0) + sample.value
            elif sample.name == REQUESTS_METRIC:
                attempts_by_version[version] = attempts_by_version.get(version, 0.0) + sample.value
    return {
        version: VersionDemand(open_by_version.get(version, 0.0), attempts_by_version.get(version, 0.0))
        for version in open_by_version.keys() | attempts_by_version.keys()
    }


def read_demand(host: ServingHost, gateway_url: str, deployment: str) -> dict[str, VersionDemand] | None:
    """The demand the gateway at ``gateway_url`` reports, None when it cannot be read now."""
    status, _, response = host.get(f"{gateway_url}/metrics")
    if status != 200 or response is None:
        return None
    try:
        return parse_demand(response.text, deployment)
    except ValueError:
        return None
