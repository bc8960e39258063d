"""A real Redis server for tests.

``with running_redis(tmp_path) as redis:`` starts Debian's ``redis-server`` (``KUBETUNE_TEST_REDIS``
overrides the binary) on a free 127.0.0.1 port, without persistence, and returns once it answers
PING; ``redis.url`` is its ``redis://`` URL. ``redis.stop()`` stops it early (to test what the
gateway does when its store is gone); on exit it is stopped in any case. ``args`` are added to its
command line (e.g. a chart's ``--requirepass PASSWORD``); with ``password`` the readiness check
authenticates first.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from asgi_server import free_port

DEFAULT_BINARY = "/usr/bin/redis-server"


class RedisUnavailable(RuntimeError):
    """There is no redis-server binary to run."""


def redis_binary() -> str:
    binary = os.environ.get("KUBETUNE_TEST_REDIS") or DEFAULT_BINARY
    found = shutil.which(binary)
    if found is None:
        raise RedisUnavailable(
            f"no redis-server at {binary} (install redis-server or set KUBETUNE_TEST_REDIS)"
        )
    return found


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    password: str | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as connection:
                if self.password is not None:
                    secret = self.password.encode()
                    connection.sendall(b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(secret), secret))
                    if not connection.recv(16).startswith(b"+OK"):
                        return False
                connection.sendall(b"PING\r\n")
                return connection.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextmanager
def running_redis(
    directory: Path, timeout_s: float = 20.0, args: Sequence[str] = (), password: str | None = None
) -> Iterator[RedisServer]:
    binary = redis_binary()
    directory.mkdir(parents=True, exist_ok=True)
    for _ in range(3):  # a port taken between free_port() and the bind: try another
        port = free_port()
        log = directory / f"redis-{port}.log"
        command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        command += ["--dir", str(directory), "--logfile", str(log), *args]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        server = RedisServer(port, process, log, password)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and server.process.poll() is None and not server.ping():
            time.sleep(0.05)
        if server.ping():
            try:
                yield server
            finally:
                server.stop()
            return
        server.stop()
    raise RuntimeError(f"redis-server did not start; see {directory}")
