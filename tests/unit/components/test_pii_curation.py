"""dataset.curation.pii: training data is redacted, dropped or refused before anything trains on it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubetune.api.validation import validate_documents
from kubetune_components import data
from kubetune_components.common.errors import DatasetError
from kubetune_components.finetune import steps

INSTRUCTION = "Route the ticket to a team."
ROWS: list[dict[str, Any]] = [
    {"instruction": INSTRUCTION, "input": "Charge twice on card 4111 1111 1111 1111", "output": "billing"},
    {"instruction": INSTRUCTION, "input": "Cannot log in", "output": "account"},
    {
        "instruction": INSTRUCTION,
        "input": "Reach me at sam@example.com or +44 20 7946 0958",
        "output": "account",
    },
    {"instruction": INSTRUCTION, "input": "Parcel lost in transit", "output": "shipping"},
    {"instruction": INSTRUCTION, "input": "App crashes on start", "output": "technical"},
    {"instruction": INSTRUCTION, "input": "Refund to DE89 3704 0044 0532 0130 00", "output": "billing"},
]
CHAT = {
    "messages": [
        {"role": "system", "content": "You route tickets."},
        {"role": "user", "content": "My IP is 203.0.113.7 and it is blocked"},
        {"role": "assistant", "content": "technical"},
    ]
}


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def numbered(rows: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    return list(enumerate(rows, start=1))


def test_redact_replaces_the_entities_in_every_field_and_counts_them() -> None:
    screened = data.screen_pii(numbered(ROWS), "redact", "tickets.jsonl")
    assert [row["input"] for row in screened.examples] == [
        "Charge twice on card <CREDIT_CARD>",
        "Cannot log in",
        "Reach me at <EMAIL_ADDRESS> or <PHONE_NUMBER>",
        "Parcel lost in transit",
        "App crashes on start",
        "Refund to <IBAN_CODE>",
    ]
    assert screened.report == {
        "mode": "redact",
        "examplesWithPii": 3,
        "dropped": 0,
        "entities": {"CREDIT_CARD": 1, "EMAIL_ADDRESS": 1, "IBAN_CODE": 1, "PHONE_NUMBER": 1},
    }
    assert ROWS[0]["input"].endswith("1111")  # the caller's examples are not changed


def test_redact_reaches_into_chat_messages() -> None:
    screened = data.screen_pii([(7, CHAT)], "redact", "chat.jsonl")
    assert screened.examples[0]["messages"][1]["content"] == "My IP is <IP_ADDRESS> and it is blocked"
    assert screened.examples[0]["messages"][2] == CHAT["messages"][2]


def test_drop_leaves_out_every_example_holding_pii() -> None:
    screened = data.screen_pii(numbered(ROWS), "drop", "tickets.jsonl")
    assert [row["output"] for row in screened.examples] == ["account", "shipping", "technical"]
    assert (screened.report["examplesWithPii"], screened.report["dropped"]) == (3, 3)


def test_fail_names_the_first_line_field_and_entity_but_not_the_data() -> None:
    with pytest.raises(DatasetError) as refused:
        data.screen_pii([(3, ROWS[1]), (4, CHAT)], "fail", "chat.jsonl")
    message = str(refused.value)
    assert message.startswith("chat.jsonl line 4: messages[1].content holds IP_ADDRESS at characters 9-20")
    assert "dataset.curation.pii is fail" in message and "203.0.113.7" not in message


def test_off_is_the_default_and_touches_nothing() -> None:
    screened = data.screen_pii(numbered(ROWS), "off", "tickets.jsonl")
    assert screened.examples == ROWS and screened.report == {"mode": "off"}


def finetune_job(dataset: Path, pii: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "router", "namespace": "default", "generation": 1},
        "spec": {
            "baseModel": {"uri": "unused"},
            "dataset": {"uri": str(dataset), "format": "instruction", "curation": {"pii": pii}},
        },
    }


def test_the_api_offers_the_four_modes_and_names_the_field_otherwise(tmp_path: Path) -> None:
    for mode in ("redact", "drop", "fail", "off"):
        assert list(validate_documents([finetune_job(tmp_path / "d.jsonl", mode)])) == []
    (issue,) = validate_documents([finetune_job(tmp_path / "d.jsonl", "mask")])
    assert str(issue).startswith("FineTuneJob/router: spec.dataset.curation.pii: ")
    assert "redact" in str(issue) and "drop" in str(issue)


def test_the_curate_step_writes_redacted_splits_and_the_counts(tiny_model_dir: Path, tmp_path: Path) -> None:
    job = finetune_job(write_rows(tmp_path / "tickets.jsonl", ROWS), "redact")
    job["spec"]["baseModel"]["uri"] = str(tiny_model_dir)
    report = steps.curate(job, str(tmp_path / "run"))
    assert report["pii"]["entities"] == {
        "CREDIT_CARD": 1,
        "EMAIL_ADDRESS": 1,
        "IBAN_CODE": 1,
        "PHONE_NUMBER": 1,
    }
    curated = "".join(
        (tmp_path / "run" / "data" / name).read_text() for name in ("train.jsonl", "validation.jsonl")
    )
    assert "<CREDIT_CARD>" in curated and "4111" not in curated and "sam@example.com" not in curated
    assert json.loads((tmp_path / "run" / "data" / "curation.json").read_text()) == report
