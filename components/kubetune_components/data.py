"""Training data: parsing JSONL datasets, rendering prompts, tokenizing, curating and batching."""

from __future__ import annotations

import bisect
import copy
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, get_args

import torch

from kubetune_components.common import storage
from kubetune_components.common.errors import ConfigError, DatasetError
from kubetune_contract.finetune import Dataset, DatasetFormat, PiiCurationMode

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FORMATS: tuple[str, ...] = get_args(DatasetFormat)
ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100
LOSS_UNITS = "loss_units"
"""A feature's own count of what its loss averages over, when that is not its response tokens (a
preference row counts one)."""

INSTRUCTION_HEADER = "### Instruction:\n"
INPUT_HEADER = "### Input:\n"
RESPONSE_HEADER = "### Response:\n"


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"dataset.format: {fmt!r} is not one of {', '.join(FORMATS)}")


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _require_string(record: dict[str, Any], key: str, where: str, label: str | None = None) -> str:
    name = label or f'"{key}"'
    if key not in record:
        raise DatasetError(f"{where}: {name} is missing")
    value = record[key]
    if not isinstance(value, str):
        raise DatasetError(f"{where}: {name} must be a string, got {_json_type(value)}")
    return value


def _parse_text(record: dict[str, Any], where: str) -> dict[str, Any]:
    return {"text": _require_string(record, "text", where)}


def _parse_instruction(record: dict[str, Any], where: str) -> dict[str, Any]:
    example: dict[str, Any] = {"instruction": _require_string(record, "instruction", where)}
    if record.get("input") is not None:
        example["input"] = _require_string(record, "input", where)
    example["output"] = _require_string(record, "output", where)
    return example


def _parse_chat(record: dict[str, Any], where: str) -> dict[str, Any]:
    if "messages" not in record:
        raise DatasetError(f'{where}: "messages" is missing')
    raw_messages = record["messages"]
    if not isinstance(raw_messages, list):
        raise DatasetError(f'{where}: "messages" must be an array, got {_json_type(raw_messages)}')
    if not raw_messages:
        raise DatasetError(f'{where}: "messages" is empty')
    messages = []
    for index, message in enumerate(raw_messages):
        label = f"messages[{index}]"
        if not isinstance(message, dict):
            raise DatasetError(f"{where}: {label} must be an object, got {_json_type(message)}")
        role = _require_string(message, "role", where, f"{label}.role")
        if role not in ROLES:
            raise DatasetError(f"{where}: {label}.role must be one of {', '.join(ROLES)}")
        content = _require_string(message, "content", where, f"{label}.content")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "assistant":
        raise DatasetError(
            f"{where}: the last message must be from the assistant, got {messages[-1]['role']}"
        )
    return {"messages": messages}


def _parse_messages(value: Any, where: str, name: str) -> list[dict[str, str]]:
    if not value:
        raise DatasetError(f'{where}: "{name}" is empty')
    messages = []
    for index, message in enumerate(value):
        label = f"{name}[{index}]"
        if not isinstance(message, dict):
            raise DatasetError(f"{where}: {label} must be an object, got {_json_type(message)}")
        role = _require_string(message, "role", where, f"{label}.role")
        if role not in ROLES:
            raise DatasetError(f"{where}: {label}.role must be one of {', '.join(ROLES)}")
        messages.append(
            {"role": role, "content": _require_string(message, "content", where, f"{label}.content")}
        )
    return messages


def _rows_hold(fmt: str) -> str:
    fields = {"preference": "prompt, chosen, rejected", "feedback": "prompt, completion, label"}[fmt]
    return f"dataset.format {fmt} rows hold {fields}"


def _preference_prompt(record: dict[str, Any], where: str, fmt: str) -> str | list[dict[str, str]]:
    """A string prompt (used as it is) or a message list (rendered by the chat template)."""
    if "prompt" not in record:
        raise DatasetError(f'{where}: "prompt" is missing ({_rows_hold(fmt)})')
    prompt = record["prompt"]
    if isinstance(prompt, list):
        return _parse_messages(prompt, where, "prompt")
    if not isinstance(prompt, str):
        raise DatasetError(f'{where}: "prompt" must be a string or a message list, got {_json_type(prompt)}')
    return prompt


def _completion_text(record: dict[str, Any], key: str, where: str, fmt: str) -> str:
    """A completion: a string, or TRL's conversational form [{role: assistant, content}]."""
    if key not in record:
        raise DatasetError(f'{where}: "{key}" is missing ({_rows_hold(fmt)})')
    value = record[key]
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        messages = _parse_messages(value, where, key)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise DatasetError(f'{where}: "{key}" as a message list must hold one assistant message')
        return messages[0]["content"]
    raise DatasetError(f'{where}: "{key}" must be a string or a message list, got {_json_type(value)}')


def _parse_preference(record: dict[str, Any], where: str) -> dict[str, Any]:
    prompt = _preference_prompt(record, where, "preference")
    chosen = _completion_text(record, "chosen", where, "preference")
    rejected = _completion_text(record, "rejected", where, "preference")
    if chosen == rejected:
        raise DatasetError(f'{where}: "chosen" and "rejected" are the same text; the pair teaches nothing')
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _parse_feedback(record: dict[str, Any], where: str) -> dict[str, Any]:
    prompt = _preference_prompt(record, where, "feedback")
    completion = _completion_text(record, "completion", where, "feedback")
    if "label" not in record:
        raise DatasetError(f'{where}: "label" is missing ({_rows_hold("feedback")})')
    label = record["label"]
    if not isinstance(label, bool):
        raise DatasetError(
            f'{where}: "label" must be a boolean (true: a desirable completion), got {_json_type(label)}'
        )
    return {"prompt": prompt, "completion": completion, "label": label}


PREFERENCE_FORMATS = ("preference", "feedback")
"""Formats of rows that compare completions (methods dpo and kto) rather than show one response."""

_PARSERS = {
    "text": _parse_text,
    "instruction": _parse_instruction,
    "chat": _parse_chat,
    "preference": _parse_preference,
    "feedback": _parse_feedback,
}


def load_examples(uri: str, fmt: DatasetFormat) -> list[dict[str, Any]]:
    """Parse a JSONL dataset; any problem raises DatasetError naming the file and 1-based line."""
    return [example for _, example in load_numbered_examples(uri, fmt)]


def load_numbered_examples(uri: str, fmt: DatasetFormat) -> list[tuple[int, dict[str, Any]]]:
    """:func:`load_examples`, each example with its 1-based line number."""
    _check_format(fmt)
    try:
        raw = storage.read_bytes(uri)
    except FileNotFoundError as error:
        raise DatasetError(f"{uri}: file not found") from error
    except IsADirectoryError as error:
        raise DatasetError(f"{uri}: is a directory, expected a JSONL file") from error
    except OSError as error:
        raise DatasetError(f"{uri}: cannot read the file ({error})") from error
    parse = _PARSERS[fmt]
    examples: list[tuple[int, dict[str, Any]]] = []
    for line_number, raw_line in enumerate(raw.split(b"\n"), start=1):
        where = f"{uri} line {line_number}"
        try:
            line = raw_line.decode("utf-8-sig" if line_number == 1 else "utf-8")
        except UnicodeDecodeError as error:
            raise DatasetError(f"{where}: not valid UTF-8 (byte {error.start + 1})") from error
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DatasetError(f"{where}: invalid JSON ({error.msg} at column {error.colno})") from error
        if not isinstance(record, dict):
            raise DatasetError(f"{where}: expected a JSON object, got {_json_type(record)}")
        examples.append((line_number, parse(record, where)))
    if not examples:
        raise DatasetError(f"{uri}: the dataset is empty (no JSON lines)")
    return examples


def render_instruction_prompt(instruction: str, input_text: str | None = None) -> str:
    prompt = f"{INSTRUCTION_HEADER}{instruction}\n\n"
    if input_text:
        prompt += f"{INPUT_HEADER}{input_text}\n\n"
    return prompt + RESPONSE_HEADER


def render_preference_prompt(prompt: str | list[dict[str, str]], tokenizer: PreTrainedTokenizerBase) -> str:
    """A preference or feedback row's prompt as the model reads it: a string as it is, a message list
    through the chat template with the generation prompt."""
    if isinstance(prompt, str):
        return prompt
    return _chat_prompt(prompt, tokenizer)


def _chat_prompt(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase) -> str:
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ConfigError(
            f"the tokenizer {name} has no chat_template, which message-list prompts need; "
            "use a chat model or string prompts"
        )
    chat_prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if not isinstance(chat_prompt, str):
        raise ConfigError(f"the chat_template of {tokenizer.name_or_path} did not render to text")
    return chat_prompt


def preference_completions(example: dict[str, Any], fmt: DatasetFormat) -> list[str]:
    """The completions a preference row (chosen, rejected) or a feedback row (completion) compares."""
    if fmt == "preference":
        return [str(example["chosen"]), str(example["rejected"])]
    return [str(example["completion"])]


def render_prompt_and_response(
    example: dict[str, Any], fmt: DatasetFormat, tokenizer: PreTrainedTokenizerBase
) -> tuple[str, str]:
    """Split an example into the text the model is given and the text it must produce.

    A preference row's response is its chosen completion, a feedback row's its completion (desirable
    or not: evaluation scores the desirable ones only)."""
    _check_format(fmt)
    if fmt in PREFERENCE_FORMATS:
        return render_preference_prompt(example["prompt"], tokenizer), preference_completions(example, fmt)[0]
    if fmt == "text":
        return "", str(example["text"])
    if fmt == "instruction":
        prompt = render_instruction_prompt(str(example["instruction"]), example.get("input"))
        return prompt, str(example["output"])
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ConfigError(
            f"the tokenizer {name} has no chat_template, which the chat format needs; "
            "use a chat model or the instruction format"
        )
    messages = example["messages"]
    chat_prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    if not isinstance(chat_prompt, str):
        raise ConfigError(f"the chat_template of {tokenizer.name_or_path} did not render to text")
    return chat_prompt, str(messages[-1]["content"])


def prompt_token_ids(prompt: str, fmt: DatasetFormat, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids of a rendered prompt, exactly as training sees them; use these to generate.

    Chat templates write their own special tokens (bos included), so only the other formats let
    the tokenizer add them.
    """
    # A chat-rendered preference prompt starts with the template's bos: do not add a second one.
    bos = getattr(tokenizer, "bos_token", None)
    templated = fmt in PREFERENCE_FORMATS and bool(bos) and prompt.startswith(str(bos))
    encoded = tokenizer(prompt, add_special_tokens=fmt != "chat" and not templated)["input_ids"]
    return list(encoded)


def _response_token_ids(response: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ConfigError("the tokenizer has no eos token, which marks the end of a response")
    return [*tokenizer(response, add_special_tokens=False)["input_ids"], int(eos_id)]


def _encode(
    example: dict[str, Any], fmt: DatasetFormat, tokenizer: PreTrainedTokenizerBase
) -> tuple[list[int], list[int]]:
    prompt, response = render_prompt_and_response(example, fmt, tokenizer)
    return prompt_token_ids(prompt, fmt, tokenizer), _response_token_ids(response, tokenizer)


def tokenize_for_training(
    example: dict[str, Any], fmt: DatasetFormat, tokenizer: PreTrainedTokenizerBase, max_seq_length: int
) -> dict[str, list[int]] | None:
    """Prompt + response + eos, with the loss masked to the response (except for `text`).

    Sequences over `max_seq_length` are cut at the end. Returns None when the cut leaves no
    response token to learn from.
    """
    if max_seq_length < 1:
        raise ConfigError(f"training.maxSeqLength must be positive, got {max_seq_length}")
    prompt_ids, response_ids = _encode(example, fmt, tokenizer)
    if len(prompt_ids) >= max_seq_length:
        return None
    input_ids = (prompt_ids + response_ids)[:max_seq_length]
    if fmt == "text":
        labels = list(input_ids)
    else:
        labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_seq_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def _normalise(value: Any) -> Any:
    if isinstance(value, str):
        return " ".join(value.split())
    if isinstance(value, dict):
        return {key: _normalise(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_normalise(item) for item in value]
    return value


def dedupe_key(example: dict[str, Any]) -> str:
    """Equal for examples that differ only in whitespace."""
    return json.dumps(_normalise(example), sort_keys=True, ensure_ascii=False)


def _text_fields(example: dict[str, Any]) -> list[tuple[str, str]]:
    """(field path, text) of each text of an example: text, instruction/input/output, messages[i].content."""
    if "messages" in example:
        return [
            (f"messages[{index}].content", str(m["content"])) for index, m in enumerate(example["messages"])
        ]
    fields = [(key, value) for key, value in example.items() if isinstance(value, str)]
    if isinstance(example.get("prompt"), list):  # a preference or feedback row's message-list prompt
        fields += [
            (f"prompt[{index}].content", str(m["content"])) for index, m in enumerate(example["prompt"])
        ]
    return fields


def _with_text(example: dict[str, Any], path: str, text: str) -> None:
    if path.startswith(("messages[", "prompt[")):
        key = path[: path.index("[")]
        index = int(path[len(key) + 1 : path.index("]")])
        example[key][index] = {**example[key][index], "content": text}
    else:
        example[path] = text


@dataclass
class PiiScreening:
    """The examples after `dataset.curation.pii`, and its report: the mode, examples that held PII, those
    dropped, and the count per entity."""

    examples: list[dict[str, Any]]
    report: dict[str, Any]


def screen_pii(
    numbered: Sequence[tuple[int, dict[str, Any]]],
    mode: PiiCurationMode,
    uri: str,
    entities: Sequence[str] | None = None,
) -> PiiScreening:
    """Redact, drop or refuse examples holding personal data (kubetune_guardrails.pii, Presidio).

    `fail` raises DatasetError naming the first line, field and entity found; `off` returns the examples
    untouched, with no report entries but the mode.
    """
    examples = [example for _, example in numbered]
    if mode == "off":
        return PiiScreening(examples=examples, report={"mode": "off"})
    from kubetune_guardrails.pii import SUPPORTED_ENTITIES, add_counts, pii_detector

    detector = pii_detector(entities or SUPPORTED_ENTITIES)
    counts: dict[str, int] = {}
    kept: list[dict[str, Any]] = []
    with_pii = dropped = 0
    for line, example in numbered:
        redacted = copy.deepcopy(example)
        example_counts: dict[str, int] = {}
        for path, text in _text_fields(example):
            redaction = detector.redact(text)
            if not redaction.found:
                continue
            if mode == "fail":
                first = redaction.findings[0]
                raise DatasetError(
                    f"{uri} line {line}: {path} holds {first.entity} at characters {first.start}-{first.end} "
                    "(dataset.curation.pii is fail; use redact or drop to train on this file)"
                )
            add_counts(example_counts, redaction.counts)
            _with_text(redacted, path, redaction.text)
        if example_counts:
            with_pii += 1
            add_counts(counts, example_counts)
            if mode == "drop":
                dropped += 1
                continue
        kept.append(redacted if example_counts else example)
    report: dict[str, Any] = {
        "mode": mode,
        "examplesWithPii": with_pii,
        "dropped": dropped,
        "entities": dict(sorted(counts.items())),
    }
    return PiiScreening(examples=kept, report=report)


def load_screened_examples(uri: str, dataset: Dataset) -> PiiScreening:
    """The examples of `uri` in `dataset.format`, screened for PII as `dataset.curation.pii` says."""
    return screen_pii(load_numbered_examples(uri, dataset.format), dataset.curation.pii, uri)


@dataclass
class CurationResult:
    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    report: dict[str, int] = field(default_factory=dict)


def split_sizes(count: int, validation_split: float) -> int:
    """How many of `count` examples go to validation."""
    if validation_split <= 0 or count < 2:
        return 0
    return min(count - 1, max(1, round(count * validation_split)))


def curate(
    examples: Sequence[dict[str, Any]],
    fmt: DatasetFormat,
    tokenizer: PreTrainedTokenizerBase,
    *,
    dedupe: bool,
    min_tokens: int,
    max_tokens: int,
    validation_split: float,
    seed: int,
    max_seq_length: int | None = None,
) -> CurationResult:
    """Dedupe, filter by token length and split deterministically.

    With `max_seq_length`, examples whose prompt alone fills the context (no response token
    would survive truncation) are dropped too and counted as `noResponseTokens`.
    """
    _check_format(fmt)
    if not 0 <= validation_split < 1:
        raise ConfigError(f"dataset.validationSplit must be in [0, 1), got {validation_split}")
    report = {"total": len(examples), "duplicates": 0, "tooShort": 0, "tooLong": 0, "noResponseTokens": 0}
    seen: set[str] = set()
    kept: list[dict[str, Any]] = []
    for example in examples:
        if dedupe:
            key = dedupe_key(example)
            if key in seen:
                report["duplicates"] += 1
                continue
            seen.add(key)
        prompt_ids, response_ids = _encode(example, fmt, tokenizer)
        length = len(prompt_ids) + len(response_ids)
        if length < min_tokens:
            report["tooShort"] += 1
        elif length > max_tokens:
            report["tooLong"] += 1
        elif max_seq_length is not None and len(prompt_ids) >= max_seq_length:
            report["noResponseTokens"] += 1
        else:
            kept.append(example)
    report["kept"] = len(kept)
    if not kept:
        raise DatasetError(
            f"no examples left after curation: {report['total']} read, {report['duplicates']} duplicates, "
            f"{report['tooShort']} shorter than minTokens={min_tokens}, "
            f"{report['tooLong']} longer than maxTokens={max_tokens}, "
            f"{report['noResponseTokens']} with no room for the response"
        )
    order = list(range(len(kept)))
    # random.Random with an int seed is deterministic across processes, unlike hash().
    random.Random(seed).shuffle(order)
    validation_count = split_sizes(len(kept), validation_split)
    validation_indices = set(order[:validation_count])
    train = [ex for index, ex in enumerate(kept) if index not in validation_indices]
    validation = [ex for index, ex in enumerate(kept) if index in validation_indices]
    report["train"] = len(train)
    report["validation"] = len(validation)
    return CurationResult(train=train, validation=validation, report=report)


def curate_per_spec(
    examples: Sequence[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    validation_split: float,
    max_seq_length: int | None = None,
) -> CurationResult:
    """`curate` with the options of a job's `spec.dataset` block (format, curation and seed)."""
    return curate(
        examples,
        dataset.format,
        tokenizer,
        dedupe=dataset.curation.dedupe,
        min_tokens=dataset.curation.min_tokens,
        max_tokens=dataset.curation.max_tokens,
        validation_split=validation_split,
        seed=dataset.seed,
        max_seq_length=max_seq_length,
    )


def pad_batch(features: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of tokenized examples into tensors; padded labels are ignored by the loss.

    A preference row's rejected completion is padded to its own width."""
    if not features:
        raise ValueError("cannot pad an empty batch")
    # Padding's position ids are 0: a packed sequence's padding is not read as part of its last example.
    pad_values = {
        "input_ids": pad_token_id,
        "attention_mask": 0,
        "labels": IGNORE_INDEX,
        "position_ids": 0,
        "rejected_input_ids": pad_token_id,
        "rejected_labels": IGNORE_INDEX,
        "desirable": 0,
        LOSS_UNITS: 0,
    }
    batch: dict[str, torch.Tensor] = {}
    for key, pad_value in pad_values.items():
        if key not in features[0]:
            continue
        width = max(len(feature[key]) for feature in features)
        rows = [list(feature[key]) + [pad_value] * (width - len(feature[key])) for feature in features]
        batch[key] = torch.tensor(rows, dtype=torch.long)
    return batch


def pack_features(
    features: Sequence[dict[str, list[int]]], max_length: int, seed: int
) -> list[dict[str, list[int]]]:
    """Tokenized examples packed into sequences of at most `max_length` tokens (training.packing).

    Best-fit decreasing over a seeded shuffle: deterministic in (features, max_length, seed) and little
    room left unused. Each packed sequence carries `position_ids` that restart at 0 for every example,
    from which the model keeps attention inside each example. The first label of every example is
    ignored: unpacked, no token predicts it; packed, the previous example's last token would.
    """
    if max_length < 1:
        raise ConfigError(f"training.maxSeqLength must be positive, got {max_length}")
    order = list(range(len(features)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda index: -len(features[index]["input_ids"]))  # stable: ties keep the shuffle
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, bin), sorted: the best fit is the first with enough
    for index in order:
        length = len(features[index]["input_ids"])
        if length > max_length:
            raise ValueError(f"an example of {length} tokens does not fit a packed sequence of {max_length}")
        slot = bisect.bisect_left(room, (length, -1))
        if slot < len(room):
            free, bin_index = room.pop(slot)
        else:
            free, bin_index = max_length, len(bins)
            bins.append([])
        bins[bin_index].append(index)
        if free - length > 0:
            bisect.insort(room, (free - length, bin_index))
    packed: list[dict[str, list[int]]] = []
    for members in bins:
        sequence: dict[str, list[int]] = {key: [] for key in ("input_ids", "attention_mask", "labels")}
        sequence["position_ids"] = []
        for index in members:
            feature = features[index]
            length = len(feature["input_ids"])
            sequence["input_ids"] += feature["input_ids"]
            sequence["attention_mask"] += feature["attention_mask"]
            sequence["labels"] += [IGNORE_INDEX, *feature["labels"][1:]]
            sequence["position_ids"] += list(range(length))
        packed.append(sequence)
    return packed
