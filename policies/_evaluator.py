"""
The policy evaluator: default deny, every decision explained.

Invariants:

- Whatever cannot prove "allow" denies: an unknown tool, arguments that fail
  the schema, a principal no allow rule names, an error inside a check.
- A matching ``deny`` rule overrides every ``allow`` rule.
- ``decide()`` evaluates every check and returns a ``Decision`` listing every
  rule that decided; its ``kind`` is the first failed check in pipeline order
  (unknown_tool, schema, permission). ``enforce()`` raises ``PolicyDenied``.
"""

from __future__ import annotations

from pathlib import Path

import structlog

from callward.core import (
    CallContext,
    Decision,
    PolicyDenied,
    RuleId,
    Sha256Hex,
    ToolCall,
    ToolSpec,
)
from callward.core.errors import DenyKind
from callward.policies._document import PolicyDocument, load_policy, parse_policy
from callward.policies._schema import SchemaCheck

log = structlog.get_logger()

UNKNOWN_TOOL_RULE = RuleId("registry.unknown-tool")
DEFAULT_DENY_RULE = RuleId("default-deny")


def _schema_rule(spec: ToolSpec) -> RuleId:
    return RuleId(f"schema.{spec.name}")


class Policy:
    """
    A loaded policy document, ready to decide calls. Satisfies ``PolicyEngine``.

    Example::

        >>> policy = Policy.from_text('''
        ... version: 1
        ... default: deny
        ... rules: []
        ... ''')
        >>> len(policy.digest)
        64
    """

    def __init__(self, document: PolicyDocument) -> None:
        self._document = document
        self._schema = SchemaCheck()

    @classmethod
    def from_file(cls, path: Path) -> Policy:
        """
        Raises:
            PolicyInvalid: The file is missing or invalid; nothing is allowed in its place.
        """
        return cls(load_policy(path))

    @classmethod
    def from_text(cls, text: str, *, source: str = "<string>") -> Policy:
        return cls(parse_policy(text, source=source))

    @property
    def digest(self) -> Sha256Hex:
        return self._document.digest

    @property
    def document(self) -> PolicyDocument:
        return self._document

    def decide(self, call: ToolCall, spec: ToolSpec | None, context: CallContext) -> Decision:
        """Decide one call; never raises for anything about the call itself."""
        digest = self._document.digest
        if spec is None or spec.name != call.name:
            return Decision(
                "deny",
                (UNKNOWN_TOOL_RULE,),
                digest,
                kind="unknown_tool",
                message="no tool of that name is registered",
            )
        failed: list[tuple[DenyKind, RuleId, str, str | None]] = []
        violation = self._schema.violation(call, spec)
        if violation is not None:
            failed.append(("schema", _schema_rule(spec), violation.message, violation.json_path))

        roles = self._document.roles_of(context.principal)
        matching = [
            rule
            for rule in self._document.rules
            if rule.matches(context.principal, roles, spec.name)
        ]
        denying = [rule.id for rule in matching if rule.effect == "deny"]
        allowing = [rule.id for rule in matching if rule.effect == "allow"]
        if denying:
            failed.extend(
                ("permission", rule, "a deny rule forbids this principal this tool", None)
                for rule in denying
            )
        elif not allowing:
            failed.append(
                ("permission", DEFAULT_DENY_RULE, "no rule allows this principal this tool", None)
            )

        if failed:
            kind, _, message, json_path = failed[0]
            return Decision(
                "deny",
                tuple(rule for _, rule, _, _ in failed),
                digest,
                kind=kind,
                message=message,
                json_path=json_path,
            )
        return Decision(
            "allow",
            (_schema_rule(spec), *allowing),
            digest,
            message="allowed",
            limits=self._document.limits_for(spec.name, spec.limits),
        )

    def enforce(self, call: ToolCall, spec: ToolSpec | None, context: CallContext) -> Decision:
        """
        Decide, and raise on a denial.

        Raises:
            PolicyDenied: The decision was deny; carries the kind, rule and JSON path.
        """
        decision = self.decide(call, spec, context)
        if decision.effect == "deny":
            # Decision.__post_init__ guarantees a kind on a denial; fall back closed anyway.
            kind: DenyKind = decision.kind if decision.kind is not None else "permission"
            raise PolicyDenied(
                decision.message,
                kind=kind,
                rule=decision.reasons[0],
                json_path=decision.json_path,
            )
        return decision
