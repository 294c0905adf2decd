"""
Lint for policy authors: what in a policy is wrong, unreachable or shadowed.

``lint`` validates every Cedar policy against the Cedar schema generated from
the tool registry, once per tool it can apply to (each tool's arguments typed
from its own JSON Schema), and reports rules that can never match
(unreachable) or that a broader unconditional deny always overrides
(shadowed). Where it cannot tell whether a forbid's conditions hold, it says
so rather than guess.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import cedarpy

from callward.core import JSONValue, ToolRegistry, ToolSpec
from callward.policies._cedar import (
    argument_names,
    cedar_schema,
    policy_summaries,
    untyped_arguments,
)
from callward.policies._document import PolicyDocument, Rule, Who
from callward.policies._evaluator import Policy
from callward.policies._shapes import (
    Shape,
    constraints_cover,
    contradicted,
    pinned_tools,
    settle_labels,
    shape_of,
)


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
    return pinned_tools(shape_of(summary))


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
    shapes = [shape_of(s) for s in summaries]
    forbids = [f for f in shapes if f.effect == "forbid" and f.calls and not f.never]
    findings = []
    for permit in (s for s in shapes if s.effect == "permit" and not s.never):
        undecided: list[Shape] = []
        for forbid in forbids:
            if not (constraints_cover(forbid.principal, permit.principal, document)
                    and constraints_cover(forbid.resource, permit.resource, document)):
                continue
            conditions = settle_labels(forbid.others, pinned_tools(permit), labels)
            if conditions is None or contradicted(conditions, permit.others):
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
