from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedTokenizerBase

from kubetune_components import data
from kubetune_components.common.errors import ConfigError, DatasetError

WriteJsonl = Callable[..., Path]

REPO_ROOT = Path(__file__).resolve().parents[3]
QUICKSTART_DATA = REPO_ROOT / "examples/quickstart/data"

INSTRUCTION = {"instruction": "Classify.", "input": "My card was charged twice.", "output": "billing"}
CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
}


# --- load_examples -------------------------------------------------------------------------------


def test_load_each_format(write_jsonl: WriteJsonl) -> None:
    text = write_jsonl([{"text": "one"}, "", "   ", {"text": "two", "extra": 1}])
    assert data.load_examples(str(text), "text") == [{"text": "one"}, {"text": "two"}]

    instruction = write_jsonl([INSTRUCTION, {"instruction": "Say hi.", "output": "hi", "input": None}])
    assert data.load_examples(f"file://{instruction}", "instruction") == [
        INSTRUCTION,
        {"instruction": "Say hi.", "output": "hi"},
    ]

    chat = write_jsonl([CHAT])
    assert data.load_examples(str(chat), "chat") == [CHAT]


def test_utf8_bom_and_crlf_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "caf\xc3\xa9"}\r\n{"text": "b"}\r\n')
    assert data.load_examples(str(path), "text") == [{"text": "café"}, {"text": "b"}]


@pytest.mark.parametrize(
    ("fmt", "rows", "message"),
    [
        ("instruction", [INSTRUCTION, {"instruction": "x"}], 'line 2: "output" is missing'),
        (
            "instruction",
            [{"instruction": 1, "output": "x"}],
            'line 1: "instruction" must be a string, got number',
        ),
        (
            "instruction",
            [{"instruction": "x", "input": ["a"], "output": "y"}],
            'line 1: "input" must be a string',
        ),
        (
            "instruction",
            [INSTRUCTION, INSTRUCTION, '{"instruction": "x" "output": "y"}'],
            "line 3: invalid JSON ",
        ),
        ("instruction", ["[1, 2]"], "line 1: expected a JSON object, got array"),
        ("text", [{"txt": "x"}], 'line 1: "text" is missing'),
        ("text", [{"text": None}], 'line 1: "text" must be a string, got null'),
        ("chat", [{"text": "x"}], 'line 1: "messages" is missing'),
        ("chat", [{"messages": {}}], 'line 1: "messages" must be an array, got object'),
        ("chat", [{"messages": []}], 'line 1: "messages" is empty'),
        ("chat", [{"messages": ["hi"]}], "line 1: messages[0] must be an object, got string"),
        (
            "chat",
            [CHAT, {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}],
            "line 2: messages[1].role must be one of system, user, assistant",
        ),
        ("chat", [{"messages": [{"role": "user"}]}], "line 1: messages[0].content is missing"),
        (
            "chat",
            [{"messages": [{"role": "user", "content": "a"}]}],
            "line 1: the last message must be from the assistant, got user",
        ),
    ],
)
def test_bad_lines_name_file_line_and_problem(
    write_jsonl: WriteJsonl, fmt: data.DatasetFormat, rows: list[Any], message: str
) -> None:
    path = write_jsonl(rows)
    with pytest.raises(DatasetError) as caught:
        data.load_examples(str(path), fmt)
    assert caught.value.message.startswith(f"{path} {message}")
    assert caught.value.reason == "InvalidDataset"


def test_invalid_json_message_is_exact(write_jsonl: WriteJsonl) -> None:
    path = write_jsonl(["", "", '{"text": "a" "b"}'], name="data.jsonl")
    with pytest.raises(DatasetError) as caught:
        data.load_examples(str(path), "text")
    assert str(caught.value) == f"{path} line 3: invalid JSON (Expecting ',' delimiter at column 14)"


def test_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DatasetError, match=r"line 2: not valid UTF-8 \(byte 14\)"):
        data.load_examples(str(path), "text")


def test_empty_missing_and_directory(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(DatasetError) as caught:
        data.load_examples(str(empty), "text")
    assert str(caught.value) == f"{empty}: the dataset is empty (no JSON lines)"
    with pytest.raises(DatasetError) as caught:
        data.load_examples(str(tmp_path / "missing.jsonl"), "text")
    assert str(caught.value) == f"{tmp_path / 'missing.jsonl'}: file not found"
    with pytest.raises(DatasetError, match="is a directory"):
        data.load_examples(str(tmp_path), "text")


def test_unknown_format_is_a_config_error(write_jsonl: WriteJsonl) -> None:
    with pytest.raises(ConfigError, match="'csv' is not one of text, instruction, chat"):
        data.load_examples(str(write_jsonl([{"text": "x"}])), "csv")  # type: ignore[arg-type]


# --- rendering and tokenizing --------------------------------------------------------------------


def test_render_prompt_and_response(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    assert data.render_prompt_and_response({"text": "abc"}, "text", tiny_tokenizer) == ("", "abc")
    assert data.render_prompt_and_response(INSTRUCTION, "instruction", tiny_tokenizer) == (
        "### Instruction:\nClassify.\n\n### Input:\nMy card was charged twice.\n\n### Response:\n",
        "billing",
    )
    no_input = {"instruction": "Say hi.", "output": "hi"}
    assert data.render_prompt_and_response(no_input, "instruction", tiny_tokenizer) == (
        "### Instruction:\nSay hi.\n\n### Response:\n",
        "hi",
    )
    assert data.render_prompt_and_response(CHAT, "chat", tiny_tokenizer) == (
        "<s><|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n",
        "Hello!",
    )


def test_chat_without_a_template_is_a_config_error(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    tiny_tokenizer.chat_template = None
    with pytest.raises(ConfigError, match="has no chat_template"):
        data.render_prompt_and_response(CHAT, "chat", tiny_tokenizer)


def test_tokenize_masks_the_prompt(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    features = data.tokenize_for_training(INSTRUCTION, "instruction", tiny_tokenizer, 512)
    assert features is not None
    prompt, response = data.render_prompt_and_response(INSTRUCTION, "instruction", tiny_tokenizer)
    prompt_ids = data.prompt_token_ids(prompt, "instruction", tiny_tokenizer)
    response_ids = tiny_tokenizer(response, add_special_tokens=False)["input_ids"]
    assert prompt_ids[0] == tiny_tokenizer.bos_token_id
    assert features["input_ids"] == [*prompt_ids, *response_ids, tiny_tokenizer.eos_token_id]
    assert features["labels"] == [-100] * len(prompt_ids) + [*response_ids, tiny_tokenizer.eos_token_id]
    assert features["attention_mask"] == [1] * len(features["input_ids"])
    assert tiny_tokenizer.decode(features["input_ids"], skip_special_tokens=True) == prompt + response


def test_tokenize_chat_has_a_single_bos(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    features = data.tokenize_for_training(CHAT, "chat", tiny_tokenizer, 512)
    assert features is not None
    assert features["input_ids"].count(tiny_tokenizer.bos_token_id) == 1
    assert features["input_ids"][-1] == tiny_tokenizer.eos_token_id
    assert features["labels"][0] == -100


def test_tokenize_text_has_no_mask(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    features = data.tokenize_for_training({"text": "The river."}, "text", tiny_tokenizer, 512)
    assert features is not None
    assert features["labels"] == features["input_ids"]
    assert features["input_ids"][0] == tiny_tokenizer.bos_token_id


def test_truncation_keeps_the_prompt_and_drops_examples_without_response(
    tiny_tokenizer: PreTrainedTokenizerBase,
) -> None:
    long_output = dict(INSTRUCTION, output="word " * 200)
    prompt, _ = data.render_prompt_and_response(long_output, "instruction", tiny_tokenizer)
    prompt_length = len(data.prompt_token_ids(prompt, "instruction", tiny_tokenizer))
    features = data.tokenize_for_training(long_output, "instruction", tiny_tokenizer, prompt_length + 3)
    assert features is not None
    assert len(features["input_ids"]) == prompt_length + 3
    assert sum(label != -100 for label in features["labels"]) == 3
    assert data.tokenize_for_training(long_output, "instruction", tiny_tokenizer, prompt_length) is None
    with pytest.raises(ConfigError):
        data.tokenize_for_training(long_output, "instruction", tiny_tokenizer, 0)


# --- curation ------------------------------------------------------------------------------------


CURATION_DEFAULTS: dict[str, Any] = {
    "dedupe": True,
    "min_tokens": 1,
    "max_tokens": 10_000,
    "validation_split": 0.0,
    "seed": 0,
}


def curate(
    examples: list[dict[str, Any]],
    fmt: data.DatasetFormat,
    tokenizer: PreTrainedTokenizerBase,
    **options: Any,
) -> data.CurationResult:
    return data.curate(examples, fmt, tokenizer, **(CURATION_DEFAULTS | options))


def numbered(count: int) -> list[dict[str, Any]]:
    return [
        {"instruction": "Echo.", "input": f"item {index}", "output": f"{index}"} for index in range(count)
    ]


def test_curate_dedupes_after_whitespace_normalisation(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    examples = [
        {"instruction": "Echo.", "input": "a  b", "output": "x"},
        {"instruction": "Echo. ", "input": "a b\n", "output": "x"},
        {"instruction": "Echo.", "input": "a b", "output": "y"},
    ]
    result = curate(examples, "instruction", tiny_tokenizer)
    assert result.train == [examples[0], examples[2]]
    assert result.report == {
        "total": 3,
        "duplicates": 1,
        "tooShort": 0,
        "tooLong": 0,
        "noResponseTokens": 0,
        "kept": 2,
        "train": 2,
        "validation": 0,
    }
    kept_all = curate(examples, "instruction", tiny_tokenizer, dedupe=False)
    assert kept_all.report["kept"] == 3


def test_curate_filters_by_full_token_length(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    short = {"text": "a"}
    medium = {"text": "The river carries sand to the sea."}
    long = {"text": "The river carries sand to the sea. " * 20}
    lengths = [
        len(data.tokenize_for_training(example, "text", tiny_tokenizer, 10_000)["input_ids"])  # type: ignore[index]
        for example in (short, medium, long)
    ]
    examples = [short, medium, long]
    result = curate(examples, "text", tiny_tokenizer, min_tokens=lengths[0] + 1, max_tokens=lengths[2] - 1)
    assert result.train == [medium]
    assert (result.report["tooShort"], result.report["tooLong"]) == (1, 1)
    exact = curate(examples, "text", tiny_tokenizer, min_tokens=lengths[0], max_tokens=lengths[2])
    assert exact.report["kept"] == 3


def test_curate_counts_examples_whose_prompt_fills_the_context(
    tiny_tokenizer: PreTrainedTokenizerBase,
) -> None:
    examples = [*numbered(3), dict(INSTRUCTION, input="long " * 300)]
    result = curate(examples, "instruction", tiny_tokenizer, max_seq_length=64)
    assert result.report["noResponseTokens"] == 1
    assert result.report["kept"] == 3


def test_curate_when_nothing_is_left(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(
        DatasetError, match="no examples left after curation: 2 read, 0 duplicates, 2 shorter"
    ):
        curate(numbered(2), "instruction", tiny_tokenizer, min_tokens=5000, validation_split=0.1)


def split(tokenizer: PreTrainedTokenizerBase, count: int, share: float, seed: int) -> data.CurationResult:
    return curate(numbered(count), "instruction", tokenizer, validation_split=share, seed=seed)


def test_split_is_deterministic_and_disjoint(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    first = split(tiny_tokenizer, 50, 0.2, seed=7)
    again = split(tiny_tokenizer, 50, 0.2, seed=7)
    other_seed = split(tiny_tokenizer, 50, 0.2, seed=8)
    assert (first.train, first.validation) == (again.train, again.validation)
    assert first.validation != other_seed.validation
    assert len(first.validation) == 10 and len(first.train) == 40
    inputs = [example["input"] for example in first.train + first.validation]
    assert sorted(inputs) == sorted(example["input"] for example in numbered(50))


@pytest.mark.parametrize(
    ("count", "share", "validation"),
    [(2, 0.01, 1), (3, 0.1, 1), (10, 0.0, 0), (1, 0.5, 0), (10, 0.99, 9), (100, 0.1, 10)],
)
def test_split_sizes(
    tiny_tokenizer: PreTrainedTokenizerBase, count: int, share: float, validation: int
) -> None:
    result = split(tiny_tokenizer, count, share, seed=0)
    assert len(result.validation) == validation
    assert len(result.train) == count - validation
    assert result.report["validation"] == validation


def test_validation_split_bounds(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(ConfigError, match=r"validationSplit must be in \[0, 1\)"):
        split(tiny_tokenizer, 10, 1.0, seed=0)


SPLIT_SCRIPT = """
import json, sys
from kubetune_components import data

class WordTokenizer:
    eos_token_id = 0
    chat_template = None
    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [1] * len(text.split()) + ([2] if add_special_tokens else [])}

examples = [{"text": f"example {i}"} for i in range(40)]
result = data.curate(examples, "text", WordTokenizer(), dedupe=True, min_tokens=1, max_tokens=100,
                     validation_split=0.25, seed=3)
print(json.dumps([e["text"] for e in result.validation]))
"""


def test_split_does_not_depend_on_hash_randomisation(capsys: pytest.CaptureFixture[str]) -> None:
    exec(SPLIT_SCRIPT, {})
    in_process = capsys.readouterr().out.strip()
    other_hash_seed = "1" if os.environ.get("PYTHONHASHSEED") == "2" else "2"
    env = dict(os.environ, PYTHONHASHSEED=other_hash_seed)
    completed = subprocess.run(
        [sys.executable, "-c", SPLIT_SCRIPT], env=env, capture_output=True, text=True, check=True
    )
    assert completed.stdout.strip().splitlines()[-1] == in_process
    assert len(json.loads(in_process)) == 10


# --- batching ------------------------------------------------------------------------------------


def test_pad_batch_pads_right() -> None:
    batch = data.pad_batch(
        [
            {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
            {"input_ids": [8], "attention_mask": [1], "labels": [8]},
        ],
        pad_token_id=3,
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(tensor.dtype == torch.long for tensor in batch.values())
    with pytest.raises(ValueError):
        data.pad_batch([], pad_token_id=0)


# --- the quickstart dataset ----------------------------------------------------------------------


def test_quickstart_dataset_loads_and_is_balanced(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    uri = str(QUICKSTART_DATA / "support-tickets.jsonl")
    examples = data.load_examples(uri, "instruction")
    assert 300 <= len(examples) <= 800
    counts = Counter(example["output"] for example in examples)
    assert set(counts) == {"billing", "technical", "account", "shipping", "returns"}
    assert max(counts.values()) - min(counts.values()) <= len(examples) // 20
    assert len({example["input"] for example in examples}) == len(examples)
    result = curate(examples, "instruction", tiny_tokenizer, validation_split=0.1, max_seq_length=512)
    assert result.report["kept"] == len(examples)


def test_quickstart_dataset_is_up_to_date_with_its_generator() -> None:
    spec = importlib.util.spec_from_file_location("quickstart_generate", QUICKSTART_DATA / "generate.py")
    assert spec is not None and spec.loader is not None
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    assert generate.main(["--check"]) == 0
