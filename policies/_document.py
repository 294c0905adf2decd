"""
The policy document model: the frozen values a loaded, validated policy is made of.

A ``PolicyDocument`` exists only through ``parse_policy`` or ``load_policy``
(``callward.policies._loader``), which refuse anything the format
(``callward.policies._format``) does not allow; its ``digest`` names exactly
the bytes that decide, the Cedar texts included. Each section of the YAML
becomes one tuple of rules here, each rule a frozen dataclass that says whom
and what it matches.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Literal

from callward.core import CallContext, ResourceLimits, RuleId, Sha256Hex
from callward.core.types import MIB
from callward.policies._argument_constraints import ArgumentConstraint


@dataclass(frozen=True, slots=True)
class Who:
    """Whom a rule applies to: anyone named, or holding one of the roles or groups."""

    principals: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()

    @property
    def anyone(self) -> bool:
        return not (self.principals or self.roles or self.groups) or "*" in (
            self.principals | self.roles | self.groups
        )

    def matches(self, principal: str, roles: frozenset[str], groups: frozenset[str]) -> bool:
        return (
            self.anyone
            or principal in self.principals
            or bool(self.roles & roles)
            or bool(self.groups & groups)
        )


@dataclass(frozen=True, slots=True)
class Rule:
    """One simple permission rule: who may (or may not) call which tools."""

    id: RuleId
    effect: Literal["allow", "deny"]
    roles: frozenset[str]
    principals: frozenset[str]
    tools: frozenset[str]
    groups: frozenset[str] = frozenset()

    def matches(self, principal: str, roles: frozenset[str], tool: str) -> bool:
        who = (
            "*" in self.principals
            or principal in self.principals
            or "*" in self.roles
            or bool(self.roles & roles)
        )
        return who and ("*" in self.tools or tool in self.tools)


@dataclass(frozen=True, slots=True)
class Confinement:
    """Path arguments of a tool that must stay inside ``root``."""

    root: str
    arguments: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most ``limit`` calls per ``window_seconds`` for each key (``per``)."""

    id: RuleId
    tools: frozenset[str]
    labels: frozenset[str]
    who: Who
    per: tuple[Literal["principal", "tool", "session"], ...]
    algorithm: Literal["sliding_window", "token_bucket"]
    limit: int
    window_seconds: float

    def applies(self, principal: str, roles: frozenset[str], groups: frozenset[str],
                tool: str, labels: frozenset[str]) -> bool:
        if not self.who.matches(principal, roles, groups):
            return False
        if not self.tools and not self.labels:
            return True
        return "*" in self.tools or tool in self.tools or bool(self.labels & labels)


@dataclass(frozen=True, slots=True)
class ApprovalRule:
    """Calls of ``tools`` by ``who`` run only with a signed approval by ``approvers``."""

    id: RuleId
    tools: frozenset[str]
    who: Who
    approvers: Who
    expires_seconds: float


@dataclass(frozen=True, slots=True)
class FlowRule:
    """Nothing from a result labelled ``sources`` may reach a tool labelled ``sinks``."""

    id: RuleId
    sources: frozenset[str]
    sinks: frozenset[str]


@dataclass(frozen=True, slots=True)
class ResultRule:
    """What happens to a result before it reaches the model and the audit log."""

    id: RuleId
    tools: frozenset[str]
    redact: tuple[re.Pattern[str], ...]
    audit_body: Literal["hash", "body"] | None

    def applies(self, tool: str) -> bool:
        return not self.tools or "*" in self.tools or tool in self.tools


@dataclass(frozen=True, slots=True)
class McpContentRule:
    """Which resources (URI globs) and prompts (name globs) of one upstream server are enabled."""

    id: RuleId
    server: str
    resources: tuple[str, ...]
    prompts: tuple[str, ...]
    who: Who

    def enables(self, server: str, kind: Literal["resource", "prompt"], name: str) -> bool:
        patterns = self.resources if kind == "resource" else self.prompts
        return server == self.server and any(fnmatchcase(name, p) for p in patterns)


@dataclass(frozen=True, slots=True)
class AnomalyGate:
    """
    While an anomaly of ``metrics`` is open for the caller, its calls of ``tools``
    are denied (``approval is None``) or need the approval ``approval`` describes.
    """

    id: RuleId
    tools: frozenset[str]
    who: Who
    metrics: frozenset[str]
    approval: ApprovalRule | None

    def applies(self, principal: str, roles: frozenset[str], groups: frozenset[str],
                tool: str) -> bool:
        return ("*" in self.tools or tool in self.tools) and self.who.matches(
            principal, roles, groups)


@dataclass(frozen=True, slots=True)
class ToolPin:
    """The versions and/or digests of a tool the policy allows; an empty set pins nothing."""

    versions: frozenset[str] = frozenset()
    digests: frozenset[str] = frozenset()

    def violation(self, version: str, digest: str) -> str | None:
        """Why a version is not allowed, or None."""
        if self.versions and version not in self.versions:
            return (f"version {version} is not allowed by the policy "
                    f"(allowed: {', '.join(sorted(self.versions))})")
        if self.digests and digest not in self.digests:
            return f"version {version} (digest {digest[:16]}…) is not a digest the policy allows"
        return None


@dataclass(frozen=True, slots=True)
class PolicyDocument:
    """A loaded, validated policy, and the digest of exactly what was loaded."""

    rules: tuple[Rule, ...]
    principal_roles: Mapping[str, frozenset[str]]
    tool_limits: Mapping[str, Mapping[str, float | int]]
    digest: Sha256Hex
    source: str
    principal_groups: Mapping[str, frozenset[str]] = field(default_factory=dict)
    cedar_sources: tuple[tuple[str, str], ...] = ()
    tool_labels: Mapping[str, frozenset[str]] = field(default_factory=dict)
    output_labels: Mapping[str, frozenset[str]] = field(default_factory=dict)
    declassifies: Mapping[str, frozenset[str]] = field(default_factory=dict)
    confinements: Mapping[str, Confinement] = field(default_factory=dict)
    argument_constraints: Mapping[str, tuple[ArgumentConstraint, ...]] = field(
        default_factory=dict)
    tool_settings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    rate_limits: tuple[RateLimit, ...] = ()
    approvals: tuple[ApprovalRule, ...] = ()
    flows: tuple[FlowRule, ...] = ()
    results: tuple[ResultRule, ...] = ()
    mcp_content: tuple[McpContentRule, ...] = ()
    version: int = 1
    anomaly_gates: tuple[AnomalyGate, ...] = ()
    pins: Mapping[str, ToolPin] = field(default_factory=dict)

    @property
    def approval_rules(self) -> tuple[ApprovalRule, ...]:
        """The approval rules, and those of the anomaly gates that ask for approval."""
        return self.approvals + tuple(g.approval for g in self.anomaly_gates
                                      if g.approval is not None)

    def roles_of(self, principal: str) -> frozenset[str]:
        return self.principal_roles.get(principal, frozenset())

    def groups_of(self, principal: str) -> frozenset[str]:
        return self.principal_groups.get(principal, frozenset())

    def caller_roles(self, context: CallContext) -> frozenset[str]:
        """The caller's roles: the document's for its principal and its token's (identity)."""
        own = self.principal_roles.get(context.principal, frozenset())
        return own if context.identity is None else own | context.identity.roles

    def caller_groups(self, context: CallContext) -> frozenset[str]:
        """The caller's groups: the document's for its principal and its token's (identity)."""
        own = self.principal_groups.get(context.principal, frozenset())
        return own if context.identity is None else own | context.identity.groups

    def limits_for(self, tool: str, defaults: ResourceLimits) -> ResourceLimits:
        """The tool's limits with the policy's settings for it applied on top."""
        given = self.tool_limits.get(tool)
        if not given:
            return defaults
        fields = defaults.to_json()
        for key, value in given.items():
            if key == "memory_mebibytes":
                fields["memory_bytes"] = int(value) * MIB
            elif key == "tmp_mebibytes":
                fields["tmp_bytes"] = int(value) * MIB
            else:
                fields[key] = value
        return ResourceLimits(**fields)  # type: ignore[arg-type]

    def isolation_of(self, tool: str) -> Literal["call", "session"]:
        """``session`` only where the document says so; a fresh container is the default."""
        return "session" if self.tool_settings.get(tool, {}).get("isolation") == "session" \
            else "call"

    def runtime_of(self, tool: str) -> Literal["runc", "runsc"] | None:
        """The runtime the document names for a tool, or None for the sandbox's own."""
        runtime = self.tool_settings.get(tool, {}).get("runtime")
        return "runsc" if runtime == "runsc" else "runc" if runtime == "runc" else None

    def ungranted_secrets(self, tool: str, declared: tuple[str, ...]) -> tuple[str, ...]:
        """The secrets ``tool`` declares that the document does not grant it."""
        granted = self.tool_settings.get(tool, {}).get("secrets", ())
        return tuple(name for name in declared if name not in granted)

    def egress_of(self, tool: str) -> tuple[str, ...]:
        """The ``host:port`` targets the document lets ``tool`` reach; none by default."""
        return tuple(self.tool_settings.get(tool, {}).get("egress", ()))

    def labels_of(self, tool: str, own: tuple[str, ...]) -> frozenset[str]:
        """A tool's labels: its own and those the policy adds."""
        return frozenset(own) | self.tool_labels.get(tool, frozenset())
