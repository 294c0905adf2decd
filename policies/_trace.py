"""
What a decision records: every check in order, and the rules that decided.

Each check of ``Policy.decide`` adds one ``Check`` to a ``CheckRecord`` with
the kind a failure would have; the first failed check gives the decision its
kind, and every failed check adds its rules to the reasons, so a denial names
all that denied it. ``Policy.explain`` returns the same record as a ``Trace``.

The rule ids below are callward's own, named when no rule of the document
decided: an unknown tool, the default deny, input out of bounds, a Cedar
error and state that cannot be read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from callward.core import Decision, JSONValue, RuleId, ToolSpec
from callward.core.errors import DenyKind
from callward.policies._document import PolicyDocument
from callward.policies._state import Proposal

UNKNOWN_TOOL_RULE: Final = RuleId("registry.unknown-tool")
DEFAULT_DENY_RULE: Final = RuleId("default-deny")
BOUNDS_RULE: Final = RuleId("input.bounds")
CEDAR_ERROR_RULE: Final = RuleId("cedar.evaluation-error")
CEDAR_CONTEXT_RULE: Final = RuleId("cedar.context")
STATE_RULE: Final = RuleId("policy.state-unavailable")
ANOMALY_STATE_RULE: Final = RuleId("anomaly.state-unavailable")


def schema_rule(spec: ToolSpec) -> RuleId:
    """The rule that names a tool's own argument schema."""
    return RuleId(f"schema.{spec.name}")


@dataclass(frozen=True, slots=True)
class Check:
    """One step of a decision trace: which check, which rule, what it found."""

    check: str
    passed: bool
    rules: tuple[RuleId, ...] = ()
    detail: str = ""
    json_path: str | None = None

    def to_json(self) -> dict[str, JSONValue]:
        return {"check": self.check, "passed": self.passed, "rules": list(self.rules),
                "detail": self.detail, "json_path": self.json_path}


@dataclass(frozen=True, slots=True)
class Trace:
    """The full decision trace of one call: every check in order, and the decision."""

    decision: Decision
    checks: tuple[Check, ...]
    labels: tuple[str, ...] = ()
    session_labels: tuple[str, ...] = ()

    def to_json(self) -> dict[str, JSONValue]:
        return {"decision": self.decision.to_json(),
                "checks": [c.to_json() for c in self.checks],
                "tool_labels": list(self.labels), "session_labels": list(self.session_labels)}


class CheckRecord:
    """The checks of one decision in order, and those that failed with their kind."""

    def __init__(self) -> None:
        self.checks: list[Check] = []
        self.failed: list[tuple[DenyKind, Check]] = []

    @property
    def ok(self) -> bool:
        return not self.failed

    def add(self, kind: DenyKind, check: Check) -> None:
        self.checks.append(check)
        if not check.passed:
            self.failed.append((kind, check))

    def add_trace(self, check: Check) -> None:
        """A step shown in the trace that decides nothing by itself."""
        self.checks.append(check)

    def decision(self, document: PolicyDocument, spec: ToolSpec, permits: tuple[RuleId, ...],
                 approval: Proposal | None, diagnostics: tuple[str, ...]) -> Decision:
        """
        Deny with the first failure's kind and every failed rule, or allow naming the
        schema, the permits and the approval used, with the settings the call runs under.
        """
        if self.failed:
            kind, first = self.failed[0]
            reasons: list[RuleId] = []
            for _, check in self.failed:
                reasons.extend(r for r in check.rules if r not in reasons)
            return Decision("deny", tuple(reasons), document.digest, kind=kind,
                            message=first.detail, json_path=first.json_path,
                            diagnostics=diagnostics, policy_version=document.version)
        reasons = [schema_rule(spec), *permits]
        if approval is not None:
            reasons.append(RuleId(f"approval.{approval.id}"))
        return Decision("allow", tuple(reasons), document.digest, message="allowed",
                        limits=document.limits_for(spec.name, spec.limits),
                        diagnostics=diagnostics, policy_version=document.version,
                        isolation=document.isolation_of(spec.name),
                        runtime=document.runtime_of(spec.name),
                        secrets=spec.secrets, egress=document.egress_of(spec.name))
