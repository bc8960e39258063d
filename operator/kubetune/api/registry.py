"""The kubetune resource registry: every kind the API serves, found by any of its names.

``kubetune.api.validation`` uses it to route documents to their model; the CLI resolves
``kubetune get ftj`` through :func:`get_definition`; the CRD generator and RBAC list
:func:`all_definitions`. The definitions themselves are in ``kubetune.api.kinds``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from kubetune.api.definition import ResourceDefinition
from kubetune.api.kinds import BUILTIN_KINDS


class UnknownResource(KeyError):
    """No registered kind answers to the name."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(name)
        self.name = name
        self.known = known

    def __str__(self) -> str:
        return f"unknown resource {self.name!r}; kubetune serves: {', '.join(self.known)}"


@dataclass
class ResourceRegistry:
    """Kind -> definition, with case-insensitive lookup by any of the resource's names."""

    _by_kind: dict[str, ResourceDefinition] = field(default_factory=dict)
    _by_name: dict[str, ResourceDefinition] = field(default_factory=dict)

    def register(self, definition: ResourceDefinition) -> ResourceDefinition:
        for name in definition.names():
            taken = self._by_name.get(name)
            if taken is not None and taken.kind != definition.kind:
                raise ValueError(f"{definition.kind}: name {name!r} is already used by {taken.kind}")
        self._by_kind[definition.kind] = definition
        for name in definition.names():
            self._by_name[name] = definition
        return definition

    def find(self, name: str) -> ResourceDefinition | None:
        """The definition for a kind, plural, singular or short name (any case), or ``None``.

        ``kubectl``-style qualified names (``finetunejobs.kubetune.dev``) resolve too.
        """
        key = name.strip().lower()
        found = self._by_name.get(key)
        if found is None and "." in key:
            base, _, group = key.partition(".")
            candidate = self._by_name.get(base)
            if candidate is not None and candidate.group == group:
                found = candidate
        return found

    def get(self, name: str) -> ResourceDefinition:
        """Like :meth:`find` but raises :class:`UnknownResource` (a ``KeyError``) naming the known kinds."""
        found = self.find(name)
        if found is None:
            raise UnknownResource(name, [f"{d.kind} ({', '.join((*d.short_names, d.plural))})" for d in self])
        return found

    def by_kind(self, kind: str) -> ResourceDefinition | None:
        """Exact (case-sensitive) lookup by ``kind``, as it appears in manifests."""
        return self._by_kind.get(kind)

    def kinds(self) -> list[str]:
        return sorted(self._by_kind)

    def __iter__(self) -> Iterator[ResourceDefinition]:
        return iter([self._by_kind[k] for k in self.kinds()])

    def __len__(self) -> int:
        return len(self._by_kind)


REGISTRY = ResourceRegistry()
for _definition in BUILTIN_KINDS:
    REGISTRY.register(_definition)


def get_definition(name: str) -> ResourceDefinition:
    """The definition for a kind, plural, singular or short name (any case).

    Raises :class:`UnknownResource` (a ``KeyError``) naming the known kinds.
    """
    return REGISTRY.get(name)


def find_definition(name: str) -> ResourceDefinition | None:
    """Like :func:`get_definition` but returns ``None`` for unknown names."""
    return REGISTRY.find(name)


def all_definitions() -> list[ResourceDefinition]:
    """Every registered definition, sorted by kind."""
    return list(REGISTRY)


def register(definition: ResourceDefinition) -> ResourceDefinition:
    """Add a definition to the default registry (raises ``ValueError`` on a name clash)."""
    return REGISTRY.register(definition)
