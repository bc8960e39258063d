"""`make quickstart`'s shell recipe, with `kubetune` and `python` replaced by fakes in a fake venv."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]

FAKE_UP = textwrap.dedent(
    f"""\
    #!{sys.executable}
    import os, signal, sys, time
    from pathlib import Path

    if sys.argv[1:2] != ["up"]:
        sys.exit(0)  # `kubetune dev tiny-base`, `kubetune get`
    Path(os.environ["FAKE_UP_PID_FILE"]).write_text(str(os.getpid()))
    time.sleep(1.5)  # importing, as the real `up` does for a few seconds before it handles signals
    stop = []
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda signum, _: stop.append(signum))
    deadline = time.monotonic() + 20
    while not stop and time.monotonic() < deadline:
        time.sleep(0.05)
    sys.exit(0 if stop else 9)  # 9: nobody stopped it, it would have served on
    """
)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_quickstart_stops_up_when_query_fails_while_up_is_still_starting(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "kubetune").write_text(FAKE_UP)
    (bin_dir / "python").write_text("#!/bin/sh\necho 'query.py: ImportError' >&2\nexit 1\n")
    for script in bin_dir.iterdir():
        script.chmod(0o755)
    pid_file = tmp_path / "up.pid"
    started = time.monotonic()
    try:
        result = subprocess.run(
            ["make", "--no-print-directory", "-o", "setup", "quickstart", f"BIN={bin_dir}"],
            cwd=REPO,
            env={**os.environ, "FAKE_UP_PID_FILE": str(pid_file)},
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        if pid_file.exists():
            with_pid = int(pid_file.read_text())
            with contextlib.suppress(ProcessLookupError):
                os.kill(with_pid, signal.SIGKILL)
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    # 143: SIGTERM ended it before it handled signals (it had started nothing yet); 0: it stopped.
    assert re.search(r"query.py exited with 1, kubetune up with (0|143)$", result.stdout, re.MULTILINE), (
        result.stdout + result.stderr
    )
    assert elapsed < 15, f"make waited {elapsed:.0f}s for a `kubetune up` it had asked to stop"
