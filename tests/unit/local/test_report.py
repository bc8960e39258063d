"""The lines `kubetune up` prints about jobs and ModelDeployments (the quickstart's output)."""

from __future__ import annotations

from typing import Any

from kubetune.local.report import (
    deployment_signature,
    describe_deployment,
    describe_line,
    evaluation_summary,
    progress_signature,
    ready_banner,
    report_summary,
)


def job(status: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "FineTuneJob", "metadata": {"name": "support-tuned"}, "status": status}


RUNNING: dict[str, Any] = {
    "phase": "Running",
    "progress": {"totalSteps": 60, "percent": 45},
    "metrics": {"trainLoss": 1.234567},
    "conditions": [
        {"type": "Succeeded", "status": "Unknown", "reason": "Running", "message": "training: 27/60"}
    ],
}


def test_a_running_job_reads_as_one_line_and_reprints_only_per_tenth_of_progress() -> None:
    assert (
        describe_line(job(RUNNING))
        == "finetunejob/support-tuned  Running     45%  training: 27/60  loss 1.2346"
    )
    a_bit_later = {**RUNNING, "progress": {"totalSteps": 60, "percent": 48}}
    next_tenth = {**RUNNING, "progress": {"totalSteps": 60, "percent": 50}}
    assert progress_signature(job(a_bit_later)) == progress_signature(job(RUNNING))
    assert progress_signature(job(next_tenth)) != progress_signature(job(RUNNING))


def test_a_finished_job_prints_its_evaluation_and_gates() -> None:
    evaluation = {
        "baseline": {"evalLoss": 2.5, "exactMatch": 0.1},
        "final": {"evalLoss": 0.75, "exactMatch": 0.9},
        "gates": [{"metric": "exactMatch", "op": ">=", "threshold": 0.5, "value": 0.9, "passed": True}],
    }
    assert evaluation_summary(job({"evaluation": evaluation})) == [
        "  metric         baseline      final",
        "  evalLoss         2.5000     0.7500",
        "  exactMatch       0.1000     0.9000",
        "  gate exactMatch >= 0.5: 0.9 passed",
    ]
    assert evaluation_summary(job({})) == []


def test_the_evaluation_shows_lenient_match_and_what_trivial_predictors_score_beside_the_models() -> None:
    evaluation = {
        "baseline": {"exactMatch": 0.0, "lenientMatch": 0.25},
        "final": {"exactMatch": 0.6, "lenientMatch": 0.65},
        "referenceBaselines": {"majorityClass": 0.2, "nearestNeighbour": 0.4667},
    }
    assert evaluation_summary(job({"evaluation": evaluation})) == [
        "  metric         baseline      final",
        "  exactMatch       0.0000     0.6000",
        "  lenientMatch     0.2500     0.6500",
        "  exactMatch of trivial predictors on the same examples: majority class 0.2000, "
        "nearest neighbour 0.4667",
    ]
    only_majority = {**evaluation, "referenceBaselines": {"majorityClass": 0.2}}
    assert evaluation_summary(job({"evaluation": only_majority}))[-1].endswith("majority class 0.2000")


def test_a_quantize_report_compares_before_and_after() -> None:
    report = {
        "sizeBytes": {"before": 4_000_000, "after": 1_000_000},
        "latency": {"before": 0.002, "after": 0.001},
        "quality": {"before": {"perplexity": 3.0}, "after": {"perplexity": 3.1}},
        "sizeRatio": 0.25,
        "gates": [{"metric": "perplexity", "op": "<=", "threshold": 3.05, "value": 3.1, "passed": False}],
    }
    assert report_summary({"status": {"report": report}}) == [
        "                   before      after",
        "  size MB           4.000      1.000",
        "  ms/token          2.000      1.000",
        "  perplexity       3.0000     3.1000",
        "  size ratio 0.250",
        "  gate perplexity <= 3.05: 3.1 FAILED",
    ]


READY: dict[str, Any] = {
    "metadata": {"name": "support-router"},
    "status": {
        "phase": "Running",
        "endpoint": "http://127.0.0.1:40000/v1",
        "readyVersions": "2/2",
        "weights": "tuned=80,int8=20",
        "versions": [
            {"name": "tuned", "weight": 80, "url": "http://127.0.0.1:40001", "modelUri": "/m/tuned"},
            {"name": "int8", "weight": 20, "url": "http://127.0.0.1:40002", "modelUri": "/m/int8"},
        ],
        "conditions": [{"type": "Ready", "status": "True", "reason": "AllVersionsReady", "message": "ready"}],
    },
}


def test_a_ready_deployment_prints_its_versions_and_how_to_call_it() -> None:
    assert (
        describe_deployment(READY)
        == "modeldeployment/support-router  Running    2/2 ready  tuned=80,int8=20  ready"
    )
    banner = ready_banner(READY)
    assert banner[:3] == [
        "modeldeployment/support-router is ready: OpenAI-compatible endpoint http://127.0.0.1:40000/v1",
        "  tuned         80%  http://127.0.0.1:40001  /m/tuned",
        "  int8          20%  http://127.0.0.1:40002  /m/int8",
    ]
    assert (
        "    curl -si http://127.0.0.1:40000/v1/chat/completions -H 'content-type: application/json' \\"
        in banner
    )
    assert (
        banner[-1] == "  `kubetune get mdep support-router -o wide` shows its status; Ctrl+C stops serving."
    )


def test_a_deployment_reprints_when_its_weights_change_not_when_a_message_ticks() -> None:
    ticking = {
        **READY,
        "status": {
            **READY["status"],
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "AllVersionsReady", "message": "ready (12s)"}
            ],
        },
    }
    reweighted = {**READY, "status": {**READY["status"], "weights": "tuned=50,int8=50"}}
    assert deployment_signature(ticking) == deployment_signature(READY)
    assert deployment_signature(reweighted) != deployment_signature(READY)
