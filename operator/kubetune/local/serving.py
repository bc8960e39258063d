"""Local serving of ModelDeployments (`kubetune up`): one `bentoml serve` per version and the gateway,
as processes on free loopback ports.

Each version is a :class:`~kubetune.local.version_server.VersionServer` (Bento build, server,
readiness), each deployment's gateway a :class:`~kubetune.local.gateway_process.GatewayProcess`;
both run their processes through :mod:`kubetune.common.supervision`: each in its own session with
its output in a log file, a process that exits on its own reported (in the observation's message,
so in the ModelDeployment's status, and through ``notify``) and started again with a growing
backoff. Stopping sends SIGTERM to the process group, then SIGKILL to whatever is left, including
descendants that left the group (BentoML's workers run in sessions of their own). On Linux the
kernel sends each process SIGTERM when `kubetune up` dies, however it dies; and
``serving/processes.json`` (:mod:`kubetune.local.process_record`) lists every live process with its
start time, so whatever a `kubetune up` killed outright left behind is stopped by the next one.

Layout under the kubetune home::

    bentoml/                                 BENTOML_HOME: the model and Bento stores
    serving/processes.json                   the processes started, for cleanup after a hard kill
    serving/<namespace>/<deployment>/gateway.json, gateway.log
    serving/<namespace>/<deployment>/<version>/build.log, server.log
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kubetune.common.supervision import STOP_GRACE_S, ManagedProcess, stop_processes
from kubetune.local.adapter_server import SharedAdapterServer
from kubetune.local.demand import VersionDemand, read_demand
from kubetune.local.gateway_process import GatewayProcess
from kubetune.local.process_record import ProcessRecord
from kubetune.local.serving_host import Notify, ServingHost, ignore
from kubetune.local.version_server import BuildSlot, VersionServer, local_model_dir
from kubetune.plan.versions import (
    DeploymentRef,
    GatewayObservation,
    VersionObservation,
    VersionServing,
    shared_adapter_groups,
)

RETIRE_GRACE_S = 5.0  # a version taken out of the spec serves on until the gateway has reloaded (1 s)


NO_DEMAND = VersionDemand(open=0.0, attempts=0.0)  # a version the gateway has not seen a request for


def _key(ref: DeploymentRef) -> tuple[str, str]:
    return ref.namespace, ref.name


def _scales_to_zero(version: VersionServing) -> bool:
    autoscaling = version.serving.autoscaling
    return autoscaling is not None and autoscaling.scales_to_zero


class LocalServing:
    """What serves `kubetune up`'s ModelDeployments; synchronous (:class:`ServingOnTheLoop` is the
    :class:`~kubetune.reconcile.deployment.ServingBackend` over it).

    ``notify`` receives a line for everything worth telling the person at the terminal: processes
    started, ready, crashed (with the log to read), restarted, stopped. Call :meth:`close` to stop
    every process (the owner of the ``kubetune up`` lock calls :meth:`reap_leftovers` first).
    """

    def __init__(
        self,
        home: Path,
        *,
        notify: Notify = ignore,
        python: str = sys.executable,
        stop_grace_s: float = STOP_GRACE_S,
    ) -> None:
        self.host = ServingHost(
            home,
            notify=notify,
            python=python,
            stop_grace_s=stop_grace_s,
            processes_changed=self._save_record,
        )
        self.record = ProcessRecord(self.host.root / "processes.json")
        self._versions: dict[tuple[str, str], dict[str, VersionServer]] = {}
        self._gateways: dict[tuple[str, str], GatewayProcess] = {}
        self._shared: dict[tuple[str, str], dict[str, SharedAdapterServer]] = {}
        """Per deployment, by base model URI: the servers of LoRA versions that share a base."""
        self._builds = BuildSlot()
        self._retiring: list[tuple[float, VersionServer]] = []  # (when to stop it, the version)

    @property
    def registry_path(self) -> Path:
        return self.record.path

    # -- what ServingBackend asks, synchronously ------------------------------------------------------

    def ensure_versions(
        self, deployment: DeploymentRef, versions: Sequence[VersionServing]
    ) -> Mapping[str, VersionObservation]:
        running = self._shared.get(_key(deployment), {})
        # a version scaling to zero has a server of its own, which stops and starts on its own requests
        shareable = [
            v for v in versions if local_model_dir(v.model_uri) is not None and not _scales_to_zero(v)
        ]
        groups = shared_adapter_groups(shareable, running=set(running))
        sharing = {member.name for members in groups.values() for member in members}
        observations: dict[str, VersionObservation] = self._ensure_shared(deployment, groups)
        versions = [version for version in versions if version.name not in sharing]
        current = self._versions.setdefault(_key(deployment), {})
        wanted = {version.name for version in versions}
        for name in [name for name in current if name not in wanted]:
            self._retire(current.pop(name))
        self._stop_retired(lambda when, _: when <= time.monotonic())
        demand = self._demand(deployment) if any(_scales_to_zero(v) for v in versions) else None
        for spec in versions:
            server = current.get(spec.name)
            if server is None:
                server = VersionServer(deployment, spec, host=self.host, builds=self._builds)
                current[spec.name] = server
            server.spec = spec
            observations[spec.name] = server.step(
                None if demand is None else demand.get(spec.name, NO_DEMAND)
            )
        return observations

    def _demand(self, deployment: DeploymentRef) -> dict[str, VersionDemand] | None:
        """What the deployment's gateway says of its versions' requests; None while it has none."""
        gateway = self._gateways.get(_key(deployment))
        if gateway is None or gateway.process is None:
            return None
        return read_demand(self.host, gateway.url, deployment.name)

    def _ensure_shared(
        self, deployment: DeploymentRef, groups: Mapping[str, Sequence[VersionServing]]
    ) -> dict[str, VersionObservation]:
        servers = self._shared.setdefault(_key(deployment), {})
        observations: dict[str, VersionObservation] = {}
        for base in [base for base in servers if base not in groups]:
            unused = servers[base]
            if unused.ready_since is not None:
                unused.step([])  # its versions are unloaded once the gateway routes without them
                if unused.loaded:
                    continue
            del servers[base]
            unused.stop()
            self.host.notify(f"stopped {unused.role}: no version of its base model is served any more")
        for base, members in groups.items():
            server = servers.get(base)
            if server is None:
                server = servers[base] = SharedAdapterServer(deployment, base, host=self.host)
            observations.update(server.step(members))
        return observations

    def ensure_gateway(self, deployment: DeploymentRef, config: Mapping[str, Any]) -> GatewayObservation:
        key = _key(deployment)
        gateway = self._gateways.get(key)
        if gateway is None:
            gateway = GatewayProcess(deployment, host=self.host)
            self._gateways[key] = gateway
        gateway.configure(config)
        return gateway.step()

    def remove(self, deployment: DeploymentRef) -> None:
        key = _key(deployment)
        processes: list[ManagedProcess] = []
        gateway = self._gateways.pop(key, None)
        if gateway is not None:
            if gateway.process is not None:
                processes.append(gateway.process)
            gateway.forget()
        for server in self._versions.pop(key, {}).values():
            processes += server.processes()
            server.forget()
        for shared in self._shared.pop(key, {}).values():
            processes += shared.processes()
            shared.forget()
        retiring = [server for _, server in self._retiring if _key(server.deployment) == key]
        self._retiring = [(when, server) for when, server in self._retiring if server not in retiring]
        processes += [server.server for server in retiring if server.server is not None]
        if processes:
            stop_processes(processes, self.host.stop_grace_s)
            self.host.notify(
                f"stopped the {len(processes)} process(es) serving modeldeployment/{deployment.name}"
            )
        self._save_record()

    # -- the whole backend ---------------------------------------------------------------------------

    def deployments(self) -> list[DeploymentRef]:
        """The deployments this backend runs something for."""
        refs = {_key(g.deployment): g.deployment for g in self._gateways.values()}
        for versions in self._versions.values():
            for server in versions.values():
                refs.setdefault(_key(server.deployment), server.deployment)
        for servers in self._shared.values():
            for shared in servers.values():
                refs.setdefault(_key(shared.deployment), shared.deployment)
        return list(refs.values())

    def processes(self) -> list[ManagedProcess]:
        """Every process running now: gateways first, then servers, then builds."""
        found = [g.process for g in self._gateways.values() if g.process is not None]
        for servers in self._shared.values():
            found += [process for shared in servers.values() for process in shared.processes()]
        for versions in self._versions.values():
            found += [s.server for s in versions.values() if s.server is not None]
        found += [server.server for _, server in self._retiring if server.server is not None]
        for versions in self._versions.values():
            found += [s.build for s in versions.values() if s.build is not None]
        return found

    def close(self) -> list[str]:
        """Stop every process; returns what was stopped (one line each)."""
        processes = self.processes()
        stopped = [f"{p.role} (pid {p.pid}, log {p.log})" for p in processes]
        stop_processes(processes, self.host.stop_grace_s)
        self._versions.clear()
        self._shared.clear()
        self._gateways.clear()
        self._retiring.clear()
        self._builds.holder = None
        self.host.ports.clear()
        self._save_record()
        self.host.http.close()
        return stopped

    def reap_leftovers(self) -> int:
        """Stop the processes a previous `kubetune up` with this home left running (it was killed
        before it could stop them); returns how many were still running."""
        return self.record.reap_leftovers()

    # -- versions leaving the spec ---------------------------------------------------------------------

    def _retire(self, server: VersionServer) -> None:
        """Stop a version that left the spec once the gateway no longer routes to it."""
        server.stop_build()
        if server.server is None:
            server.stop()
            return
        self._retiring.append((time.monotonic() + RETIRE_GRACE_S, server))
        self.host.notify(
            f"{server.role} is no longer in the spec: it stops in {RETIRE_GRACE_S:g}s, "
            "once the gateway routes without it"
        )

    def _stop_retired(self, due: Callable[[float, VersionServer], bool]) -> None:
        stopping = [server for when, server in self._retiring if due(when, server)]
        self._retiring = [(when, server) for when, server in self._retiring if server not in stopping]
        for server in stopping:
            server.stop()
            self.host.notify(f"stopped {server.role}")

    def _save_record(self) -> None:
        self.record.save(self.processes())


class ServingOnTheLoop:
    """The :class:`~kubetune.reconcile.deployment.ServingBackend` of `kubetune up`: LocalServing's calls
    made directly from the coroutines, on the thread that runs the event loop (`up`'s main thread).

    They block the loop: a version's or the gateway's readiness probe waits up to a second, stopping a
    version or a deployment waits for its processes to exit (up to the stop grace). That costs `up`
    nothing, since its loop runs one reconcile at a time and nothing else. A worker thread would: the
    processes die with the thread that started them (``PR_SET_PDEATHSIG`` follows the thread, see
    :func:`kubetune.common.supervision.stop_with_parent`), and a worker thread does not outlive the pass.
    """

    def __init__(self, local: LocalServing) -> None:
        self.local = local

    async def ensure_versions(
        self, deployment: DeploymentRef, versions: Sequence[VersionServing]
    ) -> Mapping[str, VersionObservation]:
        return self.local.ensure_versions(deployment, versions)

    async def ensure_gateway(
        self, deployment: DeploymentRef, config: Mapping[str, Any], replicas: int = 1
    ) -> GatewayObservation:
        # One gateway process on a laptop: replicas only matter where pods can be disrupted.
        return self.local.ensure_gateway(deployment, config)

    async def remove(self, deployment: DeploymentRef) -> None:
        self.local.remove(deployment)
