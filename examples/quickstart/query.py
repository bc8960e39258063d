"""Ask the quickstart's ModelDeployment to route a few tickets, with the official openai client.

    kubetune up -f examples/quickstart/ &       # fine-tune, quantize, then serve tuned + int8 80/20
    python examples/quickstart/query.py         # waits until it is Ready, then queries the gateway

It waits for ModelDeployment/support-router to be Ready (`kubetune get mdep support-router -o json`
reads the local store), then sends chat completions to `status.endpoint`: a few tickets from
different users (the answer and the `x-kubetune-version` header saying which version answered),
one streamed, one pinned to a version with the override header, and one request from each of ~50
users to show the 80/20 split (each user always lands on the same version).

Exit code 0 when every answer came from one of the deployment's versions, 1 otherwise (or when the
deployment fails, or `kubetune up` stops, before it is Ready).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import httpx
import psutil
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

INSTRUCTION = "Route the support ticket to one team: billing, technical, account, shipping or returns."
TICKETS = [
    ("alice", "Hello, you took $19.99 from my card twice this month. Please refund one of them."),
    ("bob", "The app crashes every time I open the settings page since the last update."),
    ("carol", "I forgot my password and the reset email never arrives."),
    ("dave", "The tracking number for my order has not updated in 9 days."),
    ("erin", "Can I return the blue jacket I bought last week? It does not fit."),
]
STREAMED = ("frank", "Only half of my order arrived, the second box with the desk lamp is missing.")


def kubetune(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kubetune", *args], capture_output=True, text=True, check=False
    )


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == type_), {})


def process_running(pid: int) -> bool:
    """Whether the process runs (an exited one its parent has not reaped yet does not)."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True


def endpoint_problem(endpoint: str) -> str | None:
    """None when the gateway answers GET {endpoint}/models, else what went wrong."""
    try:
        response = httpx.get(f"{endpoint}/models", timeout=10, trust_env=False)
    except httpx.HTTPError as exc:
        return type(exc).__name__
    return None if response.status_code == 200 else f"HTTP {response.status_code}"


def wait_until_ready(name: str, namespace: str, timeout_s: float, up_pid: int | None) -> dict[str, Any]:
    """The ModelDeployment once its Ready condition is True and its endpoint answers; exits when it
    stalls or `up` is gone. (A `kubetune up` killed outright leaves Ready and an endpoint that no
    longer answers in the store until the next `up` corrects it.)"""
    deadline = time.monotonic() + timeout_s
    said = ""
    while True:
        result = kubetune("get", "mdep", name, "-n", namespace, "-o", "json")
        obj: dict[str, Any] = json.loads(result.stdout) if result.returncode == 0 else {}
        ready, stalled = condition(obj, "Ready"), condition(obj, "Stalled")
        endpoint = (obj.get("status") or {}).get("endpoint")
        if ready.get("status") == "True" and endpoint:
            problem = endpoint_problem(endpoint)
            if problem is None:
                return obj
            news = detail = f"Ready, but its endpoint {endpoint} does not answer ({problem})"
        elif stalled.get("status") == "True":
            sys.exit(f"modeldeployment/{name} cannot become ready: {stalled.get('message')}")
        else:
            news = str(ready.get("reason") or (result.stderr.strip() or "not applied yet"))
            detail = str(ready.get("message") or news)
        if news != said:
            print(f"waiting for modeldeployment/{name} to be Ready: {news}", flush=True)
            said = news
        if up_pid is not None and not process_running(up_pid):
            sys.exit(f"kubetune up (pid {up_pid}) stopped before modeldeployment/{name} was Ready")
        if time.monotonic() > deadline:
            sys.exit(f"modeldeployment/{name} was not Ready within {timeout_s:.0f}s: {detail}")
        time.sleep(3)


def messages(ticket: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": ticket}]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="support-router", help="the ModelDeployment")
    parser.add_argument("-n", "--namespace", default="default")
    parser.add_argument("--users", type=int, default=50, help="distinct users for the split")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for Ready")
    parser.add_argument("--up-pid", type=int, help="stop waiting if this `kubetune up` process ends")
    args = parser.parse_args()

    deployment = wait_until_ready(args.name, args.namespace, args.timeout, args.up_pid)
    status, spec = deployment["status"], deployment["spec"]
    endpoint = status["endpoint"]
    versions = [version["name"] for version in spec["versions"]]
    override = (spec.get("routing") or {}).get("overrideHeader", "x-kubetune-version")
    print(kubetune("get", "mdep", args.name, "-n", args.namespace, "-o", "wide").stdout)

    client = OpenAI(base_url=endpoint, api_key="not-needed-locally", timeout=120, max_retries=2)
    answered_by: list[str] = []

    print(f"Chat completions at {endpoint} (model {args.name!r}):")
    for user, ticket in TICKETS:
        raw = client.chat.completions.with_raw_response.create(
            model=args.name, user=user, messages=messages(ticket)
        )
        version = raw.headers.get("x-kubetune-version", "?")
        answer = raw.parse().choices[0].message.content or ""
        answered_by.append(version)
        print(f"  {user:<6} -> {version:<6} {answer.strip()!r:<12} {ticket}")

    user, ticket = STREAMED
    print(f"\nStreamed, for {user}: {ticket}\n  ", end="", flush=True)
    stream = client.chat.completions.create(
        model=args.name, user=user, messages=messages(ticket), stream=True
    )
    version = stream.response.headers.get("x-kubetune-version", "?")
    answered_by.append(version)
    pieces = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces += 1
            print(chunk.choices[0].delta.content, end="", flush=True)
    print(f"\n  ({pieces} chunks, from version {version})")

    pinned_to = spec["versions"][-1]["name"]
    raw = client.chat.completions.with_raw_response.create(
        model=args.name,
        user="alice",
        messages=messages(TICKETS[0][1]),
        extra_headers={override: pinned_to},
    )
    pinned = raw.headers.get("x-kubetune-version", "?")
    answered_by.append(pinned)
    print(f"\nPinned with `{override}: {pinned_to}`: answered by {pinned}")

    counts: Counter[str] = Counter()
    for index in range(args.users):
        raw = client.chat.completions.with_raw_response.create(
            model=args.name, user=f"user-{index:03d}", messages=messages(TICKETS[index % 5][1]), max_tokens=1
        )
        counts[raw.headers.get("x-kubetune-version", "?")] += 1
    answered_by += list(counts.elements())
    split = ", ".join(f"{name} {counts[name]} ({100 * counts[name] / args.users:.0f}%)" for name in versions)
    print(f"\n{args.users} users: {split}; the weights are {status.get('weights')}")

    unknown = sorted({version for version in answered_by if version not in versions})
    if unknown or pinned != pinned_to:
        print(f"error: answers came from {unknown or [pinned]}, not from {versions}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
