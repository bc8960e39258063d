"""Constrained decoding: what a request's reply must look like, enforced token by token.

A ``JsonConstraint`` holds a JSON schema (``response_format``, or the calls a request's tools allow);
each generation row gets a ``RowConstraint``, lm-format-enforcer's ``TokenEnforcer`` over that
schema, which says which tokens may come next given the tokens generated so far. ``generation``
masks every other token before sampling, so the reply parses and validates by construction (unless
``max_tokens`` cuts it short: then ``finish_reason`` is ``length``).

lm-format-enforcer enforces a subset of JSON Schema. ``enforceable_schema`` walks a schema before
anything is generated and refuses a keyword the library would silently ignore (``minimum``,
``format``, ``patternProperties``, ...), naming the keyword and where it is, so a client never gets
an answer that merely looks constrained.

``allowed_first_tokens_or_text``: under ``tool_choice: auto`` a reply is either a tool call (it
opens with ``{``, and from there on the call's schema is enforced) or free text (it does not).
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from jsonschema import SchemaError
from jsonschema.validators import validator_for
from lmformatenforcer import (
    CharacterLevelParserConfig,
    JsonSchemaParser,
    TokenEnforcer,
    TokenEnforcerTokenizerData,
)
from lmformatenforcer.jsonschemaparser import NumberParsingState, StringParsingState
from transformers import PreTrainedTokenizerBase

from kubetune_components.serving.requests import RequestError

ANNOTATIONS = frozenset(
    {"title", "description", "$schema", "$id", "$comment", "default", "examples", "deprecated", "readOnly"}
)
"""Keywords that say nothing about which values are valid: nothing to enforce."""
ENFORCED = frozenset(
    {
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "minItems",
        "maxItems",
        "enum",
        "const",
        "anyOf",
        "allOf",
        "$ref",
        "$defs",
        "definitions",
        "pattern",
        "minLength",
        "maxLength",
        "nullable",
    }
)
"""The keywords lm-format-enforcer's JsonSchemaParser enforces (as checked below)."""
JSON_TYPES = ("string", "number", "integer", "boolean", "null", "object", "array")
ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}
"""``response_format: {"type": "json_object"}``: any JSON object."""
MAX_CONSECUTIVE_WHITESPACE = 1
"""Whitespace the reply may have in a row: JSON needs none between tokens, and a small model left
free to indent spends its token budget on it."""


class UnenforceableSchema(RequestError):
    """A schema (or a keyword in it) constrained decoding cannot enforce: a 400 naming it."""


@dataclass(frozen=True)
class JsonConstraint:
    """The reply must be JSON valid against ``schema_json`` (a schema, serialized canonically so the
    constraint is hashable and rows with equal schemas share the library's parsed schema)."""

    schema_json: str

    @classmethod
    def of(cls, schema: Mapping[str, Any]) -> JsonConstraint:
        return cls(json.dumps(schema, sort_keys=True, separators=(",", ":")))

    @property
    def schema(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.schema_json)
        return loaded


@dataclass(frozen=True)
class ToolCallOrText:
    """``tool_choice: auto``: a reply that opens with ``{`` is a call valid against ``calls``; any
    other reply is free text."""

    calls: JsonConstraint


OutputConstraint = JsonConstraint | ToolCallOrText


# --------------------------------------------------------------------------------------------------
# What can be enforced.


def _refuse(where: str, message: str) -> UnenforceableSchema:
    return UnenforceableSchema(f"{where}: {message}", param=where)


def _walk(schema: Any, where: str, definitions: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """Every subschema of ``schema`` with its path (``$ref`` targets are walked where they are defined)."""
    yield where, schema
    if not isinstance(schema, dict):
        return
    for name, value in (schema.get("properties") or {}).items():
        yield from _walk(value, f"{where}.properties.{name}", definitions)
    for keyword in ("items", "additionalProperties"):
        if isinstance(schema.get(keyword), dict):
            yield from _walk(schema[keyword], f"{where}.{keyword}", definitions)
    for keyword in ("anyOf", "allOf"):
        for index, option in enumerate(schema.get(keyword) or []):
            yield from _walk(option, f"{where}.{keyword}[{index}]", definitions)
    for keyword in ("$defs", "definitions"):
        for name, value in (schema.get(keyword) or {}).items():
            yield from _walk(value, f"{where}.{keyword}.{name}", definitions)


def _check_subschema(schema: Any, where: str, definitions: Mapping[str, Any], root: bool) -> None:
    if schema is True or schema == {}:
        if root:
            raise _refuse(where, "an empty schema allows any JSON value; give it a type")
        return
    if not isinstance(schema, dict):
        raise _refuse(where, "must be an object (a boolean schema cannot be enforced here)")
    for keyword in schema:
        if keyword not in ENFORCED and keyword not in ANNOTATIONS:
            raise _refuse(
                f"{where}.{keyword}",
                f'the keyword "{keyword}" cannot be enforced by constrained decoding; remove it or '
                "check it after the answer arrives",
            )
    if ("$defs" in schema or "definitions" in schema) and not root:
        raise _refuse(where, "definitions ($defs) are only read at the top of the schema")
    reference = schema.get("$ref")
    if reference is not None:
        prefix = next((p for p in ("#/$defs/", "#/definitions/") if reference.startswith(p)), None)
        if prefix is None or reference[len(prefix) :] not in definitions:
            raise _refuse(f"{where}.$ref", f"{reference!r} must name an entry of the schema's $defs")
        if len(schema.keys() - ANNOTATIONS) > 1:
            raise _refuse(f"{where}.$ref", "a $ref takes no sibling keywords here")
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind]
    if isinstance(kind, list) and len(schema.keys() - ANNOTATIONS - {"type"}) > 0:
        raise _refuse(f"{where}.type", "a list of types cannot be combined with other keywords")
    if kind is None and reference is None and not ({"anyOf", "allOf", "enum", "const"} & schema.keys()):
        raise _refuse(where, "needs a type (or anyOf, allOf, enum, const, $ref)")
    for name in kinds:
        if name is not None and name not in JSON_TYPES:
            raise _refuse(f"{where}.type", f"{name!r} is not a JSON type")
    if "const" in schema and not isinstance(schema["const"], str):
        raise _refuse(f"{where}.const", "only a string const can be enforced")
    enum = schema.get("enum")
    if enum is not None and not (
        all(isinstance(v, str) for v in enum)
        or all(isinstance(v, int | float) and not isinstance(v, bool) for v in enum)
    ):
        raise _refuse(f"{where}.enum", "only an enum of strings or of numbers can be enforced")
    if "pattern" in schema and ({"minLength", "maxLength"} & schema.keys()):
        raise _refuse(f"{where}.pattern", "a pattern cannot be combined with minLength or maxLength")
    if isinstance(schema.get("items"), list) or schema.get("items") is False:
        raise _refuse(f"{where}.items", "must be one schema for every item")
    additional = schema.get("additionalProperties")
    if additional is not None and schema.get("properties") is None and additional is False:
        raise _refuse(f"{where}.additionalProperties", "false needs properties to say which keys are allowed")
    properties = schema.get("properties")
    required = schema.get("required") or []
    missing = [name for name in required if properties is not None and name not in properties]
    if missing:
        raise _refuse(f"{where}.required", f"names {missing[0]!r}, which is not in properties")
    if "allOf" in schema and any(
        not isinstance(option, dict) or option.get("type") != "object" for option in schema["allOf"]
    ):
        raise _refuse(f"{where}.allOf", "only objects (type: object) can be merged with allOf")


def enforceable_schema(schema: Any, where: str) -> dict[str, Any]:
    """``schema`` when it is a valid JSON Schema that constrained decoding enforces in full; a 400
    naming the offending keyword (at ``where``, e.g. ``response_format.json_schema.schema``) otherwise."""
    if not isinstance(schema, dict):
        raise _refuse(where, "must be an object (a JSON Schema)")
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as error:
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.path)
        raise _refuse(f"{where}{path}", f"is not a valid JSON Schema: {error.message}") from error
    definitions: dict[str, Any] = {**(schema.get("definitions") or {}), **(schema.get("$defs") or {})}
    for path, subschema in _walk(schema, where, definitions):
        _check_subschema(subschema, path, definitions, root=path == where)
    return schema


def tool_call_schema(tools: Sequence[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """A reply that calls one of ``tools`` (name, parameters schema):
    ``{"name": ..., "arguments": {...}}``."""
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": dict(parameters)},
            "required": ["name", "arguments"],
        }
        for name, parameters in tools
    ]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


# --------------------------------------------------------------------------------------------------
# Enforcing it.


def _writes_json_text(text: str) -> bool:
    """A token JSON may contain as it is: JSON strings take no raw control characters (newlines
    included), and a token that is part of a multi-byte character decodes to U+FFFD alone."""
    return bool(text) and "\ufffd" not in text and all(ord(character) >= 0x20 for character in text)


def _regular_tokens(tokenizer: PreTrainedTokenizerBase) -> list[tuple[int, str, bool]]:
    """(id, text, starts a word) of every non-special token JSON may contain, as lm-format-enforcer's
    own integrations compute it: decoded after a "0" so a leading space of a word-start token is kept.

    Tokens with control characters or partial characters are left out (so a constrained string
    spells non-ASCII characters only with tokens that hold them whole)."""
    zero = tokenizer.encode("0", add_special_tokens=False)[-1]
    special = set(tokenizer.all_special_ids)
    tokens: list[tuple[int, str, bool]] = []
    for token_id in range(len(tokenizer)):
        if token_id in special:
            continue
        after_zero = str(tokenizer.decode([zero, token_id]))[1:]
        alone = str(tokenizer.decode([token_id]))
        if _writes_json_text(after_zero):
            tokens.append((token_id, after_zero, len(after_zero) > len(alone)))
    return tokens


_vocabularies: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, dict[frozenset[int], Any]] = (
    weakref.WeakKeyDictionary()
)
_vocabularies_lock = threading.Lock()


def tokenizer_data(tokenizer: PreTrainedTokenizerBase, eos_ids: frozenset[int]) -> Any:
    """lm-format-enforcer's view of a tokenizer (built once per tokenizer: it decodes the vocabulary)."""
    with _vocabularies_lock:
        per_eos = _vocabularies.setdefault(tokenizer, {})
        if eos_ids not in per_eos:

            def decode(tokens: list[int]) -> str:
                return str(tokenizer.decode(tokens)).rstrip("\ufffd")

            per_eos[eos_ids] = TokenEnforcerTokenizerData(
                _regular_tokens(tokenizer), decode, sorted(eos_ids), False, len(tokenizer)
            )
        return per_eos[eos_ids]


class RowConstraint:
    """The tokens one generation row may produce next, given the tokens it has produced."""

    def __init__(
        self, constraint: OutputConstraint, tokenizer: PreTrainedTokenizerBase, eos_ids: frozenset[int]
    ) -> None:
        data = tokenizer_data(tokenizer, eos_ids)
        schema = constraint.calls.schema if isinstance(constraint, ToolCallOrText) else constraint.schema
        parser = JsonSchemaParser(schema)
        self.enforcer = TokenEnforcer(data, parser)
        # TokenEnforcer sets the parser's config to its defaults; ours replaces them (required keys in
        # the order the schema lists them end an object soonest).
        parser.config = CharacterLevelParserConfig(
            alphabet=data.tokenizer_alphabet,
            max_consecutive_whitespaces=MAX_CONSECUTIVE_WHITESPACE,
            force_json_field_order=True,
        )
        self.text_allowed = isinstance(constraint, ToolCallOrText)
        """Still undecided between a tool call and free text (only before the first token)."""
        self.eos_ids = eos_ids
        self.vocabulary_size = int(data.vocab_size)
        self._opens_json = frozenset(
            token_id
            for token_id, text, _ in data.regular_tokens
            if text.lstrip()[:1] == "{" or not text.strip()
        )
        self.free = False
        """Free text chosen under tool_choice auto: nothing is enforced any more."""
        self._exponent_tokens = frozenset(
            token_id for token_id, text, _ in data.regular_tokens if set(text) & set("eE+")
        )
        self._space_after_quote = frozenset(
            token_id for token_id, text, _ in data.regular_tokens if re.search(r'"\s', text)
        )
        self._space_first = frozenset(
            token_id for token_id, text, _ in data.regular_tokens if text[:1].isspace()
        )

    def _excluded(self, generated: Sequence[int]) -> frozenset[int]:
        """Tokens lm-format-enforcer 0.11.3 allows but should not: its string parser takes whitespace
        right after an opening quote as whitespace before the string (so " gold" passes an enum of
        "gold" and a pattern is checked without the space), and its integer parser takes an
        exponent (5E-1 is no integer)."""
        state = self.enforcer.prefix_states.get(tuple(generated))
        stack = getattr(state.parser, "object_stack", None) if state is not None else None
        top = stack[-1] if stack else None
        if isinstance(top, NumberParsingState) and not top.allow_floating_point:
            return self._exponent_tokens | self._space_after_quote
        string_starts = (
            isinstance(top, StringParsingState)
            and top.seen_opening_quote
            and not top.seen_closing_quote
            and not top.parsed_string
        )
        if string_starts:
            return self._space_first | self._space_after_quote
        return self._space_after_quote

    def allowed(self, generated: Sequence[int]) -> list[int] | None:
        """Token ids allowed next; None when any token is."""
        if self.free:
            return None
        if () not in self.enforcer.prefix_states:  # the enforcer takes its first call as the start
            self.enforcer.get_allowed_tokens([])
        allowed = list(self.enforcer.get_allowed_tokens(list(generated)).allowed_tokens)
        excluded = self._excluded(generated)
        allowed = [token for token in allowed if token not in excluded]
        if self.text_allowed and not generated:
            text_tokens = (t for t in range(self.vocabulary_size) if t not in self._opens_json)
            allowed.extend(text_tokens)
        return allowed

    def accepted(self, token: int) -> None:
        """The first token decides, under tool_choice auto, whether the reply is a call or text."""
        if self.text_allowed:
            self.text_allowed = False
            self.free = token not in self._opens_json
