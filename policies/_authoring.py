"""
Tools for policy authors and reviewers: lint, test cases, replay.

- ``lint`` validates every Cedar policy against the Cedar schema generated
  from the tool registry, and reports rules that can never match
  (unreachable) or that a broader unconditional deny always overrides
  (shadowed).
- ``run_cases`` decides a file of cases against a policy, in order, on a
  fresh in-memory state, and says for each failing case why.
- ``replay`` re-decides every call of an audit log under a candidate policy
  and reports what would change. It takes the records as plain data, so this
  package never reads the audit store itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import cedarpy
import yaml

from callward.core import (
    CallContext,
    Decision,
    JSONValue,
    PolicyInvalid,
    Provenance,
    ToolCall,
    ToolRegistry,
    ToolSpec,
    canonical_bytes,
)
from callward.core._canonical import CanonicalizationError
from callward.policies._cedar import cedar_schema, policy_summaries
from callward.policies._document import PolicyDocument, Rule, Who, load_policy
from callward.policies._evaluator import Policy
from callward.policies._state import PolicyState

MAX_EXAMPLES: Final = 5


# -- lint ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing lint found: an error fails lint, a warning does not."""

    severity: str
    rule: str
    message: str

    def to_json(self) -> dict[str, JSONValue]:
        return {"severity": self.severity, "rule": self.rule, "message": self.message}


def _holders(document: PolicyDocument) -> tuple[set[str], set[str]]:
    roles = {r for rs in document.principal_roles.values() for r in rs}
    groups = {g for gs in document.principal_groups.values() for g in gs}
    return roles, groups


def _who_reachable(who: Who | Rule, document: PolicyDocument) -> bool:
    roles, groups = _holders(document)
    names = who.principals | who.roles | who.groups
    return (
        "*" in names
        or bool(who.principals)
        or bool(who.roles & roles)
        or bool(who.groups & groups)
    )


def _covers(wide: Rule, narrow: Rule) -> bool:
    """Whether ``wide`` matches every principal and tool ``narrow`` does."""
    if "*" not in wide.tools and not narrow.tools <= wide.tools:
        return False
    if "*" in (wide.principals | wide.roles | wide.groups):
        return True
    return (narrow.principals <= wide.principals and narrow.roles <= wide.roles
            and narrow.groups <= wide.groups)


def lint(policy: Policy, registry: ToolRegistry) -> list[Finding]:
    """
    Every finding about ``policy`` against the tools of ``registry``.

    Errors: a Cedar policy that fails validation against the generated schema.
    Warnings: unreachable and shadowed rules, names of unknown tools, Cedar
    policies without ``@id``, arguments two tools type differently.
    """
    document = policy.document
    findings: list[Finding] = []
    tools = {spec.name for spec in registry}
    schema, conflicts = cedar_schema(registry)
    findings += [Finding("warning", "cedar.schema", f"argument {c} is typed differently by two "
                         "tools; Cedar policies cannot read it") for c in conflicts]
    text = policy.cedar_text
    if text.strip():
        result = cedarpy.validate_policies(text, schema)
        ids = {p["cedar_id"]: p["rule_id"] for p in policy_summaries(text)}
        findings += [Finding("error", ids.get(error.policy_id, error.policy_id or "cedar"),
                             f"fails validation against the registry: {error.error}")
                     for error in result.errors]
        summaries = policy_summaries(text)
        for summary in summaries:
            findings += _cedar_scope_findings(summary, document, tools)
        findings += _cedar_shadowed(summaries, document)
    for rule in document.rules:
        if not _who_reachable(rule, document):
            findings.append(Finding("warning", rule.id, "unreachable: no principal holds any "
                                    "of its roles or groups"))
        unknown = sorted(rule.tools - tools - {"*"})
        if unknown and not (rule.tools & tools or "*" in rule.tools):
            findings.append(Finding("warning", rule.id, f"unreachable: names only tools the "
                                    f"registry lacks ({', '.join(unknown)})"))
        elif unknown:
            findings.append(Finding("warning", rule.id, f"names unknown tools: "
                                    f"{', '.join(unknown)}"))
        if rule.effect == "allow":
            for deny in document.rules:
                if deny.effect == "deny" and _covers(deny, rule):
                    findings.append(Finding("warning", rule.id, f"shadowed: deny rule {deny.id} "
                                            "always overrides it"))
                    break
    for name, entries in (
        ("tools section", document.tool_limits),
        ("rate limit", {t: 0 for r in document.rate_limits for t in r.tools}),
        ("approval", {t: 0 for r in document.approvals for t in r.tools}),
    ):
        for tool in sorted(set(entries) - tools - {"*"}):
            findings.append(Finding("warning", tool, f"{name} names a tool the registry lacks"))
    return findings


def _entity(scope: Mapping[str, Any]) -> tuple[str, str, str] | None:
    entity = scope.get("entity")
    if scope.get("op") in {"==", "in"} and isinstance(entity, Mapping):
        return scope["op"], str(entity.get("type")), str(entity.get("id"))
    return None


def _cedar_scope_findings(summary: Mapping[str, Any], document: PolicyDocument,
                          tools: set[str]) -> list[Finding]:
    rule_id = str(summary["rule_id"])
    findings = []
    if rule_id.startswith("cedar."):
        findings.append(Finding("warning", rule_id, "has no @id; decisions will name it by "
                                "position, which changes when policies are added"))
    roles, groups = _holders(document)
    principal = _entity(summary.get("principal", {}))
    if principal is not None:
        _, kind, name = principal
        if (kind == "Role" and name not in roles) or (kind == "Group" and name not in groups):
            findings.append(Finding("warning", rule_id, f"unreachable: no principal is in "
                                    f"{kind}::{name!r}"))
    resource = _entity(summary.get("resource", {}))
    if resource is not None and resource[1] == "Tool" and resource[2] not in tools:
        findings.append(Finding("warning", rule_id, f"unreachable: no tool {resource[2]!r} "
                                "is registered"))
    return findings


def _scope_covers(wide: Mapping[str, Any], narrow: Mapping[str, Any],
                  document: PolicyDocument) -> bool:
    """Whether a scope constraint (principal or resource) admits all that another admits."""
    op = wide.get("op")
    if op == "All":
        return True
    if op == "is":
        kind = wide.get("entity_type")
        return (narrow.get("op") == "is" and narrow.get("entity_type") == kind) or (
            narrow.get("op") in {"==", "in"} and narrow.get("entity", {}).get("type") == kind)
    if narrow.get("op") not in {"==", "in"}:
        return False
    mine, theirs = wide.get("entity", {}), narrow.get("entity", {})
    if mine == theirs and (op == "in" or narrow.get("op") == "=="):
        return True
    if op == "in" and narrow.get("op") == "==" and theirs.get("type") == "Principal":
        name = str(theirs.get("id"))
        held = (document.roles_of(name) if mine.get("type") == "Role"
                else document.groups_of(name) if mine.get("type") == "Group" else frozenset())
        return str(mine.get("id")) in held
    return False


def _cedar_shadowed(summaries: list[dict[str, Any]], document: PolicyDocument
                    ) -> list[Finding]:
    """Permits that an unconditional forbid with a scope at least as wide always overrides."""
    findings = []
    def unconditional_forbid(summary: Mapping[str, Any]) -> bool:
        action = summary.get("action", {})
        return summary["effect"] == "forbid" and not summary.get("conditions") and (
            action.get("op") == "All"
            or (action.get("op") == "==" and action.get("entity", {}).get("id") == "Call"))

    forbids = [s for s in summaries if unconditional_forbid(s)]
    for permit in (s for s in summaries if s["effect"] == "permit"):
        for forbid in forbids:
            if all(_scope_covers(forbid.get(part, {}), permit.get(part, {}), document)
                   for part in ("principal", "resource")):
                findings.append(Finding("warning", str(permit["rule_id"]),
                                        f"shadowed: forbid {forbid['rule_id']} always "
                                        "overrides it"))
                break
    return findings


# -- test cases ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CaseResult:
    """One case: what was expected, what was decided, and why it failed if it did."""

    name: str
    passed: bool
    expected: Mapping[str, JSONValue]
    decision: Decision | None
    why: str = ""

    def to_json(self) -> dict[str, JSONValue]:
        return {"name": self.name, "passed": self.passed, "expected": dict(self.expected),
                "decision": None if self.decision is None else self.decision.to_json(),
                "why": self.why}


@dataclass(slots=True)
class _Clock:
    now: float = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def load_cases(path: Path) -> list[dict[str, Any]]:
    """
    Read a cases file: ``cases:`` a list of {name, principal, call: {name, arguments},
    expect: {effect, kind?, rule?}} with optional session, repeat, advance_seconds,
    observe (record the result's labels), approve_by.

    Raises:
        PolicyInvalid: The file is missing or not a list of cases.
    """
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise PolicyInvalid(f"cases file {path} cannot be read ({type(exc).__name__})") from exc
    cases = raw.get("cases") if isinstance(raw, dict) else None
    if not isinstance(cases, list) or not all(isinstance(c, dict) for c in cases):
        raise PolicyInvalid(f"cases file {path}: `cases` must be a list of mappings")
    return cases


def run_cases(policy_path: Path, registry: ToolRegistry, cases: Sequence[Mapping[str, Any]],
              *, signer: Any = None) -> list[CaseResult]:
    """Decide every case in order against a fresh in-memory state; never raises for a case."""
    clock = _Clock()
    policy = Policy(load_policy(policy_path), state=PolicyState(), clock=clock, signer=signer)
    results = []
    for index, case in enumerate(cases):
        name = str(case.get("name", f"case {index + 1}"))
        expected = case.get("expect") or {}
        try:
            clock.now += float(case.get("advance_seconds", 0))
            decision = _run_case(policy, registry, case)
        except (KeyError, TypeError, ValueError, CanonicalizationError) as exc:
            results.append(CaseResult(name, False, expected, None,
                                      f"the case is malformed ({type(exc).__name__}: {exc})"))
            continue
        why = _mismatch(expected, decision)
        results.append(CaseResult(name, not why, expected, decision, why))
    policy.state.close()
    return results


def _run_case(policy: Policy, registry: ToolRegistry, case: Mapping[str, Any]) -> Decision:
    call_spec = case["call"]
    context = CallContext(str(case["principal"]), str(case.get("session", "")))
    decision = None
    for n in range(int(case.get("repeat", 1))):
        call = ToolCall.create(id=f"case-{n}", name=str(call_spec["name"]),
                               arguments=dict(call_spec.get("arguments", {})), dialect="api")
        spec = registry.get(call.name)
        decision = policy.decide(call, spec, context)
        if decision.kind == "approval_required" and case.get("approve_by"):
            proposal = decision.reasons[-1].removeprefix("proposal.")
            policy.approve(proposal, by=str(case["approve_by"]))
            decision = policy.decide(call, spec, context)
        if decision.effect == "allow" and case.get("observe") and spec is not None:
            policy.observe_result(call, spec, context, canonical_bytes(None))
    assert decision is not None  # noqa: S101 - repeat is at least 1
    return decision


def _mismatch(expected: Mapping[str, Any], decision: Decision) -> str:
    problems = []
    if "effect" in expected and expected["effect"] != decision.effect:
        problems.append(f"expected {expected['effect']}, got {decision.effect}")
    if "kind" in expected and expected["kind"] != decision.kind:
        problems.append(f"expected kind {expected['kind']}, got {decision.kind}")
    if "rule" in expected and expected["rule"] not in decision.reasons:
        problems.append(f"expected rule {expected['rule']} among {list(decision.reasons)}")
    if problems:
        problems.append(f"decided by {list(decision.reasons)}: {decision.message}")
    return "; ".join(problems)


# -- replay -------------------------------------------------------------------


@dataclass(slots=True)
class ReplayReport:
    """What a candidate policy would have decided differently on a recorded log."""

    records: int = 0
    calls: int = 0
    unchanged: int = 0
    changes: dict[str, int] = field(default_factory=lambda: {
        "allow_to_deny": 0, "deny_to_allow": 0, "deny_kind_changed": 0})
    examples: dict[str, list[dict[str, JSONValue]]] = field(default_factory=lambda: {
        "allow_to_deny": [], "deny_to_allow": [], "deny_kind_changed": []})
    skipped: int = 0

    def to_json(self) -> dict[str, JSONValue]:
        return {"records": self.records, "calls": self.calls, "unchanged": self.unchanged,
                "changed": sum(self.changes.values()), **self.changes,
                "skipped": self.skipped, "examples": self.examples}


def _epoch(ts: str) -> float:
    try:
        return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def replay(records: Iterable[tuple[str, str, Mapping[str, Any]]], candidate_path: Path,
           registry: ToolRegistry) -> ReplayReport:
    """
    Re-decide every ``call.denied``/``call.authorized`` record under a candidate.

    Args:
        records: ``(kind, ts, body)`` of each record, in log order.

    The candidate decides on a fresh in-memory state with its clock at each
    record's time, so rate limits and data-flow labels replay in order; a call
    that ran on an approval and now asks for one counts as unchanged.
    """
    clock = _Clock()
    candidate = Policy(load_policy(candidate_path), state=PolicyState(), clock=clock)
    report = ReplayReport()
    ran: dict[str, tuple[ToolCall, ToolSpec, CallContext]] = {}
    for kind, ts, body in records:
        report.records += 1
        if kind == "call.completed":
            seen = ran.pop(str(body.get("call_id")), None)
            if seen is not None and body.get("outcome") == "ok":
                candidate.observe_result(*seen, canonical_bytes(None))
            continue
        if kind not in {"call.denied", "call.authorized"}:
            continue
        report.calls += 1
        try:
            call, context = _recorded_call(body)
        except (KeyError, TypeError, ValueError, CanonicalizationError):
            report.skipped += 1
            continue
        clock.now = _epoch(ts)
        spec = registry.get(call.name)
        after = candidate.decide(call, spec, context)
        if after.effect == "allow" and spec is not None:
            ran[call.id] = (call, spec, context)
        before = body.get("decision") or {}
        _compare(report, call, context, before, after)
    candidate.state.close()
    return report


def _recorded_call(body: Mapping[str, Any]) -> tuple[ToolCall, CallContext]:
    recorded = body["call"]
    arguments = recorded.get("arguments")
    call = ToolCall.create(id=str(recorded["id"]), name=str(recorded["name"]),
                           arguments=arguments if isinstance(arguments, dict) else {},
                           dialect="api")
    # A plan step's provenance replays too, so its flow labels are judged per value again.
    provenance = body.get("provenance")
    return call, CallContext(str(body["principal"]), str(body.get("session_id", "")),
                             None if provenance is None else Provenance.from_json(provenance))


def _compare(report: ReplayReport, call: ToolCall, context: CallContext,
             before: Mapping[str, Any], after: Decision) -> None:
    was = before.get("effect")
    ran_on_approval = any(str(r).startswith("approval.") for r in before.get("reasons", []))
    if was == after.effect and (was == "allow" or before.get("kind") == after.kind):
        report.unchanged += 1
        return
    if was == "allow" and after.kind == "approval_required" and ran_on_approval:
        report.unchanged += 1
        return
    change = ("allow_to_deny" if was == "allow" else
              "deny_to_allow" if after.effect == "allow" else "deny_kind_changed")
    report.changes[change] += 1
    if len(report.examples[change]) < MAX_EXAMPLES:
        report.examples[change].append({
            "call_id": call.id, "tool": call.name, "principal": context.principal,
            "before": {"effect": was, "kind": before.get("kind"),
                       "reasons": list(before.get("reasons", []))},
            "after": {"effect": after.effect, "kind": after.kind,
                      "reasons": list(after.reasons)},
        })

