"""What every process local serving starts shares: the kubetune home, loopback ports, the
environment, the HTTP probe, and the line said to the person at the terminal."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from kubetune.common.supervision import STOP_GRACE_S
from kubetune_contract.serving import MODEL_DIR_ENV

LOOPBACK = "127.0.0.1"
PROBE_TIMEOUT_S = 1.0

Notify = Callable[[str], None]


def ignore(_: str) -> None:
    pass


class Ports:
    """Free loopback ports, none handed out twice while it is held."""

    def __init__(self) -> None:
        self._held: set[int] = set()

    def allocate(self) -> int:
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.bind((LOOPBACK, 0))
                port = int(probe.getsockname()[1])
            if port not in self._held:
                self._held.add(port)
                return port

    def release(self, port: int) -> None:
        self._held.discard(port)

    def clear(self) -> None:
        self._held.clear()

    def ensure_free(self, port: int) -> int:
        """``port`` if nothing listens on it, else a newly allocated one (``port`` is released)."""
        if self.free(port):
            return port
        self.release(port)
        return self.allocate()

    @staticmethod
    def free(port: int) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((LOOPBACK, port))
            except OSError:
                return False
        return True


@dataclass
class ServingHost:
    """The shared part of :class:`~kubetune.local.serving.LocalServing`, handed to each version
    server and gateway it runs.

    ``processes_changed`` is called whenever a process starts or stops, so the record of processes
    (for the next `kubetune up` to reap after a hard kill) stays current.
    """

    home: Path
    notify: Notify = ignore
    python: str = sys.executable
    stop_grace_s: float = STOP_GRACE_S
    processes_changed: Callable[[], None] = lambda: None
    ports: Ports = field(default_factory=Ports)
    notices: set[str] = field(default_factory=set)
    http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=PROBE_TIMEOUT_S, trust_env=False))

    @property
    def root(self) -> Path:
        return self.home / "serving"

    @property
    def bentoml_home(self) -> Path:
        return self.home / "bentoml"

    def free_port_for(self, role: str, port: int) -> int:
        """``port`` if it is still free, else a new one, saying that ``role`` moves there."""
        free = self.ports.ensure_free(port)
        if free != port:
            self.notify(f"{role}: port {port} is taken, moving to {free}")
        return free

    def notify_once(self, notice: str) -> None:
        if notice not in self.notices:
            self.notices.add(notice)
            self.notify(notice)

    def base_env(self) -> dict[str, str]:
        """This process's environment without BentoML settings, plus the serving home."""
        env = {key: value for key, value in os.environ.items() if not key.startswith("BENTOML_")}
        env.pop(MODEL_DIR_ENV, None)
        env.update(
            {
                "BENTOML_HOME": str(self.bentoml_home),
                "BENTOML_DO_NOT_TRACK": "True",
                "PYTHONUNBUFFERED": "1",
            }
        )
        return env

    def get(self, url: str) -> tuple[int | None, str, httpx.Response | None]:
        """(HTTP status or None, what happened in words, the response)."""
        try:
            response = self.http.get(url)
        except httpx.HTTPError as exc:
            return None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, None
        return response.status_code, f"HTTP {response.status_code}", response

    def probe(self, url: str) -> tuple[int | None, str]:
        status, detail, _ = self.get(url)
        return status, detail
