"""What does the gateway add? Latency and throughput of a fast model-server stub, direct vs through it.

Starts, each in its own process on a free loopback port: a stub OpenAI server that answers every
request at once with a fixed chat completion (raw ASGI on uvicorn, so the stub costs as little as
possible), and the gateway (``python -m kubetune.gateway``) with two versions (80/20, sticky by user)
both pointing at the stub. The load comes from ``wrk`` (compiled; one thread, a Lua script for the
POST bodies, which cycle through 500 users), so the client is not what limits the figures; its CPU
time is measured and reported beside the stub's and the gateway's.

Each round measures, directly against the stub and through the gateway back to back:

- saturation: closed loop, ``--connections`` connections each sending as soon as its last answer
  arrived: throughput and latency percentiles;
- fixed offered rates (``--rates``): open loop. Debian's wrk 4.1 has no ``--rate`` (that is wrk2), so
  the Lua ``delay()`` hook schedules every request on a fixed timetable (``start + n / rate``, read
  from CLOCK_MONOTONIC through LuaJIT's FFI) instead of on the previous answer; with enough idle
  connections each request leaves at its slot whatever the answers do. A request that could not leave
  on time (every connection busy) is counted as late and reported, since its latency would then
  understate the wait (coordinated omission); wrk's timers have 1 ms resolution.

At least 5 interleaved rounds; each round's figures are printed, then per claim the median and
min-max over rounds and whether the target is met by the median and by the worst round. Targets:
under 2 ms added p50 at each fixed rate, and at least half the direct throughput at saturation.
Everything goes to benchmarks/results/gateway.json. Not part of the test suite:

    python benchmarks/gateway.py [--rounds 5] [--duration 5] [--rates 100,300] [--connections 16]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from _results import MIN_ROUNDS, BenchmarkRecord, Target

DEPLOYMENT = "bench"
STUB_ANSWER = json.dumps(
    {
        "id": "stub",
        "object": "chat.completion",
        "created": 1700000000,
        "model": DEPLOYMENT,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "billing"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13},
    }
).encode()


async def stub_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The fastest honest OpenAI stub: reads the request, answers a fixed completion."""
    if scope["type"] != "http":
        return
    more_body = True
    while more_body:
        message = await receive()
        more_body = message.get("more_body", False)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(STUB_ANSWER)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": STUB_ANSWER})


def serve_stub(port: int) -> None:
    import uvicorn

    uvicorn.run(stub_app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="off")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until_up(url: str, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(url, timeout=1, trust_env=False)  # loopback: never through a proxy
            return
        except httpx.TransportError:
            if process.poll() is not None:
                raise RuntimeError(f"the {what} exited with code {process.returncode}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {what} did not come up at {url}") from None
            time.sleep(0.1)


ADDED_P50_TARGET = Target(2.0, higher_is_better=False)
THROUGHPUT_TARGET = Target(0.5)
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
OPEN_LOOP_CONNECTIONS = 32
USERS = 500
RESULT_PREFIX = "KUBETUNE_WRK_RESULT "

# The body of every request cycles through USERS users, built once (wrk.format) so each request costs
# the generator a table lookup. done() prints one JSON line the benchmark parses.
LUA_COMMON = """
local requests = {}
local next_request = 0
late = 0
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  for user = 0, %(users)d - 1 do
    local body = '{"model": "%(deployment)s", "messages": [{"role": "user", "content": ' ..
      '"My card was charged twice for order #' .. user .. '."}], "user": "user-' .. user ..
      '", "temperature": 0.7}'
    requests[user] = wrk.format("POST", "/v1/chat/completions",
      {["Content-Type"] = "application/json"}, body)
  end
end

function request()
  next_request = (next_request + 1) %% %(users)d
  return requests[next_request]
end

function done(summary, latency, requests)
  local late_total = 0
  for _, thread in ipairs(threads) do late_total = late_total + (thread:get("late") or 0) end
  local errors = summary.errors
  io.write("%(prefix)s{")
  io.write(string.format('"requests": %%d, "durationMicros": %%d, ', summary.requests, summary.duration))
  io.write(string.format('"errors": %%d, "non2xx": %%d, "late": %%d, "percentilesMicros": {',
    errors.connect + errors.read + errors.write + errors.timeout, errors.status, late_total))
  for index, p in ipairs({%(percentiles)s}) do
    if index > 1 then io.write(", ") end
    io.write(string.format('"%%g": %%d', p, latency:percentile(p)))
  end
  io.write("}}\\n")
end
"""

# Open loop: each call of delay() (one per request, before it is sent) takes the next slot of a fixed
# timetable; a slot already past means the request leaves late.
LUA_OPEN_LOOP = """
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } kubetune_timespec;
int clock_gettime(int clock_id, kubetune_timespec *tp);
]]
local now_spec = ffi.new("kubetune_timespec")
local function now_micros()
  ffi.C.clock_gettime(1, now_spec)  -- CLOCK_MONOTONIC
  return tonumber(now_spec.tv_sec) * 1e6 + tonumber(now_spec.tv_nsec) / 1e3
end
local interval_micros = 1e6 / %(rate)s
local next_slot = nil

function delay()
  local now = now_micros()
  if next_slot == nil then next_slot = now end
  local wait = next_slot - now
  next_slot = next_slot + interval_micros
  if wait < -1000 then late = late + 1 end
  if wait <= 0 then return 0 end
  return math.floor(wait / 1000)
end
"""


@dataclass(frozen=True)
class LoadResult:
    """One wrk run against one target."""

    requests: int
    seconds: float
    errors: int
    late: int
    percentiles_ms: dict[str, float]
    generator_cpu_seconds: float
    server_cpu_seconds: dict[str, float]

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "seconds": round(self.seconds, 3),
            "throughput": round(self.throughput, 1),
            "errors": self.errors,
            "late": self.late,
            "latencyMs": {key: round(value, 3) for key, value in self.percentiles_ms.items()},
            "generatorCpuSeconds": round(self.generator_cpu_seconds, 3),
            "serverCpuSeconds": {key: round(value, 3) for key, value in self.server_cpu_seconds.items()},
        }


def lua_script(directory: Path, rate: float | None) -> Path:
    values = {
        "users": USERS,
        "deployment": DEPLOYMENT,
        "prefix": RESULT_PREFIX,
        "percentiles": ", ".join(str(p) for p in PERCENTILES),
    }
    text = LUA_COMMON % values
    if rate is not None:
        text += LUA_OPEN_LOOP % {"rate": repr(float(rate))}
    path = directory / (f"open-{rate:g}.lua" if rate is not None else "closed.lua")
    path.write_text(text)
    return path


def run_wrk(
    wrk: str, script: Path, url: str, connections: int, seconds: int, servers: dict[str, int]
) -> LoadResult:
    """One wrk run; its CPU time comes from its rusage (wait4), the servers' from /proc."""
    children_before = os.times()
    servers_before = {name: cpu_seconds(pid) for name, pid in servers.items()}
    command = [wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", "-s", str(script), url]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = process.communicate(timeout=seconds + 60)
    servers_after = {name: cpu_seconds(pid) for name, pid in servers.items()}
    # communicate() reaped wrk, so the reaped children's CPU time (RUSAGE_CHILDREN) grew by wrk's alone:
    # the servers are children too, but are reaped only at the end.
    children_after = os.times()
    generator_cpu = (children_after.children_user - children_before.children_user) + (
        children_after.children_system - children_before.children_system
    )
    if process.returncode != 0:
        raise RuntimeError(f"wrk exited with {process.returncode}: {stderr.strip()[:500]}")
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if not lines:
        raise RuntimeError(f"wrk printed no result line: {stdout[-500:]} {stderr[-500:]}")
    parsed = json.loads(lines[-1][len(RESULT_PREFIX) :])
    return LoadResult(
        requests=int(parsed["requests"]),
        seconds=float(parsed["durationMicros"]) / 1e6,
        errors=int(parsed["errors"]) + int(parsed["non2xx"]),
        late=int(parsed["late"]),
        percentiles_ms={key: value / 1000 for key, value in parsed["percentilesMicros"].items()},
        generator_cpu_seconds=generator_cpu,
        server_cpu_seconds={name: servers_after[name] - servers_before[name] for name in servers},
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process, from Linux's /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_servers(tmp: Path) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes], str, str]:
    stub_port, gateway_port = free_port(), free_port()
    stub_url, gateway_url = f"http://127.0.0.1:{stub_port}", f"http://127.0.0.1:{gateway_port}"
    config_path = tmp / "gateway.json"
    config_path.write_text(
        json.dumps(
            {
                "deployment": DEPLOYMENT,
                "versions": [
                    {"name": "tuned", "url": stub_url, "weight": 80},
                    {"name": "int8", "url": stub_url, "weight": 20},
                ],
                "generation": {"defaults": {"maxTokens": 16}, "limits": {"maxTemperature": 1.5}},
            }
        )
    )
    stub = subprocess.Popen(
        [sys.executable, __file__, "--serve-stub", str(stub_port)], stdout=subprocess.DEVNULL
    )
    gateway_command = [sys.executable, "-m", "kubetune.gateway", "--config", str(config_path)]
    gateway_command += ["--port", str(gateway_port), "--log-level", "warning"]
    gateway = subprocess.Popen(gateway_command, stdout=subprocess.DEVNULL)
    return stub, gateway, stub_url, gateway_url


def phase_line(label: str, direct: LoadResult, through: LoadResult) -> str:
    def figures(result: LoadResult) -> str:
        cores = result.generator_cpu_seconds / result.seconds
        return (
            f"{result.throughput:6.0f}/s p50 {result.percentiles_ms['50']:6.2f} p99 "
            f"{result.percentiles_ms['99']:7.2f} ms, wrk {cores:4.0%} of a core"
            + (f", {result.late} late" if result.late else "")
            + (f", {result.errors} errors" if result.errors else "")
        )

    return f"  {label:14} direct {figures(direct)} | gateway {figures(through)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rounds", type=int, default=MIN_ROUNDS, help=f"interleaved rounds (>= {MIN_ROUNDS})"
    )
    parser.add_argument("--duration", type=int, default=5, help="seconds of each wrk run")
    parser.add_argument("--rates", default="100,300", help="offered rates (requests/s), comma-separated")
    parser.add_argument("--connections", type=int, default=16, help="connections at saturation")
    parser.add_argument("--serve-stub", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_stub is not None:
        serve_stub(args.serve_stub)
        return 0
    if args.rounds < MIN_ROUNDS:
        parser.error(f"--rounds must be at least {MIN_ROUNDS} (a ratio needs its spread)")
    if not 1 <= args.duration <= 600:
        parser.error("--duration must be 1..600 seconds")
    if not 1 <= args.connections <= 1024:
        parser.error("--connections must be 1..1024")
    try:
        rates = [float(rate) for rate in args.rates.split(",") if rate.strip()]
    except ValueError:
        parser.error(f"--rates must be comma-separated numbers, got {args.rates!r}")
    if not rates or any(not 0 < rate <= 100_000 for rate in rates):
        parser.error("--rates must hold at least one rate in (0, 100000] requests/s")
    wrk = shutil.which("wrk")
    if wrk is None:
        print(
            "error: wrk is not installed (Debian: apt-get install wrk; `make system-deps`)", file=sys.stderr
        )
        return 2

    settings = {
        "rounds": args.rounds,
        "durationSeconds": args.duration,
        "rates": rates,
        "connections": args.connections,
        "openLoopConnections": OPEN_LOOP_CONNECTIONS,
        "generator": subprocess.run([wrk, "-v"], capture_output=True, text=True).stdout.split("[")[0].strip(),
    }
    record = BenchmarkRecord("gateway", Path(__file__), settings, argv)
    phases = ["saturation", *(f"{rate:g}/s" for rate in rates)]
    results: dict[str, dict[str, list[LoadResult]]] = {
        phase: {"direct": [], "gateway": []} for phase in phases
    }
    with tempfile.TemporaryDirectory() as tmp:
        scripts = {"saturation": lua_script(Path(tmp), None)}
        scripts |= {f"{rate:g}/s": lua_script(Path(tmp), rate) for rate in rates}
        stub, gateway, stub_url, gateway_url = start_servers(Path(tmp))
        try:
            wait_until_up(f"{stub_url}/", stub, "stub")
            wait_until_up(f"{gateway_url}/healthz", gateway, "gateway")
            servers = {"stub": stub.pid, "gateway": gateway.pid}
            targets = {"direct": stub_url, "gateway": gateway_url}
            for url in targets.values():
                run_wrk(wrk, scripts["saturation"], url, args.connections, 2, servers)
            print(
                f"gateway benchmark: {args.rounds} rounds of {args.duration}s wrk runs, saturation at "
                f"{args.connections} connections and open loop at {', '.join(phases[1:])}; "
                f"load average {record.load_before}"
            )
            for round_number in range(1, args.rounds + 1):
                print(f"round {round_number}")
                figures: dict[str, Any] = {}
                # Alternating which target goes first, so neither always follows the other's load.
                order = ["direct", "gateway"] if round_number % 2 else ["gateway", "direct"]
                for phase in phases:
                    connections = args.connections if phase == "saturation" else OPEN_LOOP_CONNECTIONS
                    for name in order:
                        result = run_wrk(
                            wrk, scripts[phase], targets[name], connections, args.duration, servers
                        )
                        results[phase][name].append(result)
                    direct, through = results[phase]["direct"][-1], results[phase]["gateway"][-1]
                    figures[phase] = {"direct": direct.to_json(), "gateway": through.to_json()}
                    print(phase_line(phase, direct, through))
                record.add_round({"order": order, "loadAverage": os.getloadavg()[0], "phases": figures})
        finally:
            for process in (gateway, stub):
                process.terminate()
                process.wait(timeout=10)

    summaries = [
        record.summarize(
            "throughputRatio",
            f"throughput gateway / direct at saturation ({args.connections} connections)",
            [
                through.throughput / direct.throughput
                for direct, through in zip(
                    results["saturation"]["direct"], results["saturation"]["gateway"], strict=True
                )
            ],
            THROUGHPUT_TARGET,
        )
    ]
    for phase in phases[1:]:
        summaries.append(
            record.summarize(
                f"addedP50Ms {phase}",
                f"added p50 latency (ms) at {phase} offered",
                [
                    through.percentiles_ms["50"] - direct.percentiles_ms["50"]
                    for direct, through in zip(
                        results[phase]["direct"], results[phase]["gateway"], strict=True
                    )
                ],
                ADDED_P50_TARGET,
            )
        )
    record.extra["phases"] = {
        phase: {name: median_figures(runs) for name, runs in by_target.items()}
        for phase, by_target in results.items()
    }
    for summary in summaries:
        print(summary.line())
    generator_share = generator_cpu_share(results)
    record.extra["generatorCpuShare"] = generator_share
    print(
        f"wrk's share of the CPU the three processes used: median {generator_share['median']:.0%} "
        f"(max {generator_share['max']:.0%}); this machine has {os.cpu_count()} CPUs"
    )
    print(f"wrote {record.write()}")
    return 0 if all(summary.met_by_median for summary in summaries) else 1


def median_figures(runs: list[LoadResult]) -> dict[str, Any]:
    """Per target and phase: the median over rounds of throughput, each percentile and CPU per request."""
    return {
        "throughput": statistics.median(run.throughput for run in runs),
        "latencyMs": {
            key: statistics.median(run.percentiles_ms[key] for run in runs) for key in runs[0].percentiles_ms
        },
        "late": sum(run.late for run in runs),
        "errors": sum(run.errors for run in runs),
        "generatorCoreShare": statistics.median(run.generator_cpu_seconds / run.seconds for run in runs),
        "cpuMsPerRequest": {
            name: statistics.median(run.server_cpu_seconds[name] / run.requests * 1000 for run in runs)
            for name in runs[0].server_cpu_seconds
        }
        | {"wrk": statistics.median(run.generator_cpu_seconds / run.requests * 1000 for run in runs)},
    }


def generator_cpu_share(results: dict[str, dict[str, list[LoadResult]]]) -> dict[str, float]:
    """wrk's CPU time over the CPU time of wrk + stub + gateway during each run: median and max."""
    shares = []
    for by_target in results.values():
        for runs in by_target.values():
            for run in runs:
                total = run.generator_cpu_seconds + sum(run.server_cpu_seconds.values())
                shares.append(run.generator_cpu_seconds / total if total else 0.0)
    return {"median": statistics.median(shares), "max": max(shares)}


if __name__ == "__main__":
    sys.exit(main())
