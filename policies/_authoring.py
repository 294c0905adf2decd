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

import json
import re
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
from callward.policies._anomaly_state import ANOMALY_METRICS, Anomaly, AnomalyState
from callward.policies._cedar import (
    argument_names,
    cedar_schema,
    policy_summaries,
    untyped_arguments,
)
from callward.policies._document import PolicyDocument, Rule, Who, load_policy
from callward.policies._evaluator import Policy
from callward.policies._state import PolicyState

MAX_EXAMPLES: Final = 5
#: In a replay an anomaly is open until its ``anomaly.resolved`` record.
_NEVER_QUIET_SECONDS: Final = 1e12


# -- lint ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing lint found: an error fails lint; a warning or an info (cannot tell) does not."""

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


def lint(policy: Policy, registry: ToolRegistry) -> list[Finding]:
    """
    Every finding about ``policy`` against the tools of ``registry``.

    Errors: a Cedar policy that fails validation against the schema of a tool it
    can apply to (each tool's arguments typed from its own JSON Schema), or that
    reads an argument its tool (or, unscoped, every tool) does not have.
    Warnings: unreachable and shadowed rules, names of unknown tools, Cedar
    policies without ``@id``, arguments that have no Cedar type.
    """
    document = policy.document
    findings: list[Finding] = []
    specs = {spec.name: spec for spec in registry}
    tools = set(specs)
    text = policy.cedar_text
    if text.strip():
        summaries = policy_summaries(text)
        validation = _cedar_validation(text, summaries, specs)
        findings += validation
        # A read Cedar already failed (one without ``has``) is reported once, by Cedar.
        failed = {(f.rule, match[1]) for f in validation
                  for match in [_MISSING_ARGUMENT.search(f.message)] if match}
        for summary in summaries:
            findings += _cedar_scope_findings(summary, document, tools)
            findings += _argument_findings(summary, specs, reported=failed)
        labels = {name: document.labels_of(name, spec.labels) for name, spec in specs.items()}
        findings += _cedar_shadowed(summaries, document, labels)
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
    for name, entries in (
        ("tools section", document.tool_limits),
        ("rate limit", {t: 0 for r in document.rate_limits for t in r.tools}),
        ("approval", {t: 0 for r in document.approvals for t in r.tools}),
    ):
        for tool in sorted(set(entries) - tools - {"*"}):
            findings.append(Finding("warning", tool, f"{name} names a tool the registry lacks"))
    return findings


def _scoped_tools(summary: Mapping[str, Any]) -> frozenset[str] | None:
    """
    The tools a policy can apply to, by its resource scope and by conditions that only
    test ``resource == Tool::…`` (Cedar's validator does not narrow on those); None
    when it admits every tool.
    """
    resource = summary.get("resource", {})
    entity = resource.get("entity")
    if resource.get("op") in {"==", "in"} and isinstance(entity, Mapping) \
            and entity.get("type") != "Tool":
        return frozenset()
    if resource.get("op") in {"is", "is_in"} and resource.get("entity_type") != "Tool":
        return frozenset()
    return _pinned_tools(_shape(summary))


def _applicable(summary: Mapping[str, Any], specs: Mapping[str, ToolSpec]) -> list[str]:
    scoped = _scoped_tools(summary)
    return sorted(specs if scoped is None else scoped & set(specs))


def _cedar_validation(text: str, summaries: list[dict[str, Any]],
                      specs: Mapping[str, ToolSpec]) -> list[Finding]:
    """
    Validate every policy against the Cedar schema of each tool it can apply to.

    Cedar types ``context`` per action and every call is ``Call``, so one schema
    cannot type each tool's arguments; lint validates once per tool instead and
    reports each error with the tools it occurs for.
    """
    ids = {s["cedar_id"]: str(s["rule_id"]) for s in summaries}
    applicable = {s["cedar_id"]: _applicable(s, specs) for s in summaries}
    errors: dict[tuple[str, str], list[str]] = {}
    for name in sorted(specs) or [""]:
        result = cedarpy.validate_policies(text, cedar_schema(specs.get(name)))
        for error in result.errors:
            pid = error.policy_id or ""
            if pid in applicable and name and name not in applicable[pid]:
                continue
            message = str(error.error).removeprefix(f"for policy `{pid}`, ")
            seen = errors.setdefault((pid, message), [])
            if name not in seen:  # Cedar may report one error twice
                seen.append(name)
    findings = []
    for (pid, message), tools in errors.items():
        where = f" (tool {', '.join(t for t in tools if t)})" if any(tools) else ""
        findings.append(Finding("error", ids.get(pid, pid or "cedar"),
                                f"fails validation against the registry{where}: {message}"))
    return findings


_ARGUMENTS: Final = {".": {"left": {"Var": "context"}, "attr": "arguments"}}
_MISSING_ARGUMENT: Final = re.compile(r"attribute `arguments\.([^`.]+)` in context")


def _argument_reads(node: Any) -> set[str]:
    """The names a policy reads from ``context.arguments`` (with ``has`` or ``.``)."""
    found: set[str] = set()
    if isinstance(node, Mapping):
        for key, value in node.items():
            if key in {"has", "."} and isinstance(value, Mapping) \
                    and value.get("left") == _ARGUMENTS and isinstance(value.get("attr"), str):
                found.add(value["attr"])
            found |= _argument_reads(value)
    elif isinstance(node, list):
        for item in node:
            found |= _argument_reads(item)
    return found


def _argument_findings(summary: Mapping[str, Any], specs: Mapping[str, ToolSpec], *,
                       reported: set[tuple[str, str]]) -> list[Finding]:
    """
    Arguments a policy reads that its tool does not have. Cedar accepts
    ``context.arguments has x`` for a missing ``x`` (it is just false), which hides
    a misspelt argument; a policy scoped to one tool must name that tool's
    arguments, an unscoped one an argument that some tool has.
    """
    reads = _argument_reads(summary.get("conditions", []))
    if not reads:
        return []
    rule_id = str(summary["rule_id"])
    scoped = _scoped_tools(summary)
    names = sorted(specs if scoped is None else scoped & set(specs))
    had = {name: argument_names(specs[name]) for name in names}
    untyped = {name: untyped_arguments(specs[name]) for name in names}
    findings = []
    for argument in sorted(reads):
        if (rule_id, argument) in reported:
            continue
        if scoped is not None:
            findings += [Finding("error", rule_id, f"reads argument {argument!r}, which tool "
                                 f"{name} does not have") for name in names
                         if argument not in had[name]]
            findings += [Finding("error", rule_id, f"reads argument {argument!r} of tool "
                                 f"{name}, which has no Cedar type") for name in names
                         if argument in untyped[name]]
        elif specs and not any(argument in args for args in had.values()):
            findings.append(Finding("error", rule_id, f"reads argument {argument!r}, which no "
                                    "registered tool has"))
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


@dataclass(frozen=True, slots=True)
class _Shape:
    """
    A Cedar policy as lint reasons about it: its principal and resource constraints
    (each a disjunction of scopes; all must hold), and its other conditions.

    Conditions that are only ``principal``/``resource`` tests (as the document's
    simple rules compile to) count as constraints, so they compare with scopes.
    """

    rule_id: str
    effect: str
    principal: tuple[tuple[Mapping[str, Any], ...], ...]
    resource: tuple[tuple[Mapping[str, Any], ...], ...]
    others: frozenset[str]
    never: bool
    calls: bool


def _conjuncts(node: Any) -> list[Any]:
    if isinstance(node, Mapping) and "&&" in node:
        return _conjuncts(node["&&"]["left"]) + _conjuncts(node["&&"]["right"])
    return [node]


def _disjuncts(node: Any) -> list[Any]:
    if isinstance(node, Mapping) and "||" in node:
        return _disjuncts(node["||"]["left"]) + _disjuncts(node["||"]["right"])
    return [node]


def _scope_test(node: Any) -> tuple[str, Mapping[str, Any]] | None:
    """``principal == E`` / ``principal in E`` / ``resource is T`` as (variable, scope)."""
    if not isinstance(node, Mapping) or len(node) != 1:
        return None
    (op, body), = node.items()
    if not isinstance(body, Mapping):
        return None
    var = body.get("left", {}).get("Var") if isinstance(body.get("left"), Mapping) else None
    if var not in {"principal", "resource"}:
        return None
    if op in {"==", "in"}:
        entity = body.get("right", {}).get("Value", {})
        if isinstance(entity, Mapping) and "__entity" in entity:
            return var, {"op": op, "entity": entity["__entity"]}
    if op == "is" and "in" not in body:
        return var, {"op": "is", "entity_type": body.get("entity_type")}
    return None


def _shape(summary: Mapping[str, Any]) -> _Shape:
    principal: list[tuple[Mapping[str, Any], ...]] = [(summary.get("principal", {}),)]
    resource: list[tuple[Mapping[str, Any], ...]] = [(summary.get("resource", {}),)]
    others: set[str] = set()
    never = False
    for condition in summary.get("conditions") or ():
        body = condition.get("body")
        if condition.get("kind") == "unless":
            body = {"!": {"arg": body}}
        for conjunct in _conjuncts(body):
            if conjunct == {"Value": True}:
                continue
            if conjunct == {"Value": False}:
                never = True
                continue
            tests = [_scope_test(d) for d in _disjuncts(conjunct)]
            variables = {t[0] for t in tests if t is not None}
            if None not in tests and len(variables) == 1:
                target = principal if variables == {"principal"} else resource
                target.append(tuple(t[1] for t in tests if t is not None))
            else:
                others.add(json.dumps(conjunct, sort_keys=True))
    action = summary.get("action", {})
    entities = action.get("entities") or [action.get("entity") or {}]
    calls = action.get("op") == "All" or (action.get("op") in {"==", "in"} and any(
        e.get("id") == "Call" for e in entities if isinstance(e, Mapping)))
    return _Shape(str(summary["rule_id"]), str(summary["effect"]), tuple(principal),
                  tuple(resource), frozenset(others), never, calls)


def _constraints_cover(wide: tuple[tuple[Mapping[str, Any], ...], ...],
                       narrow: tuple[tuple[Mapping[str, Any], ...], ...],
                       document: PolicyDocument) -> bool:
    """Whether every constraint of ``wide`` holds wherever all of ``narrow``'s hold."""
    return all(
        any(all(any(_scope_covers(w, n, document) for w in wide_any) for n in narrow_any)
            for narrow_any in narrow)
        for wide_any in wide)


_COMPLEMENTS: Final = {"<=": ">", ">": "<=", "<": ">=", ">=": "<", "==": "!=", "!=": "=="}


def _negations(condition: str) -> set[str]:
    """Conditions that are false exactly where ``condition`` is true (decidable forms)."""
    node = json.loads(condition)
    negations = {json.dumps({"!": {"arg": node}}, sort_keys=True)}
    if isinstance(node, dict) and len(node) == 1:
        (op, body), = node.items()
        if op == "!":
            negations.add(json.dumps(body["arg"], sort_keys=True))
        elif op in _COMPLEMENTS:
            negations.add(json.dumps({_COMPLEMENTS[op]: body}, sort_keys=True))
    return negations


def _contradicted(conditions: frozenset[str], others: frozenset[str]) -> bool:
    """Whether one of ``conditions`` is the negation of one of ``others``."""
    return any(_negations(condition) & others for condition in conditions)


_RESOURCE_LABELS: Final = {".": {"left": {"Var": "resource"}, "attr": "labels"}}


def _pinned_tools(shape: _Shape) -> frozenset[str] | None:
    """The tools a policy's resource constraints limit it to, or None when unlimited."""
    pinned: frozenset[str] | None = None
    for alternatives in shape.resource:
        # A tool has no parents, so ``in Tool::"x"`` is ``== Tool::"x"``.
        if all(a.get("op") in {"==", "in"} and a.get("entity", {}).get("type") == "Tool"
               for a in alternatives):
            names = frozenset(str(a["entity"].get("id")) for a in alternatives)
            pinned = names if pinned is None else pinned & names
    return pinned


def _settle_labels(conditions: frozenset[str], tools: frozenset[str] | None,
                   labels: Mapping[str, frozenset[str]]) -> frozenset[str] | None:
    """
    ``conditions`` with each ``resource.labels.contains(L)`` that holds for every one
    of ``tools`` dropped; None when one holds for none of them (never both apply).
    """
    if tools is None or not tools <= set(labels):
        return conditions
    left = set()
    for condition in conditions:
        node = json.loads(condition)
        test = node.get("contains") if isinstance(node, dict) else None
        label = (test.get("right", {}).get("Value")
                 if isinstance(test, dict) and test.get("left") == _RESOURCE_LABELS else None)
        if not isinstance(label, str):
            left.add(condition)
            continue
        holds = {label in labels[tool] for tool in tools}
        if holds == {False}:
            return None
        if holds != {True}:
            left.add(condition)
    return frozenset(left)


def _cedar_shadowed(summaries: list[dict[str, Any]], document: PolicyDocument,
                    labels: Mapping[str, frozenset[str]]) -> list[Finding]:
    """
    Permits that a forbid always overrides, condition-aware where it is decidable.

    A permit is shadowed when a forbid's principal, action and resource constraints
    cover its own and each of the forbid's other conditions is also one of the
    permit's (so whenever the permit applies, the forbid does): an unconditional
    forbid of a covering scope shadows any permit, whatever its ``when``. A
    forbid's ``resource.labels.contains(L)`` is settled from the registry when the
    permit names its tools, and a forbid whose condition is the negation of one of
    the permit's (``x > c`` against ``x <= c``) never applies with it. When the
    scopes are covered but the forbid has conditions that remain, lint cannot
    tell, and says so (severity ``info``).
    """
    yaml_ids = {str(rule.id) for rule in document.rules}
    shapes = [_shape(s) for s in summaries]
    forbids = [f for f in shapes if f.effect == "forbid" and f.calls and not f.never]
    findings = []
    for permit in (s for s in shapes if s.effect == "permit" and not s.never):
        undecided: list[_Shape] = []
        for forbid in forbids:
            if not (_constraints_cover(forbid.principal, permit.principal, document)
                    and _constraints_cover(forbid.resource, permit.resource, document)):
                continue
            conditions = _settle_labels(forbid.others, _pinned_tools(permit), labels)
            if conditions is None or _contradicted(conditions, permit.others):
                continue  # never both: the forbid cannot apply where the permit does
            if conditions <= permit.others:
                what = "deny rule" if forbid.rule_id in yaml_ids else "forbid"
                findings.append(Finding("warning", permit.rule_id, f"shadowed: {what} "
                                        f"{forbid.rule_id} always overrides it"))
                break
            undecided.append(forbid)
        else:
            if undecided:
                names = ", ".join(f.rule_id for f in undecided[:3])
                findings.append(Finding("info", permit.rule_id, f"maybe shadowed: cannot "
                                        f"tell whether the conditions of forbid {names} hold "
                                        "for every call it allows"))
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
    policy = Policy(load_policy(policy_path), state=PolicyState(), clock=clock, signer=signer,
                    anomalies=AnomalyState())  # no anomaly is open in a test case
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
    that ran on an approval and now asks for one counts as unchanged. An anomaly
    is open from its ``anomaly.detected`` record to its ``anomaly.resolved``.
    """
    clock = _Clock()
    anomalies = AnomalyState(quiet_seconds=_NEVER_QUIET_SECONDS)
    candidate = Policy(load_policy(candidate_path), state=PolicyState(), clock=clock,
                       anomalies=anomalies)
    report = ReplayReport()
    ran: dict[str, tuple[ToolCall, ToolSpec, CallContext]] = {}
    for kind, ts, body in records:
        report.records += 1
        if kind in {"anomaly.detected", "anomaly.resolved"}:
            _replay_anomaly(anomalies, kind, body, _epoch(ts))
            continue
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
    anomalies.close()
    return report


def _replay_anomaly(anomalies: AnomalyState, kind: str, body: Mapping[str, Any],
                    at: float) -> None:
    anomaly_id = str(body.get("anomaly_id"))
    if kind == "anomaly.resolved":
        anomalies.resolve(anomaly_id, by=str(body.get("by")), at=at)
    elif body.get("metric") in ANOMALY_METRICS and anomalies.get(anomaly_id) is None:
        anomalies.add(Anomaly(id=anomaly_id, principal=str(body.get("principal")),
                              tool=str(body.get("tool")), metric=body["metric"], evidence={},
                              detected_at=at, last_seen=at))


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

