"""Process supervision (kubetune.common.supervision) with real short-lived child processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from kubetune.common.supervision import (
    RESTART_BACKOFF,
    Backoff,
    BackoffPolicy,
    ManagedProcess,
    create_time,
    describe_exit,
    last_problem_line,
    process_alive,
    stop_process_group,
    stop_processes,
    stop_recorded,
    wait_gone,
)

SLEEPER = [sys.executable, "-c", "import time; time.sleep(30)"]
# Says "ready" once SIGTERM is ignored, so the test never signals it before that.
IGNORES_SIGTERM = [
    sys.executable,
    "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
    "time.sleep(30)",
]
# Starts a sleeper in a session of its own (as BentoML starts its workers), then sleeps itself.
LEAVES_ITS_GROUP = [
    sys.executable,
    "-c",
    "import subprocess, sys, time; "
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'], start_new_session=True); "
    "print('ready', flush=True); time.sleep(30)",
]


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[ManagedProcess]]:
    """Processes a test starts; whatever still runs at the end is killed."""
    processes: list[ManagedProcess] = []
    yield processes
    for process in processes:
        for pid in [process.pid, *process.descendants]:
            if process_alive(pid, None):
                os.kill(pid, signal.SIGKILL)
        process.popen.wait()


def start(started: list[ManagedProcess], tmp_path: Path, command: list[str], name: str) -> ManagedProcess:
    process = ManagedProcess(name, command, env=os.environ, log=tmp_path / f"{name}.log", cwd=tmp_path)
    started.append(process)
    return process


def wait_for(condition: object, timeout_s: float = 10.0) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {condition}"
        time.sleep(0.02)


def test_a_child_that_honours_sigterm_stops_with_it(started: list[ManagedProcess], tmp_path: Path) -> None:
    sleeper = start(started, tmp_path, SLEEPER, "sleeper")
    assert sleeper.running() and sleeper.exit_code() is None
    began = time.monotonic()
    stop_processes([sleeper], grace_s=10.0)
    assert time.monotonic() - began < 5.0
    assert not sleeper.running()
    assert sleeper.exit_code() == -signal.SIGTERM
    assert describe_exit(-signal.SIGTERM) == "was killed by SIGTERM"


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace(
    started: list[ManagedProcess], tmp_path: Path
) -> None:
    stubborn = start(started, tmp_path, IGNORES_SIGTERM, "stubborn")
    wait_for(lambda: "ready" in stubborn.log.read_text().splitlines())  # a line of its own
    began = time.monotonic()
    stop_processes([stubborn], grace_s=0.5)
    assert 0.5 <= time.monotonic() - began < 5.0
    assert not stubborn.running()
    assert stubborn.exit_code() == -signal.SIGKILL


def test_a_descendant_that_left_the_group_is_stopped_with_its_parent(
    started: list[ManagedProcess], tmp_path: Path
) -> None:
    parent = start(started, tmp_path, LEAVES_ITS_GROUP, "parent")
    wait_for(lambda: "ready" in parent.log.read_text().splitlines())
    assert parent.track()
    (worker_pid, worker_created), *_ = parent.descendants.items()
    assert os.getpgid(worker_pid) != os.getpgid(parent.pid)
    record = parent.record()
    assert record["descendants"] == {str(worker_pid): worker_created}

    # The parent crashes: its worker lives on, holding what it held, until it is stopped directly.
    os.kill(parent.pid, signal.SIGKILL)
    wait_for(lambda: parent.exit_code() is not None)
    assert parent.running() and process_alive(worker_pid, worker_created)
    stop_processes([parent], grace_s=5.0)
    assert not parent.running()
    assert not process_alive(worker_pid, worker_created)


def test_a_child_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    # `kubetune up` killed with SIGKILL (or by the OOM killer) cannot stop what it started: each process it
    # starts must go with it, not hold its port and model memory until the next `kubetune up`.
    fake_up = textwrap.dedent(
        """
        import os, sys, time
        from pathlib import Path
        from kubetune.common.supervision import ManagedProcess

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
        wait_for(lambda: not process_alive(server_pid, created), timeout_s=5)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        if server_pid and process_alive(server_pid, created):
            os.kill(server_pid, signal.SIGKILL)


def test_a_crash_loop_backs_off_longer_each_time_up_to_the_cap(
    started: list[ManagedProcess], tmp_path: Path
) -> None:
    crashing = [sys.executable, "-c", "import sys; print('ValueError: no model here'); sys.exit(3)"]
    backoff = Backoff(BackoffPolicy(first_s=0.05, factor=2.0, cap_s=0.2))
    delays: list[float] = []
    for attempt in range(5):
        wait_for(lambda: backoff.waiting(time.monotonic()) == 0)
        process = start(started, tmp_path, crashing, f"attempt-{attempt}")
        code = process.popen.wait(timeout=10)
        assert code == 3
        delays.append(backoff.fail(f"{describe_exit(code)}: {process.last_problem()}", time.monotonic()))
    assert delays == [0.05, 0.1, 0.2, 0.2, 0.2]
    assert backoff.failures == 5
    assert backoff.problem == "exited with code 3: ValueError: no model here"
    assert 0 < backoff.waiting(time.monotonic()) <= 0.2


def test_the_restart_policy_doubles_from_a_second_to_a_minute_and_forgives_a_stable_minute() -> None:
    assert [RESTART_BACKOFF.delay(failures) for failures in range(1, 10)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    backoff = Backoff()
    assert backoff.waiting(now=100.0) == 0.0
    assert backoff.fail("crashed", now=100.0) == 1.0
    assert backoff.fail("crashed", now=101.0) == 2.0
    assert backoff.waiting(now=102.0) == 1.0
    backoff.settle(up_since=103.0, now=162.9)
    assert backoff.failures == 2
    backoff.settle(up_since=103.0, now=163.0)
    assert (backoff.failures, backoff.problem, backoff.waiting(now=163.0)) == (0, None, 0.0)
    assert backoff.fail("crashed again", now=200.0) == 1.0


def test_a_recorded_pid_is_alive_only_while_the_same_process_runs(tmp_path: Path) -> None:
    child = subprocess.Popen(SLEEPER)
    created = create_time(child.pid)
    try:
        assert created is not None
        assert process_alive(child.pid, created) and process_alive(child.pid, None)
        assert not process_alive(child.pid, created - 5.0)  # the pid was reused by another process
        assert not process_alive(None, None)
        child.kill()
        wait_for(lambda: psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE)
        assert not process_alive(child.pid, created)  # exited, not yet reaped
    finally:
        child.kill()
        child.wait()


def test_stop_recorded_stops_what_a_previous_process_left_running(tmp_path: Path) -> None:
    # What a killed `kubetune up` left is no child of the next one: start it from a launcher that exits.
    launcher = (
        "import subprocess, sys; "
        f"leftover = subprocess.Popen({IGNORES_SIGTERM!r}, "
        "stdout=subprocess.PIPE, stderr=subprocess.DEVNULL); "
        "leftover.stdout.readline(); print(leftover.pid)"
    )
    pid = int(subprocess.run([sys.executable, "-c", launcher], stdout=subprocess.PIPE, check=True).stdout)
    created = create_time(pid)
    try:
        assert process_alive(pid, created)
        began = time.monotonic()
        assert stop_recorded([(pid, created), (pid, None)], grace_s=0.3)
        assert time.monotonic() - began >= 0.3  # it ignored SIGTERM: SIGKILL stopped it
        assert not process_alive(pid, created)
        assert not stop_recorded([(pid, created)], grace_s=0.3)
    finally:
        if process_alive(pid, created):
            os.kill(pid, signal.SIGKILL)


def test_stop_process_group_stops_the_whole_group(tmp_path: Path) -> None:
    in_group = (
        "import subprocess, sys, time; "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); "
        "print('ready', flush=True); time.sleep(30)"
    )
    leader = subprocess.Popen(
        [sys.executable, "-c", in_group], start_new_session=True, stdout=subprocess.PIPE, text=True
    )
    try:
        assert leader.stdout is not None and leader.stdout.readline().strip() == "ready"
        (member,) = psutil.Process(leader.pid).children()
        member_created = member.create_time()
        stop_process_group(leader.pid, create_time(leader.pid), grace_s=5.0)
        assert not process_alive(leader.pid, None)
        wait_for(lambda: not process_alive(member.pid, member_created), timeout_s=5)
    finally:
        if leader.poll() is None:
            os.killpg(leader.pid, signal.SIGKILL)
            leader.wait()


def test_an_exited_process_nobody_reaps_yet_counts_as_gone(tmp_path: Path) -> None:
    # Its parent never waits for it (as an init that reaps slowly, in many containers, does not).
    negligent = (
        "import subprocess, sys, time; "
        "child = subprocess.Popen([sys.executable, '-c', 'pass']); print(child.pid, flush=True); "
        "time.sleep(30)"
    )
    parent = subprocess.Popen([sys.executable, "-c", negligent], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = psutil.Process(int(parent.stdout.readline()))
        wait_for(lambda: child.status() == psutil.STATUS_ZOMBIE)
        gone: list[psutil.Process] = []
        began = time.monotonic()
        assert wait_gone([child], timeout_s=10.0, on_gone=gone.append) == []
        assert gone == [child] and time.monotonic() - began < 2.0
    finally:
        parent.kill()
        parent.wait()


def test_the_problem_line_is_the_last_error_of_this_run(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    log.write_text("old run\nRuntimeError: from before\n")
    offset = log.stat().st_size
    with log.open("a") as handle:
        handle.write("loading\nOSError: model.safetensors not found\nshutting down\n\n")
    assert last_problem_line(log, offset) == "OSError: model.safetensors not found"
    assert last_problem_line(log) == "OSError: model.safetensors not found"
    log.write_text("all fine\nbye\n")
    assert last_problem_line(log) == "bye"
    assert last_problem_line(tmp_path / "missing.log") == "(no log)"
