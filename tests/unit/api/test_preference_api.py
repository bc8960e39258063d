"""FineTuneJob method.type dpo and kto: what `kubetune validate` and the CRD's CEL rules refuse, each
naming the field (dpo trains on preference rows, kto on feedback rows, and those rows train nothing
else), and what they accept."""

from __future__ import annotations

from typing import Any

import pytest
from test_cel import admit, finetune_job, validate

from kubetune_contract.finetune import FineTuneJobSpec


def job(method: dict[str, Any], fmt: str, **spec: Any) -> dict[str, Any]:
    return finetune_job(
        {
            "baseModel": {"uri": "./models/tiny-base"},
            "dataset": {"uri": "data/rows.jsonl", "format": fmt, "validationSplit": "0.2"},
            "method": method,
            "evaluation": {"metrics": ["evalLoss", "preferenceAccuracy"]},
            **spec,
        }
    )


ACCEPTED = {
    "dpo, defaults (lora adapter, beta 0.1)": job({"type": "dpo"}, "preference"),
    "dpo on full weights": job({"type": "dpo", "dpo": {"weights": "full", "beta": "0.5"}}, "preference"),
    "kto with lora options and weights": job(
        {
            "type": "kto",
            "kto": {"lora": {"r": 4}, "desirableWeight": "1.33", "undesirableWeight": "1"},
        },
        "feedback",
        output={"mergeAdapter": True},
    ),
    "kto gated on preferenceAccuracy": job(
        {"type": "kto"}, "feedback", evaluation={"gates": [{"metric": "preferenceAccuracy", "min": "0.6"}]}
    ),
}


@pytest.mark.parametrize("doc", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_accepted_by_validate_and_by_the_api_server(doc: dict[str, Any]) -> None:
    assert validate(doc) == []
    assert admit(doc) == []


REFUSED = [
    (job({"type": "dpo"}, "feedback"), "spec.dataset.format: method.type dpo trains on format preference"),
    (job({"type": "kto"}, "preference"), "spec.dataset.format: method.type kto trains on format feedback"),
    (
        job({"type": "lora"}, "preference"),
        "spec.method.type: dataset.format preference trains with method dpo",
    ),
    (job({"type": "full"}, "feedback"), "spec.method.type: dataset.format feedback trains with method kto"),
    (
        job({"type": "kto"}, "feedback", training={"packing": True}),
        "spec.training.packing: kto compares whole completions; it cannot pack them",
    ),
    (
        job({"type": "dpo"}, "preference", training={"replay": {"uri": "general.jsonl"}}),
        "spec.training.replay: dpo learns from preference rows; replayed examples have none",
    ),
    (
        job({"type": "lora"}, "instruction"),
        "spec.evaluation.metrics: preferenceAccuracy needs dataset.format preference or feedback",
    ),
    (
        job({"type": "dpo", "dpo": {"weights": "full", "lora": {}}}, "preference"),
        "spec.method.dpo: lora is set but weights is 'full'; it needs weights lora",
    ),
    (
        job({"type": "dpo", "dpo": {"beta": "0"}}, "preference"),
        "spec.method.dpo.beta: must be greater than 0",
    ),
    (
        job({"type": "kto", "kto": {"desirableWeight": "0"}}, "feedback"),
        "spec.method.kto.desirableWeight: must be greater than 0",
    ),
    (
        job({"type": "lora", "kto": {}}, "instruction"),
        "spec.method: kto is set but type is 'lora'; only lora may be set",
    ),
]


@pytest.mark.parametrize(("doc", "message"), REFUSED, ids=[message for _, message in REFUSED])
def test_refused_naming_the_field_by_validate_and_by_the_api_server(
    doc: dict[str, Any], message: str
) -> None:
    issues = validate(doc)
    assert any(issue.startswith(f"FineTuneJob/demo: {message}") for issue in issues), issues
    assert any(refusal.startswith(message) for refusal in admit(doc)), admit(doc)


def test_the_options_block_is_filled_with_trls_defaults_when_left_out() -> None:
    spec = FineTuneJobSpec.model_validate(job({"type": "kto"}, "feedback")["spec"])
    assert spec.method.kto is not None and spec.method.preference is spec.method.kto
    assert (spec.method.kto.weights, spec.method.kto.beta) == ("lora", "0.1")
    assert (spec.method.kto.desirable_weight, spec.method.kto.undesirable_weight) == ("1.0", "1.0")
    assert spec.method.trains_adapter
    full = FineTuneJobSpec.model_validate(
        job({"type": "dpo", "dpo": {"weights": "full"}}, "preference")["spec"]
    )
    assert not full.method.trains_adapter and not full.method.is_peft
