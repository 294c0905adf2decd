"""
The callward policy document: a YAML file, validated before anything is allowed.

A document that is missing, unreadable, not YAML, has a duplicate key, an
unknown field or a default other than ``deny`` is refused with
``PolicyInvalid``; callward never starts with an allow-all in its place.

Format, version 1 (every section but ``version`` and ``default`` is optional,
and a document needs ``rules`` or ``cedar``)::

    version: 1
    default: deny                 # the only accepted value
    principals:
      alice: {roles: [analyst], groups: [emea]}
    rules:                        # simple rules, compiled to Cedar policies
      - id: analysts-do-math      # unique, named in every decision it makes
        effect: allow             # or deny; a matching deny overrides any allow
        roles: [analyst]          # who: roles, groups and/or principals ("*" = anyone)
        tools: [square, add]      # what: tool names ("*" = any registered tool)
    cedar: [team.cedar]           # Cedar policy files, relative to this document
    cedar_inline: |               # or Cedar text inline
      @id("no-big-refunds")
      forbid (principal, action, resource == Tool::"refund")
        when { context.arguments.amount_cents > 50000 };
    tools:
      read_file:
        limits: {wall_seconds: 1}
        labels: [filesystem]      # added to the tool's own labels
        output_labels: [secret]   # every result of this tool carries these
        declassifies: [untrusted] # labels its arguments carry that its result does not
        confine: {root: /workspace, arguments: [path]}
      fetch_issues:
        secrets: [GITHUB_TOKEN]   # grants secrets the tool declares (@tool(secrets=...))
        egress: ["127.0.0.1:8080", "internal.example:443"]  # host:port via the egress proxy
      square:
        versions: ["1.0.0"]       # pins: a call resolving to another version is denied
        digests: ["<sha256>"]     # and/or to another digest (rule tools.square.pin)
    rate_limits:
      - {id: refunds-per-hour, tools: [refund], limit: 5, window_seconds: 3600,
         algorithm: sliding_window, per: [principal, tool]}
    approvals:
      - {id: refunds-need-a-manager, tools: [refund], approvers: {roles: [manager]},
         expires_seconds: 900}
    flows:                        # per value for calls whose provenance is known (plan
      - {id: no-secret-egress, from: [secret], to: [egress]}   # steps), else per session
    results:
      - {id: redact-credentials, tools: ["*"], redact: [credentials], audit_body: hash}
    mcp_content:                  # upstream MCP resources and prompts: off unless listed
      - {id: notes-public, server: notes, resources: ["note://public/*"],
         prompts: [summarize], roles: [analyst]}   # URI / name globs; who is optional
    anomalies:                    # while an anomaly is open for the caller (core/observe)
      - {id: hold-anomalous, effect: approval, tools: ["*"], metrics: [call_rate, denial_ratio],
         approvers: {roles: [security]}}   # or effect: deny; metrics default to all
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Final, Literal

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from referencing import Registry

from callward.core import PolicyInvalid, ResourceLimits, RuleId, Sha256Hex
from callward.core._canonical import POLICY_DIGEST_DOMAIN, canonical_sha256
from callward.core._yaml import strict_yaml_load
from callward.core.types import MIB, is_egress_target
from callward.policies._anomaly_state import ANOMALY_METRICS

MAX_POLICY_BYTES: Final = 1 << 20

_ID: Final = {"type": "string", "pattern": "^[a-z0-9][a-z0-9._-]{0,127}$"}
_NAME_LIST: Final = {
    "type": "array",
    "items": {"type": "string", "minLength": 1, "maxLength": 256},
    "uniqueItems": True,
}
_LABEL_LIST: Final = {
    "type": "array",
    "items": {"type": "string", "pattern": "^[a-z][a-z0-9_.-]{0,63}$"},
    "uniqueItems": True,
}
_LIMITS: Final = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "wall_seconds": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600},
        "memory_mebibytes": {"type": "integer", "minimum": 16, "maximum": 65536},
        "pids": {"type": "integer", "minimum": 4, "maximum": 4096},
        "cpus": {"type": "number", "exclusiveMinimum": 0, "maximum": 64},
        "output_bytes": {"type": "integer", "minimum": 1, "maximum": 1 << 30},
        "tmp_mebibytes": {"type": "integer", "minimum": 1, "maximum": 65536},
        "open_files": {"type": "integer", "minimum": 16, "maximum": 65536},
    },
}
_WHO: Final = {"roles": _NAME_LIST, "groups": _NAME_LIST, "principals": _NAME_LIST}
_ANOMALY_GATES: Final = {
    "type": "array",
    "items": {
        "type": "object",
        "additionalProperties": False,
        "required": ["id", "effect"],
        "if": {"properties": {"effect": {"const": "approval"}}},
        "then": {"required": ["approvers"]},
        "else": {"not": {"anyOf": [{"required": ["approvers"]},
                                   {"required": ["expires_seconds"]}]}},
        "properties": {
            "id": _ID,
            "description": {"type": "string"},
            "effect": {"enum": ["deny", "approval"]},
            "tools": {**_NAME_LIST, "minItems": 1},
            **_WHO,
            "metrics": {"type": "array", "minItems": 1, "uniqueItems": True,
                        "items": {"enum": list(ANOMALY_METRICS)}},
            "approvers": {"type": "object", "additionalProperties": False,
                          "minProperties": 1, "properties": _WHO},
            "expires_seconds": {"type": "number", "exclusiveMinimum": 0,
                                "maximum": 7 * 86400},
        },
    },
}
DOCUMENT_SCHEMA: Final[Mapping[str, Any]] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "required": ["version", "default"],
    "anyOf": [{"required": ["rules"]}, {"required": ["cedar"]}, {"required": ["cedar_inline"]}],
    "properties": {
        "version": {"const": 1},
        "default": {"const": "deny"},
        "description": {"type": "string"},
        "principals": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "properties": {"roles": _NAME_LIST, "groups": _NAME_LIST},
            },
        },
        "rules": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["id", "effect", "tools"],
                "anyOf": [{"required": ["roles"]}, {"required": ["principals"]},
                          {"required": ["groups"]}],
                "properties": {
                    "id": _ID,
                    "effect": {"enum": ["allow", "deny"]},
                    "description": {"type": "string"},
                    **_WHO,
                    "tools": {**_NAME_LIST, "minItems": 1},
                },
            },
        },
        "cedar": {
            "type": "array",
            "items": {"type": "string", "minLength": 1, "maxLength": 4096},
            "uniqueItems": True,
        },
        "cedar_inline": {"type": "string"},
        "tools": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "limits": _LIMITS,
                    # Sandbox settings, read by the gateway's sandbox stage.
                    "isolation": {"enum": ["call", "session"]},
                    "runtime": {"enum": ["runc", "runsc"]},
                    "secrets": {
                        "type": "array", "uniqueItems": True,
                        "items": {"type": "string", "pattern": "^[A-Z][A-Z0-9_]{0,63}$"},
                    },
                    "egress": {
                        "type": "array", "uniqueItems": True, "maxItems": 64,
                        "items": {"type": "string", "minLength": 3, "maxLength": 261},
                    },
                    "labels": _LABEL_LIST,
                    "output_labels": _LABEL_LIST,
                    "declassifies": _LABEL_LIST,
                    # Pins: the versions and/or digests a call may resolve to.
                    "versions": {"type": "array", "minItems": 1, "uniqueItems": True,
                                 "items": {"type": "string",
                                           "pattern": "^[0-9A-Za-z][0-9A-Za-z.+-]{0,31}$"}},
                    "digests": {"type": "array", "minItems": 1, "uniqueItems": True,
                                "items": {"type": "string", "pattern": "^[0-9a-f]{64}$"}},
                    "confine": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["root", "arguments"],
                        "properties": {
                            "root": {"type": "string", "pattern": "^/"},
                            "arguments": {**_NAME_LIST, "minItems": 1},
                        },
                    },
                },
            },
        },
        "rate_limits": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["id", "limit", "window_seconds"],
                "properties": {
                    "id": _ID,
                    "description": {"type": "string"},
                    "tools": _NAME_LIST,
                    "labels": _LABEL_LIST,
                    **_WHO,
                    "per": {
                        "type": "array",
                        "items": {"enum": ["principal", "tool", "session"]},
                        "uniqueItems": True,
                    },
                    "algorithm": {"enum": ["sliding_window", "token_bucket"]},
                    "limit": {"type": "integer", "minimum": 1, "maximum": 1_000_000_000},
                    "window_seconds": {"type": "number", "exclusiveMinimum": 0,
                                       "maximum": 366 * 86400},
                },
            },
        },
        "approvals": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["id", "tools", "approvers"],
                "properties": {
                    "id": _ID,
                    "description": {"type": "string"},
                    "tools": {**_NAME_LIST, "minItems": 1},
                    **_WHO,
                    "approvers": {
                        "type": "object",
                        "additionalProperties": False,
                        "minProperties": 1,
                        "properties": _WHO,
                    },
                    "expires_seconds": {"type": "number", "exclusiveMinimum": 0,
                                        "maximum": 7 * 86400},
                },
            },
        },
        "flows": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["id", "from", "to"],
                "properties": {
                    "id": _ID,
                    "description": {"type": "string"},
                    "from": {**_LABEL_LIST, "minItems": 1},
                    "to": {**_LABEL_LIST, "minItems": 1},
                },
            },
        },
        "mcp_content": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["id", "server"],
                "anyOf": [{"required": ["resources"]}, {"required": ["prompts"]}],
                "properties": {
                    "id": _ID,
                    "description": {"type": "string"},
                    "server": {"type": "string", "pattern": "^[a-z][a-z0-9]*(_[a-z0-9]+)*$"},
                    "resources": _NAME_LIST,
                    "prompts": _NAME_LIST,
                    **_WHO,
                },
            },
        },
        "results": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["id"],
                "properties": {
                    "id": _ID,
                    "description": {"type": "string"},
                    "tools": _NAME_LIST,
                    "redact": {"type": "array", "items": {"type": "string", "minLength": 1,
                                                          "maxLength": 1024}},
                    "audit_body": {"enum": ["hash", "body"]},
                },
            },
        },
        # Gates on open anomalies (callward.core.observe._anomaly): deny, or require approval.
        "anomalies": _ANOMALY_GATES,
    },
}
_DOCUMENT_VALIDATOR: Final = Draft202012Validator(DOCUMENT_SCHEMA, registry=Registry())

#: Named redaction patterns a ``results`` rule can use besides its own regexes.
NAMED_PATTERNS: Final[Mapping[str, str]] = {
    "credentials": "|".join((
        r"AKIA[0-9A-Z]{16}",                                  # AWS access key id
        r"gh[pousr]_[A-Za-z0-9]{36,255}",                     # GitHub tokens
        r"sk-[A-Za-z0-9_-]{20,}",                             # API keys of the sk- form
        r"xox[abprs]-[A-Za-z0-9-]{10,}",                      # Slack tokens
        r"(?i:bearer)\s+[A-Za-z0-9._~+/=-]{16,}",             # bearer tokens
        r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",  # JWTs
        r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----",
    )),
    "email": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}",
}


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


def _who(entry: Mapping[str, Any]) -> Who:
    return Who(
        principals=frozenset(entry.get("principals", ())),
        roles=frozenset(entry.get("roles", ())),
        groups=frozenset(entry.get("groups", ())),
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


def _read_cedar(source: str, base: Path | None, names: list[str]) -> list[tuple[str, str]]:
    texts = []
    for name in names:
        if base is None:
            raise PolicyInvalid(f"{source}: Cedar files need a policy loaded from a file")
        path = base / name
        try:
            texts.append((name, path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as exc:
            raise PolicyInvalid(f"{source}: Cedar file {name} cannot be read "
                                f"({type(exc).__name__})") from exc
    return texts


def _anomaly_gate(rule_id: RuleId, entry: Mapping[str, Any]) -> AnomalyGate:
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


def parse_policy(text: str, *, source: str = "<string>", base: Path | None = None
                 ) -> PolicyDocument:
    """
    Parse and validate a policy document.

    Args:
        base: The directory Cedar files are named relative to.

    Raises:
        PolicyInvalid: The text is not a valid version-1 policy; the message says where.
    """
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
    seen: set[str] = set()

    def unique(rule_id: str) -> RuleId:
        if rule_id in seen:
            raise PolicyInvalid(f"{source}: two rules have the id {rule_id!r}")
        seen.add(rule_id)
        return RuleId(rule_id)

    rules = tuple(
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
    principals = raw.get("principals") or {}
    tools = raw.get("tools") or {}
    cedar_sources = _read_cedar(source, base, raw.get("cedar", []))
    if "cedar_inline" in raw:
        cedar_sources.append(("<inline>", raw["cedar_inline"]))
    document = PolicyDocument(
        rules=rules,
        principal_roles={name: frozenset(s.get("roles", ())) for name, s in principals.items()},
        principal_groups={name: frozenset(s.get("groups", ())) for name, s in principals.items()},
        tool_limits={name: dict(s.get("limits", {})) for name, s in tools.items()},
        # The digest covers the Cedar texts too, so it names exactly what decides.
        digest=canonical_sha256({"document": raw, "cedar": [list(c) for c in cedar_sources]},
                                domain=POLICY_DIGEST_DOMAIN),
        source=source,
        cedar_sources=tuple(cedar_sources),
        tool_labels={name: frozenset(s.get("labels", ())) for name, s in tools.items()},
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
        tool_settings={
            name: {key: (tuple(s[key]) if key in ("secrets", "egress") else s[key])
                   for key in ("isolation", "runtime", "secrets", "egress") if key in s}
            for name, s in tools.items()
        },
        rate_limits=tuple(
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
        ),
        approvals=tuple(
            ApprovalRule(
                id=unique(entry["id"]),
                tools=frozenset(entry["tools"]),
                who=_who(entry),
                approvers=_who(entry["approvers"]),
                expires_seconds=float(entry.get("expires_seconds", 900)),
            )
            for entry in raw.get("approvals", ())
        ),
        flows=tuple(
            FlowRule(unique(entry["id"]), frozenset(entry["from"]), frozenset(entry["to"]))
            for entry in raw.get("flows", ())
        ),
        results=tuple(
            ResultRule(
                id=unique(entry["id"]),
                tools=frozenset(entry.get("tools", ())),
                redact=_compile_patterns(source, entry["id"], entry.get("redact", [])),
                audit_body=entry.get("audit_body"),
            )
            for entry in raw.get("results", ())
        ),
        mcp_content=tuple(
            McpContentRule(
                id=unique(entry["id"]),
                server=entry["server"],
                resources=tuple(entry.get("resources", ())),
                prompts=tuple(entry.get("prompts", ())),
                who=_who(entry),
            )
            for entry in raw.get("mcp_content", ())
        ),
        anomaly_gates=tuple(_anomaly_gate(unique(entry["id"]), entry)
                            for entry in raw.get("anomalies", ())),
    )
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
    return document


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
