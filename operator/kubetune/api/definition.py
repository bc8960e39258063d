"""What defines a kubetune kind: its models, names, printer columns and CEL rules.

A :class:`ResourceDefinition` ties a kind to its pydantic models (the single source of truth for the
schema), its names (``kubectl get ftj``), its printer columns and the CEL rules that mirror the
cross-field checks of the pydantic validators. ``kubetune.api.crd`` turns each definition into a
CustomResourceDefinition. The kinds themselves are in ``kubetune.api.kinds``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from kubetune_contract.common import GROUP, VERSION

ColumnType = Literal["string", "integer", "number", "boolean", "date"]


@dataclass(frozen=True)
class PrinterColumn:
    """An ``additionalPrinterColumns`` entry: a column of ``kubectl get``."""

    name: str
    json_path: str
    type: ColumnType = "string"
    description: str = ""
    priority: int = 0  # 0: always shown; 1: only with ``-o wide``
    format: str | None = None

    def to_crd(self) -> dict[str, Any]:
        column: dict[str, Any] = {"name": self.name, "type": self.type}
        if self.format:
            column["format"] = self.format
        if self.description:
            column["description"] = self.description
        column["jsonPath"] = self.json_path
        if self.priority:
            column["priority"] = self.priority
        return column


@dataclass(frozen=True)
class CelRule:
    """An ``x-kubernetes-validations`` rule attached to the schema node at ``path``.

    ``path`` is dotted from the resource root: ``""`` is the whole object, ``"spec.dataset.curation"`` a
    nested object, and ``[*]`` steps into list items (``"spec.evaluation.gates[*]"``). The generator fails
    loudly if the path does not exist, so renaming a field cannot silently drop a rule.

    Rules may rely on schema defaults: the API server applies them before it evaluates rules. When it
    accepts the CRD it also checks each ``default`` against the rules of its node, without filling in the
    nested defaults first; ``kubetune.api.crd`` therefore writes a nested model's default out whole.
    """

    path: str
    rule: str
    message: str
    message_expression: str | None = None
    """CEL building the message from the values, as ``kubetune validate`` words it (``message`` is the
    fallback the API server shows if it cannot evaluate this). Only strings can go in: the API server's
    cost estimate refuses ``string()`` of a number and ``join()`` of a list, so a message about those
    states the rule alone, and validate's message adds the values after it."""
    field_path: str | None = None
    """The field the API server names in its error (``.validationSplit``), relative to ``path``, when
    the rule judges one field of the node it is attached to."""

    def to_crd(self) -> dict[str, Any]:
        rule: dict[str, Any] = {"rule": self.rule, "message": self.message}
        if self.message_expression is not None:
            rule["messageExpression"] = self.message_expression
        if self.field_path is not None:
            rule["fieldPath"] = self.field_path
        return rule


@dataclass(frozen=True)
class ResourceDefinition:
    """Everything that defines one kubetune kind."""

    kind: str
    plural: str
    singular: str
    model: type[BaseModel]
    spec_model: type[BaseModel]
    status_model: type[BaseModel] | None = None
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ("kubetune",)
    description: str = ""
    printer_columns: tuple[PrinterColumn, ...] = ()
    rules: tuple[CelRule, ...] = ()
    immutable_spec: bool = True
    max_name_length: int = 63
    """Longest metadata.name: the names derived from it (children, run keys) must stay valid."""
    group: str = GROUP
    version: str = VERSION
    scope: Literal["Namespaced", "Cluster"] = "Namespaced"

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"

    @property
    def crd_name(self) -> str:
        """``<plural>.<group>``, the name of the CustomResourceDefinition."""
        return f"{self.plural}.{self.group}"

    def name_length_message(self, length: int | None = None) -> str:
        """What ``kubetune validate`` and the API server say of a name longer than ``max_name_length``."""
        got = "" if length is None else f" (got {length})"
        return f"must be at most {self.max_name_length} characters long{got}"

    @property
    def name_length_rule(self) -> CelRule:
        limit = self.max_name_length
        return CelRule(
            "",
            f"size(self.metadata.name) <= {limit}",
            self.name_length_message(),
            field_path=".metadata.name",
        )

    @property
    def all_rules(self) -> tuple[CelRule, ...]:
        """The declared rules plus the generated name-length and spec immutability rules."""
        if not self.immutable_spec:
            return (self.name_length_rule, *self.rules)
        immutable = CelRule("spec", "self == oldSelf", f"spec is immutable; create a new {self.kind}")
        return (immutable, self.name_length_rule, *self.rules)

    def names(self) -> tuple[str, ...]:
        """Every name the resource answers to, lower-cased (kind, plural, singular, short names)."""
        return tuple(
            dict.fromkeys(n.lower() for n in (self.kind, self.plural, self.singular, *self.short_names))
        )
