"""
Reading a policy document: YAML text in, a validated ``PolicyDocument`` out.

A document that is missing, unreadable, not YAML, has a duplicate key, an
unknown field or a default other than ``deny`` is refused with
``PolicyInvalid``; callward never starts with an allow-all in its place.

``parse_policy`` checks the whole text against the format's JSON Schema
(``callward.policies._format``) first, then reads each section with a function
of its own, and last checks what the schema cannot say. Rule ids are unique
across all sections: a decision names its rules by id.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from referencing import Registry

from callward.core import PolicyInvalid, ResourceLimits, RuleId
from callward.core._canonical import POLICY_DIGEST_DOMAIN, canonical_sha256
from callward.core._yaml import strict_yaml_load
from callward.core.types import is_egress_target
from callward.policies._anomaly_state import ANOMALY_METRICS
from callward.policies._argument_constraints import ArgumentConstraint
from callward.policies._constraint_section import parse_constraints
from callward.policies._document import (
    AnomalyGate,
    ApprovalRule,
    Confinement,
    FlowRule,
    McpContentRule,
    PolicyDocument,
    RateLimit,
    ResultRule,
    Rule,
    ToolPin,
    Who,
)
from callward.policies._format import DOCUMENT_SCHEMA, NAMED_PATTERNS

MAX_POLICY_BYTES: Final = 1 << 20

_DOCUMENT_VALIDATOR: Final = Draft202012Validator(DOCUMENT_SCHEMA, registry=Registry())

#: A section of the document as the schema left it: plain YAML values.
_Raw = Mapping[str, Any]


def load_policy(path: Path) -> PolicyDocument:
    """
    Load a policy file; Cedar files it names are read relative to it.

    Raises:
        PolicyInvalid: The file (or a Cedar file it names) is missing, unreadable or invalid.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyInvalid(f"policy file {path} cannot be read ({type(exc).__name__})") from exc
    return parse_policy(text, source=str(path), base=path.parent)


def parse_policy(text: str, *, source: str = "<string>", base: Path | None = None
                 ) -> PolicyDocument:
    """
    Parse and validate a policy document.

    Args:
        base: The directory Cedar files are named relative to.

    Raises:
        PolicyInvalid: The text is not a valid version-1 policy; the message says where.
    """
    raw = _validated(text, source)
    unique = _UniqueIds(source)
    rules = _rules(raw, unique)
    cedar_sources = _cedar_sources(raw, source, base)
    roles, groups = _principals(raw)
    tools = _tools(raw, unique, source)
    document = PolicyDocument(
        rules=rules,
        principal_roles=roles,
        principal_groups=groups,
        tool_limits=tools.limits,
        # The digest covers the Cedar texts too, so it names exactly what decides.
        digest=canonical_sha256({"document": raw, "cedar": [list(c) for c in cedar_sources]},
                                domain=POLICY_DIGEST_DOMAIN),
        source=source,
        cedar_sources=tuple(cedar_sources),
        tool_labels=tools.labels,
        output_labels=tools.output_labels,
        declassifies=tools.declassifies,
        pins=tools.pins,
        confinements=tools.confinements,
        argument_constraints=tools.constraints,
        tool_settings=tools.settings,
        rate_limits=_rate_limits(raw, unique),
        approvals=_approvals(raw, unique),
        flows=_flows(raw, unique),
        results=_results(raw, unique, source),
        mcp_content=_mcp_content(raw, unique),
        anomaly_gates=_anomaly_gates(raw, unique),
    )
    _check_tool_settings(document, source)
    return document


def _validated(text: str, source: str) -> dict[str, Any]:
    """The text as YAML that the format's schema accepts."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_POLICY_BYTES:
        raise PolicyInvalid(f"{source}: the policy is over {MAX_POLICY_BYTES} bytes")
    try:
        raw = strict_yaml_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise PolicyInvalid(f"{source}: not valid YAML{where}: {problem}") from exc
    if not isinstance(raw, dict):
        raise PolicyInvalid(f"{source}: a policy is a YAML mapping")
    error = best_match(_DOCUMENT_VALIDATOR.iter_errors(raw))
    if error is not None:
        raise PolicyInvalid(f"{source}: invalid at {error.json_path}: {error.message}")
    return raw


class _UniqueIds:
    """The rule ids seen so far: a decision names its rules by id, so none may repeat."""

    def __init__(self, source: str) -> None:
        self._source = source
        self._seen: set[str] = set()

    def __call__(self, rule_id: str) -> RuleId:
        if rule_id in self._seen:
            raise PolicyInvalid(f"{self._source}: two rules have the id {rule_id!r}")
        self._seen.add(rule_id)
        return RuleId(rule_id)


def _who(entry: _Raw) -> Who:
    return Who(
        principals=frozenset(entry.get("principals", ())),
        roles=frozenset(entry.get("roles", ())),
        groups=frozenset(entry.get("groups", ())),
    )


def _rules(raw: _Raw, unique: _UniqueIds) -> tuple[Rule, ...]:
    return tuple(
        Rule(
            id=unique(entry["id"]),
            effect=entry["effect"],
            roles=frozenset(entry.get("roles", ())),
            principals=frozenset(entry.get("principals", ())),
            tools=frozenset(entry["tools"]),
            groups=frozenset(entry.get("groups", ())),
        )
        for entry in raw.get("rules", ())
    )


def _cedar_sources(raw: _Raw, source: str, base: Path | None) -> list[tuple[str, str]]:
    """``(name, text)`` of each Cedar file the document names, then of its inline Cedar."""
    texts = []
    for name in raw.get("cedar", []):
        if base is None:
            raise PolicyInvalid(f"{source}: Cedar files need a policy loaded from a file")
        path = base / name
        try:
            texts.append((name, path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as exc:
            raise PolicyInvalid(f"{source}: Cedar file {name} cannot be read "
                                f"({type(exc).__name__})") from exc
    if "cedar_inline" in raw:
        texts.append(("<inline>", raw["cedar_inline"]))
    return texts


def _principals(raw: _Raw) -> tuple[dict[str, frozenset[str]], dict[str, frozenset[str]]]:
    """The roles and the groups of each principal."""
    principals = raw.get("principals") or {}
    return (
        {name: frozenset(s.get("roles", ())) for name, s in principals.items()},
        {name: frozenset(s.get("groups", ())) for name, s in principals.items()},
    )


@dataclass(frozen=True, slots=True)
class _ToolSection:
    """The ``tools`` section, one mapping per field of ``PolicyDocument`` it fills."""

    limits: dict[str, Mapping[str, float | int]]
    labels: dict[str, frozenset[str]]
    output_labels: dict[str, frozenset[str]]
    declassifies: dict[str, frozenset[str]]
    pins: dict[str, ToolPin]
    confinements: dict[str, Confinement]
    constraints: dict[str, tuple[ArgumentConstraint, ...]]
    settings: dict[str, Mapping[str, Any]]


def _tools(raw: _Raw, unique: _UniqueIds, source: str) -> _ToolSection:
    tools = raw.get("tools") or {}
    return _ToolSection(
        limits={name: dict(s.get("limits", {})) for name, s in tools.items()},
        labels={name: frozenset(s.get("labels", ())) for name, s in tools.items()},
        output_labels={name: frozenset(s.get("output_labels", ())) for name, s in tools.items()},
        declassifies={name: frozenset(s.get("declassifies", ())) for name, s in tools.items()},
        pins={
            name: ToolPin(frozenset(s.get("versions", ())), frozenset(s.get("digests", ())))
            for name, s in tools.items() if "versions" in s or "digests" in s
        },
        confinements={
            name: Confinement(s["confine"]["root"], tuple(s["confine"]["arguments"]))
            for name, s in tools.items() if "confine" in s
        },
        constraints={
            name: _argument_constraints(s["constraints"], unique, source)
            for name, s in tools.items() if s.get("constraints")
        },
        settings={
            name: {key: (tuple(s[key]) if key in ("secrets", "egress") else s[key])
                   for key in ("isolation", "runtime", "secrets", "egress") if key in s}
            for name, s in tools.items()
        },
    )


def _argument_constraints(entries: list[_Raw], unique: _UniqueIds, source: str
                          ) -> tuple[ArgumentConstraint, ...]:
    """A tool's argument constraints; one that means nothing sound is refused by id."""
    try:
        constraints = parse_constraints(entries)
    except ValueError as exc:
        raise PolicyInvalid(f"{source}: {exc}") from exc
    for constraint in constraints:
        unique(constraint.id)
    return constraints


def _rate_limits(raw: _Raw, unique: _UniqueIds) -> tuple[RateLimit, ...]:
    return tuple(
        RateLimit(
            id=unique(entry["id"]),
            tools=frozenset(entry.get("tools", ())),
            labels=frozenset(entry.get("labels", ())),
            who=_who(entry),
            per=tuple(entry.get("per", ["principal", "tool"])),
            algorithm=entry.get("algorithm", "sliding_window"),
            limit=entry["limit"],
            window_seconds=float(entry["window_seconds"]),
        )
        for entry in raw.get("rate_limits", ())
    )


def _approvals(raw: _Raw, unique: _UniqueIds) -> tuple[ApprovalRule, ...]:
    return tuple(
        ApprovalRule(
            id=unique(entry["id"]),
            tools=frozenset(entry["tools"]),
            who=_who(entry),
            approvers=_who(entry["approvers"]),
            expires_seconds=float(entry.get("expires_seconds", 900)),
        )
        for entry in raw.get("approvals", ())
    )


def _flows(raw: _Raw, unique: _UniqueIds) -> tuple[FlowRule, ...]:
    return tuple(
        FlowRule(unique(entry["id"]), frozenset(entry["from"]), frozenset(entry["to"]))
        for entry in raw.get("flows", ())
    )


def _results(raw: _Raw, unique: _UniqueIds, source: str) -> tuple[ResultRule, ...]:
    return tuple(
        ResultRule(
            id=unique(entry["id"]),
            tools=frozenset(entry.get("tools", ())),
            redact=_compile_patterns(source, entry["id"], entry.get("redact", [])),
            audit_body=entry.get("audit_body"),
        )
        for entry in raw.get("results", ())
    )


def _compile_patterns(source: str, rule_id: str, entries: list[str]
                      ) -> tuple[re.Pattern[str], ...]:
    patterns = []
    for entry in entries:
        text = NAMED_PATTERNS.get(entry, entry)
        try:
            patterns.append(re.compile(text))
        except re.error as exc:
            raise PolicyInvalid(f"{source}: results rule {rule_id!r}: a redact pattern is not "
                                f"a valid regular expression ({exc.msg})") from exc
    return tuple(patterns)


def _mcp_content(raw: _Raw, unique: _UniqueIds) -> tuple[McpContentRule, ...]:
    return tuple(
        McpContentRule(
            id=unique(entry["id"]),
            server=entry["server"],
            resources=tuple(entry.get("resources", ())),
            prompts=tuple(entry.get("prompts", ())),
            who=_who(entry),
        )
        for entry in raw.get("mcp_content", ())
    )


def _anomaly_gates(raw: _Raw, unique: _UniqueIds) -> tuple[AnomalyGate, ...]:
    return tuple(_anomaly_gate(unique(entry["id"]), entry) for entry in raw.get("anomalies", ()))


def _anomaly_gate(rule_id: RuleId, entry: _Raw) -> AnomalyGate:
    tools = frozenset(entry.get("tools", ("*",)))
    who = _who(entry)
    approval = None
    if entry["effect"] == "approval":
        approval = ApprovalRule(id=rule_id, tools=tools, who=who,
                                approvers=_who(entry["approvers"]),
                                expires_seconds=float(entry.get("expires_seconds", 900)))
    return AnomalyGate(id=rule_id, tools=tools, who=who,
                       metrics=frozenset(entry.get("metrics", ANOMALY_METRICS)),
                       approval=approval)


def _check_tool_settings(document: PolicyDocument, source: str) -> None:
    """What the schema cannot say: limits that make valid ``ResourceLimits``, and egress."""
    for tool in document.tool_limits:
        try:
            document.limits_for(tool, ResourceLimits())
        except ValueError as exc:
            raise PolicyInvalid(f"{source}: limits of tool {tool!r}: {exc}") from exc
    for tool in document.tool_settings:
        for target in document.egress_of(tool):
            if not is_egress_target(target):
                raise PolicyInvalid(f"{source}: egress of tool {tool!r}: {target!r} is not "
                                    "host:port (a lower-case DNS name or IPv4 address)")
