"""Quality gates: the bounds of a job's gates checked against measured values, for every publish step.

The gate models and the bound check are the API's (kubetune_contract); what differs between kinds is only
where a metric's value comes from, which the caller passes in as `value_of`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from kubetune_components.common.errors import GateFailedError
from kubetune_contract.common import GateOp, GateResult, within_bound

GateValue = Callable[[str, GateOp], float | None]
"""The measured value a gate bound is compared with, by metric and bound (None: not measured)."""


class BoundedGate(Protocol):
    @property
    def metric(self) -> str: ...

    def bounds(self) -> list[tuple[GateOp, float]]: ...


def evaluate_gates(gates: Sequence[BoundedGate], value_of: GateValue) -> list[dict[str, Any]]:
    """One result per bound of every gate (as gates.json holds them): metric, op, threshold, value, passed."""
    results: list[dict[str, Any]] = []
    for gate in gates:
        for op, threshold in gate.bounds():
            value = value_of(gate.metric, op)
            result = GateResult(
                metric=gate.metric,
                op=op,
                threshold=threshold,
                value=value,
                passed=within_bound(value, op, threshold),
            )
            results.append(result.model_dump(by_alias=True, mode="json"))
    return results


def check_gates(
    results: Sequence[Mapping[str, Any]], describe_failure: Callable[[Mapping[str, Any]], str]
) -> None:
    """Raise GateFailedError naming every failed bound (`describe_failure` says why for the job's kind)."""
    failed = [result for result in results if not result["passed"]]
    if failed:
        reasons = "; ".join(describe_failure(result) for result in failed)
        raise GateFailedError(f"{len(failed)} quality gate(s) failed, nothing was published: {reasons}")
