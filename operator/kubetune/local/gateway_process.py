"""The gateway of a ModelDeployment served locally: ``python -m kubetune.gateway`` on a loopback
port, reading a config file that is rewritten atomically when the weights change. The gateway
reloads the file, so it and the version servers keep running (same processes) through a weight
change; it is ready once its ``/healthz`` says it routes with the weights last written.

Access: the gateway reads the deployment's key file under ``$KUBETUNE_HOME/access/<namespace>/
<name>/`` (written by ``kubetune keys``; none means open on loopback, the first key turns
authentication on, re-read within a second), signs response ids with the signing key kept there,
and writes its hash-chained audit log next to its config (``audit.jsonl``). With ``spec.feedback.capture``
the rated completions are kept there too (``feedback.jsonl``), unless Redis holds them.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kubetune.common.supervision import Backoff, ManagedProcess, describe_exit, stop_processes
from kubetune.gateway.access.keys import (
    KEY_FILE_NAME,
    SIGNING_KEY_FILE_NAME,
    access_directory,
    load_or_create_signing_key,
)
from kubetune.gateway.capture import FEEDBACK_FILE_NAME
from kubetune.local.serving_host import LOOPBACK, ServingHost
from kubetune.plan.versions import DeploymentRef, GatewayObservation

GATEWAY_MODULE = "kubetune.gateway"
RELOAD_WAIT_S = 3.0  # the gateway checks its config file every second


class GatewayProcess:
    """The gateway process of one deployment and the config it was given, stepped once per pass."""

    def __init__(self, deployment: DeploymentRef, *, host: ServingHost) -> None:
        self.deployment = deployment
        self.host = host
        self.directory = host.root / deployment.namespace / deployment.name
        self.port = host.ports.allocate()
        self.written: str | None = None
        self.expected: dict[str, Any] = {}  # the weights of the config written
        self.routing: dict[str, Any] | None = None  # the weights the gateway last said it routes with
        self.process: ManagedProcess | None = None
        self.backoff = Backoff()
        self.ready_since: float | None = None

    @property
    def config_path(self) -> Path:
        return self.directory / "gateway.json"

    @property
    def audit_log(self) -> Path:
        return self.directory / "audit.jsonl"

    @property
    def access_directory(self) -> Path:
        return access_directory(self.host.home, self.deployment.namespace, self.deployment.name)

    def _with_local_access(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """``config`` with the local key file, signing key and audit log filled in where unset."""
        access = dict(config.get("access") or {})
        access.setdefault("keysFile", str(self.access_directory / KEY_FILE_NAME))
        if "signingKeyFile" not in access:
            signing_key = self.access_directory / SIGNING_KEY_FILE_NAME
            load_or_create_signing_key(signing_key)
            access["signingKeyFile"] = str(signing_key)
        # locally the log is a file (stdout is the gateway's log file); spec.access.audit.enabled
        # arrives as audit.stdout
        audit = dict(access.get("audit") or {})
        if audit.pop("stdout", True):
            audit.setdefault("path", str(self.audit_log))
        access["audit"] = audit
        feedback = dict(config.get("feedback") or {})
        if feedback.get("capture"):  # used only while access.store names no Redis
            feedback.setdefault("path", str(self.access_directory / FEEDBACK_FILE_NAME))
        return {**config, "access": access, "feedback": feedback}

    @property
    def log(self) -> Path:
        return self.directory / "gateway.log"

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def role(self) -> str:
        return f"the gateway of modeldeployment/{self.deployment.name}"

    def configure(self, config: Mapping[str, Any]) -> None:
        """Write ``config`` for the gateway when it changed; a running gateway is given a moment to
        reload it."""
        text = json.dumps(self._with_local_access(config), indent=2, sort_keys=True) + "\n"
        if text == self.written:
            return
        self._write_config(text)
        self.written = text
        self.expected = {str(v["name"]): v["weight"] for v in config.get("versions") or []}
        if self.process is not None and self.routing is not None:
            self._await_reload()

    def _write_config(self, text: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        # A new file swapped in with rename: the gateway never reads half a config.
        tmp = self.config_path.with_name(f".{self.config_path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config_path)

    def _await_reload(self) -> None:
        """Wait (a second or so) for a running gateway to route with the weights just written, so the
        status written after this pass never shows weights the gateway does not use yet."""
        deadline = time.monotonic() + RELOAD_WAIT_S
        while time.monotonic() < deadline:
            status, _, response = self.host.get(f"{self.url}/healthz")
            if status != 200 or response is None:
                return  # not answering: step() says so
            with contextlib.suppress(ValueError, AttributeError):
                if response.json().get("versions") == self.expected:
                    return
            time.sleep(0.1)

    def step(self) -> GatewayObservation:
        now = time.monotonic()
        if self.process is not None and (code := self.process.exit_code()) is not None:
            self._exited(self.process, code, now)
        if self.process is None:
            wait = self.backoff.waiting(now)
            if wait > 0:
                message = f"{self.backoff.problem}; restarting it in {wait:.0f}s (log: {self.log})"
                return GatewayObservation(endpoint=f"{self.url}/v1", ready=False, message=message)
            self._start()
            return GatewayObservation(
                endpoint=f"{self.url}/v1", ready=False, message=f"starting (log: {self.log})"
            )
        return self._step_health(self.process, now)

    def _exited(self, process: ManagedProcess, code: int, now: float) -> None:
        problem = f"the gateway {describe_exit(code)}"
        if code > 0:
            problem += f": {process.last_problem()}"
        stop_processes([process], self.host.stop_grace_s)
        self.process, self.ready_since = None, None
        delay = self.backoff.fail(problem, now)
        self.host.processes_changed()
        self.host.notify(
            f"{self.role}: {problem}; restarting it in {delay:g}s "
            f"(failure {self.backoff.failures} in a row; log: {process.log})"
        )

    def _start(self) -> None:
        self.port = self.host.free_port_for(self.role, self.port)
        command = [
            self.host.python,
            "-m",
            GATEWAY_MODULE,
            "--config",
            str(self.config_path),
            "--host",
            LOOPBACK,
            "--port",
            str(self.port),
        ]
        process = ManagedProcess(
            self.role, command, env=self.host.base_env(), log=self.log, cwd=self.directory
        )
        self.process = process
        self.host.processes_changed()
        self.host.notify(
            f"started {self.role} on {self.url} (pid {process.pid}, config {self.config_path}, "
            f"log {self.log})"
        )

    def _step_health(self, process: ManagedProcess, now: float) -> GatewayObservation:
        endpoint = f"{self.url}/v1"
        # /readyz: /healthz's document, 503 while a failClosed limit store is unreachable
        status, detail, response = self.host.get(f"{self.url}/readyz")
        health: Any = None
        if response is not None and status in (200, 503):
            with contextlib.suppress(ValueError):
                health = response.json()
        if not isinstance(health, dict):
            self.ready_since = None
            return GatewayObservation(
                endpoint=endpoint,
                ready=False,
                message=f"not answering /healthz yet ({detail}; log: {self.log})",
            )
        if status == 503:
            return GatewayObservation(
                endpoint=endpoint,
                ready=False,
                message=f"it refuses requests: {health.get('refusing')} (log: {self.log})",
            )
        if health.get("configError"):
            return GatewayObservation(
                endpoint=endpoint,
                ready=False,
                message=f"it keeps its previous config: {health['configError']} (log: {self.log})",
            )
        loaded = {str(name): weight for name, weight in (health.get("versions") or {}).items()}
        if loaded != self.routing:
            split = ",".join(f"{name}={weight:g}" for name, weight in loaded.items())
            change = "routes" if self.routing is None else "reloaded its config in place; it routes"
            self.host.notify(f"{self.role} {change} {split} (pid {process.pid})")
            self.routing = loaded
        if loaded != self.expected:
            return GatewayObservation(
                endpoint=endpoint,
                ready=False,
                message=f"it has not loaded its new config {self.config_path} yet (log: {self.log})",
            )
        if self.ready_since is None:
            self.ready_since = now
        else:
            self.backoff.settle(self.ready_since, now)
        return GatewayObservation(endpoint=endpoint, ready=True)

    def forget(self) -> None:
        """Give back its port and remove its config; its process is stopped by the caller."""
        self.host.ports.release(self.port)
        with contextlib.suppress(FileNotFoundError):
            self.config_path.unlink()
