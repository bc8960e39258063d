"""LocalServing's process supervision with small fake processes (python -c scripts), in seconds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil

from kubetune.backends.local import process_alive


def _wait_gone(pid: int, created: float, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not process_alive(pid, created):
            return True
        time.sleep(0.05)
    return False


def test_a_server_stops_when_kubetune_up_is_killed_outright(tmp_path: Path) -> None:
    # `up` killed with SIGKILL (or by the OOM killer) cannot stop what it started: each process it
    # starts must go with it, not hold its port and model memory until the next `kubetune up`.
    fake_up = textwrap.dedent(
        """
        import os, sys, time
        from pathlib import Path
        from kubetune.local.serving import ManagedProcess

        server = ManagedProcess(
            "server", [sys.executable, "-c", "import time; time.sleep(60)"],
            env=os.environ, log=Path(sys.argv[1]), cwd=Path(sys.argv[2]),
        )
        print(server.pid, flush=True)
        time.sleep(60)
        """
    )
    up = subprocess.Popen(
        [sys.executable, "-c", fake_up, str(tmp_path / "server.log"), str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    server_pid = 0
    created = 0.0
    try:
        assert up.stdout is not None
        server_pid = int(up.stdout.readline())
        created = psutil.Process(server_pid).create_time()
        up.kill()
        up.wait(timeout=10)
        assert _wait_gone(server_pid, created, timeout_s=5), "the server outlived the killed `kubetune up`"
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        if server_pid and process_alive(server_pid, created):
            os.kill(server_pid, signal.SIGKILL)
