"""The feedback loop end to end, locally: serve, collect feedback, export, KTO fine-tune, canary.

    kubetune dev tiny-base --out .kubetune/models/tiny-base     # once
    python examples/feedback-loop/loop.py

It starts `kubetune up` itself (with KUBETUNE_PROMETHEUS_URL pointing at a Prometheus it starts on
loopback once the gateway is up, scraping it every second) and runs five stages, printing each:

1. serve: 01-router.yaml fine-tunes v1 of a ticket router, served by 03-canary.yaml's deployment as it
   is before v2 exists (v1 alone at 100%, no rollout), with `spec.feedback.capture`;
2. feedback: users send held-out tickets through the gateway with the official openai client; a
   reviewer (this script, who knows each ticket's team) rates each answer with POST /v1/feedback:
   1 when it names the right team, else 0;
3. export: `kubetune feedback export mdep/feedback-router --format kto` writes the rated answers as a
   KTO dataset (prompt, completion, label);
4. fine-tune: 02-kto.yaml tunes v1 on that dataset with `method.type: kto` (its baseModel is v1's
   published model, filled in here from `kubetune get ftj feedback-router-v1`);
5. canary: 03-canary.yaml appends v2 with a rollout judged by the same users' feedback and the error
   rate (its `feedback` minimum is v1's mean from stage 2: the canary must be at least as good);
   traffic and feedback go on until the rollout is Promoted or RolledBack.

The figures (feedback counts, exported rows, the KTO job's metrics before/after, per-version mean
feedback during the canary, the outcome) are printed at the end and, with --summary, written as JSON.
Exit code 0 when every stage ran and the rollout reached a decision (promoted or rolled back), 1
otherwise; `kubetune up` and Prometheus are stopped either way (--keep-serving leaves `up` running).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
import yaml
from openai import OpenAI

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "quickstart" / "data"
FEEDBACK_TICKETS = DATA / "support-tickets.jsonl"
"""Stage 2's traffic: the last tickets of the quickstart's training file."""
CANARY_TICKETS = DATA / "support-tickets-heldout.jsonl"
"""Stage 5's traffic: held-out tickets, in neither v1's training data nor the feedback v2 learns from."""
DEPLOYMENT = "feedback-router"
V1_JOB = "feedback-router-v1"
KTO_JOB = "feedback-router-kto"
TEAMS = ("billing", "technical", "account", "shipping", "returns")
DECIDED = ("Promoted", "RolledBack")
T = TypeVar("T")


class LoopFailed(Exception):
    """A stage could not finish; the message says which and why."""


def stage(number: int, title: str) -> None:
    print(f"\n== {number}. {title}", flush=True)


def kubetune(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "kubetune", *args], capture_output=True, text=True, check=False
    )
    if check and result.returncode != 0:
        raise LoopFailed(f"kubetune {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
    return result


def get(kind: str, name: str) -> dict[str, Any]:
    result = kubetune("get", kind, name, "-o", "json", check=False)
    if result.returncode != 0:
        return {}
    value: dict[str, Any] = json.loads(result.stdout)
    return value


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == type_), {})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Up:
    """`kubetune up` in the background, its output in a log file."""

    def __init__(self, home: Path, prometheus_url: str, *manifests: Path) -> None:
        self.log = home / "feedback-loop" / "up.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "KUBETUNE_PROMETHEUS_URL": prometheus_url}
        with self.log.open("wb") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "kubetune", "up", *(arg for m in manifests for arg in ("-f", str(m)))],
                stdout=output,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def check_running(self) -> None:
        if self.process.poll() is not None:
            raise LoopFailed(f"kubetune up exited with {self.process.returncode}:\n{self.tail()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def wait_for(
    what: str, check: Callable[[], T | None], up: Up, timeout_s: float, news: Callable[[], str]
) -> T:
    """Poll ``check`` until it returns a value, printing ``news()`` whenever it changes."""
    deadline = time.monotonic() + timeout_s
    said = ""
    while True:
        value = check()
        if value is not None:
            return value
        up.check_running()
        # Without the seconds the stage has taken ("(12s; log: ...)"), so each news is said once.
        now = re.sub(r"\(\d+s; ", "(", news())
        if now and now != said:
            print(f"   waiting for {what}: {now}", flush=True)
            said = now
        if time.monotonic() > deadline:
            raise LoopFailed(f"{what} did not happen within {timeout_s:.0f}s (last: {said})\n{up.tail()}")
        time.sleep(1)


@contextmanager
def prometheus(port: int, gateway: str, workdir: Path) -> Iterator[str]:
    """A Prometheus on 127.0.0.1:port scraping the gateway's /metrics every second."""
    binary = shutil.which(os.environ.get("KUBETUNE_PROMETHEUS", "prometheus"))
    if binary is None:
        raise LoopFailed(
            "no prometheus binary on PATH (Debian: apt-get install prometheus); the canary needs it"
        )
    config = workdir / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [
                    {"job_name": "kubetune-gateway", "static_configs": [{"targets": [gateway]}]}
                ],
            }
        )
    )
    log = (workdir / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/-/ready", timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise LoopFailed(f"Prometheus did not start; see {workdir / 'prometheus.log'}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def tickets(path: Path) -> list[tuple[str, str, str]]:
    """(instruction, ticket, team) of a file of the quickstart's tickets."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(row["instruction"], row["input"], row["output"]) for row in rows]


def named_team(answer: str) -> str | None:
    words = re.findall(r"[a-z]+", answer.lower())
    return words[0] if words and words[0] in TEAMS else None


class Users:
    """Users asking the deployment and a reviewer rating their answers (1: the right team, else 0)."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.client = OpenAI(base_url=endpoint, api_key="not-needed-locally", timeout=120, max_retries=2)
        self.http = httpx.Client(timeout=30, trust_env=False)
        self.sent = 0

    def ask_and_rate(self, asked: list[tuple[str, str, str]]) -> dict[str, list[float]]:
        """Each ticket asked by a new user and its answer rated; version -> the scores given."""
        scores: dict[str, list[float]] = {}
        for instruction, ticket, team in asked:
            self.sent += 1
            raw = self.client.chat.completions.with_raw_response.create(
                model=DEPLOYMENT,
                user=f"user-{self.sent:05d}",
                messages=[{"role": "system", "content": instruction}, {"role": "user", "content": ticket}],
            )
            completion = raw.parse()
            answer = completion.choices[0].message.content or ""
            score = 1.0 if named_team(answer) == team else 0.0
            response = self.http.post(
                f"{self.endpoint}/feedback", json={"requestId": completion.id, "score": score}
            )
            if response.status_code != 200:
                raise LoopFailed(
                    f"POST {self.endpoint}/feedback answered {response.status_code}: {response.text}"
                )
            scores.setdefault(raw.headers.get("x-kubetune-version", "?"), []).append(score)
        return scores

    def experiments(self) -> dict[str, Any]:
        value: dict[str, Any] = self.http.get(f"{self.endpoint}/experiments").json()
        return value


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def rendered(source: Path, out: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    """``source`` with ``change`` applied to its (single) resource, written to ``out``."""
    resource = yaml.safe_load(source.read_text())
    change(resource)
    # As JSON (which is YAML): decimal strings such as "1e-3" keep their quotes.
    out.write_text(json.dumps(resource, indent=2))
    return out


def job_finished(name: str) -> Callable[[], dict[str, Any] | None]:
    def check() -> dict[str, Any] | None:
        job = get("ftj", name)
        if condition(job, "Succeeded").get("status") == "True":
            return job
        if condition(job, "Failed").get("status") == "True":
            raise LoopFailed(f"finetunejob/{name} failed: {condition(job, 'Failed').get('message')}")
        return None

    return check


def job_news(name: str) -> Callable[[], str]:
    def news() -> str:
        status = get("ftj", name).get("status") or {}
        return str((status.get("progress") or {}).get("stage") or status.get("phase") or "")

    return news


def deployment_news() -> str:
    obj = get("mdep", DEPLOYMENT)
    ready = condition(obj, "Ready")
    return str(ready.get("message") or ready.get("reason") or "")


def evaluation_figures(job: dict[str, Any]) -> dict[str, Any]:
    """The job's metrics before (baseline) and after tuning, as its status reports them."""
    evaluation = (job.get("status") or {}).get("evaluation") or {}
    return {key: evaluation[key] for key in ("baseline", "final") if key in evaluation}


def without_the_canary(deployment: dict[str, Any]) -> None:
    """03-canary.yaml's deployment as it is before v2 exists: v1 alone, at 100%, and no rollout."""
    spec = deployment["spec"]
    spec["versions"] = [{**spec["versions"][0], "weight": 100}]
    del spec["rollout"]


def run(args: argparse.Namespace, home: Path, workdir: Path) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    prometheus_port = free_port()
    stage(1, f"serve v1 ({HERE.name}/01-router.yaml: fine-tune {V1_JOB}; serve it with feedback capture)")
    before_v2 = rendered(HERE / "03-canary.yaml", workdir / "01-deployment.yaml", without_the_canary)
    up = Up(home, f"http://127.0.0.1:{prometheus_port}", HERE / "01-router.yaml", before_v2)
    try:

        def ready() -> dict[str, Any] | None:
            obj = get("mdep", DEPLOYMENT)
            ok = condition(obj, "Ready").get("status") == "True" and (obj.get("status") or {}).get("endpoint")
            return obj if ok else None

        deployment = wait_for(f"modeldeployment/{DEPLOYMENT} Ready", ready, up, args.timeout, deployment_news)
        endpoint = deployment["status"]["endpoint"]
        v1 = get("ftj", V1_JOB)
        summary["v1"] = evaluation_figures(v1)
        print(f"   v1 served at {endpoint}; its held-out evaluation: {json.dumps(summary['v1'])}")

        with prometheus(prometheus_port, urlsplit(endpoint).netloc, workdir):
            users = Users(endpoint)
            asked = tickets(FEEDBACK_TICKETS)[-args.feedback_tickets :]
            stage(2, f"feedback: {len(asked)} tickets through the gateway, each answer rated")
            scores = users.ask_and_rate(asked)
            given = [score for version_scores in scores.values() for score in version_scores]
            good = sum(1 for score in given if score >= 0.5)
            v1_mean = mean(given)
            summary["feedback"] = {
                "rated": len(given),
                "good": good,
                "bad": len(given) - good,
                "mean": v1_mean,
            }
            print(
                f"   {len(given)} answers rated: {good} good, {len(given) - good} bad (v1 mean {v1_mean:.3f})"
            )

            stage(3, "export: kubetune feedback export --format kto")
            dataset = home / "feedback-loop" / "feedback.jsonl"
            exported = kubetune(
                "feedback", "export", f"mdep/{DEPLOYMENT}", "--format", "kto", "-o", str(dataset)
            )
            print(f"   {exported.stdout.strip()}")
            rows = [json.loads(line) for line in dataset.read_text().splitlines() if line.strip()]
            desirable = sum(1 for row in rows if row["label"])
            summary["export"] = {
                "rows": len(rows),
                "desirable": desirable,
                "undesirable": len(rows) - desirable,
            }
            print(f"   {len(rows)} rows: {desirable} desirable, {len(rows) - desirable} undesirable")
            if not desirable or desirable == len(rows):
                raise LoopFailed(
                    "KTO needs both desirable and undesirable answers; the feedback has one kind"
                )

            stage(4, f"fine-tune: {HERE.name}/02-kto.yaml (method.type kto on v1's published model)")
            v1_model = (v1.get("status") or {}).get("output", {}).get("uri")
            if not v1_model:
                raise LoopFailed(f"finetunejob/{V1_JOB} has no status.output.uri")

            # TRL's advice for unbalanced labels: desirable weight x desirable rows / undesirable rows
            # between 1 and 4/3.
            desirable_weight = f"{min(100.0, (len(rows) - desirable) / desirable):.2f}"
            summary["export"]["desirableWeight"] = desirable_weight

            def kto_on_v1(job: dict[str, Any]) -> None:
                job["spec"]["baseModel"]["uri"] = v1_model
                job["spec"]["dataset"]["uri"] = str(dataset)
                job["spec"]["method"]["kto"]["desirableWeight"] = desirable_weight

            kto = rendered(HERE / "02-kto.yaml", workdir / "02-kto.yaml", kto_on_v1)
            print(f"   {kubetune('up', '-f', str(kto)).stdout.strip()}")
            job = wait_for(
                f"finetunejob/{KTO_JOB}", job_finished(KTO_JOB), up, args.timeout, job_news(KTO_JOB)
            )
            summary["kto"] = evaluation_figures(job)
            print(f"   {KTO_JOB} succeeded; before/after: {json.dumps(summary['kto'])}")

            stage(5, f"canary: {HERE.name}/03-canary.yaml appends v2 (the KTO model) with a rollout")
            threshold = f"{v1_mean:.3f}"

            def judged_against_v1(obj: dict[str, Any]) -> None:
                for metric in obj["spec"]["rollout"]["analysis"]["metrics"]:
                    if metric["name"] == "feedback":
                        metric["min"] = threshold

            canary = rendered(HERE / "03-canary.yaml", workdir / "03-canary.yaml", judged_against_v1)
            print(f"   feedback minimum for v2: {threshold} (v1's mean)")
            print(f"   {kubetune('up', '-f', str(canary)).stdout.strip()}")
            deadline = time.monotonic() + args.timeout
            said = ""
            canary_traffic = itertools.cycle(tickets(CANARY_TICKETS))
            while True:
                up.check_running()
                status = get("mdep", DEPLOYMENT).get("status") or {}
                rollout = status.get("rollout") or {}
                news = f"{rollout.get('state')}, step {rollout.get('step')}, weights {status.get('weights')}"
                if news != said:
                    print(f"   rollout: {news}", flush=True)
                    said = news
                if rollout.get("state") in DECIDED or rollout.get("state") == "Paused":
                    break
                if time.monotonic() > deadline:
                    raise LoopFailed(f"the rollout did not decide within {args.timeout:.0f}s: {rollout}")
                users.ask_and_rate([next(canary_traffic) for _ in range(10)])
            final = get("mdep", DEPLOYMENT)["status"]
            versions = {v["name"]: v for v in users.experiments()["versions"]}
            summary["canary"] = {
                "outcome": rollout.get("state"),
                "weights": final.get("weights"),
                "lastAnalysis": rollout.get("lastAnalysis"),
                "meanFeedback": {name: v["meanFeedback"] for name, v in versions.items()},
                "feedbackCount": {name: v["feedbackCount"] for name, v in versions.items()},
            }
            print(f"   outcome {rollout.get('state')}; weights now {final.get('weights')}")
            if rollout.get("state") not in DECIDED:
                raise LoopFailed(f"the rollout paused: {json.dumps(rollout)}")
    finally:
        if not args.keep_serving:
            up.stop()
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    print("\n== the loop in figures")
    feedback, export = summary["feedback"], summary["export"]
    print(
        f"   feedback on v1:   {feedback['rated']} rated, {feedback['good']} good, "
        f"mean {feedback['mean']:.3f}"
    )
    print(f"   exported (kto):   {export['rows']} rows, {export['desirable']} desirable")
    before, after = (summary["kto"].get(key) or {} for key in ("baseline", "final"))
    if "exactMatch" in before and "exactMatch" in after:
        print(
            f"   held-out routing: exactMatch {before['exactMatch']:.3f} (v1) -> "
            f"{after['exactMatch']:.3f} (v2), the KTO job's evaluation"
        )
    print(f"   KTO job metrics:  {json.dumps(summary['kto'])}")
    canary = summary["canary"]
    for name, value in canary["meanFeedback"].items():
        shown = "-" if value is None else f"{value:.3f}"
        print(f"   mean feedback {name}: {shown} over {canary['feedbackCount'][name]} ratings (whole run)")
    print(f"   canary:           {canary['outcome']} (weights {canary['weights']})")
    if canary.get("lastAnalysis"):
        print(f"   last analysis:    {json.dumps(canary['lastAnalysis'])}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--feedback-tickets", type=int, default=120, help="tickets asked and rated in stage 2"
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds each stage may take")
    parser.add_argument("--summary", type=Path, help="write the figures as JSON to this file")
    parser.add_argument("--keep-serving", action="store_true", help="leave `kubetune up` running at the end")
    args = parser.parse_args()
    home = Path(os.environ.get("KUBETUNE_HOME") or ".kubetune").resolve()
    if not (Path(".kubetune") / "models" / "tiny-base").exists():
        print(
            "error: no .kubetune/models/tiny-base here; run `kubetune dev tiny-base --out "
            ".kubetune/models/tiny-base` first (from the repository root)",
            file=sys.stderr,
        )
        return 1
    with tempfile.TemporaryDirectory(prefix="kubetune-feedback-loop-") as scratch:
        try:
            summary = run(args, home, Path(scratch))
        except LoopFailed as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    print_summary(summary)
    if args.summary:
        args.summary.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
