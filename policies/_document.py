"""
The callward policy document: a YAML file, validated before anything is allowed.

A document that is missing, unreadable, not YAML, has a duplicate key, an
unknown field or a default other than ``deny`` is refused with
``PolicyInvalid``; callward never starts with an allow-all in its place.

Format, version 1::

    version: 1
    default: deny                 # the only accepted value
    principals:
      alice: {roles: [analyst]}
    rules:
      - id: analysts-do-math      # unique, named in every decision it makes
        effect: allow             # or deny; a matching deny overrides any allow
        roles: [analyst]          # who: roles and/or principals ("*" = anyone)
        tools: [square, add]      # what: tool names ("*" = any registered tool)
    tools:
      spin:
        limits: {wall_seconds: 1}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from referencing import Registry

from callward.core import PolicyInvalid, ResourceLimits, RuleId, Sha256Hex
from callward.core._canonical import POLICY_DIGEST_DOMAIN, canonical_sha256
from callward.core.types import MIB

MAX_POLICY_BYTES: Final = 1 << 20

_NAME_LIST: Final = {
    "type": "array",
    "items": {"type": "string", "minLength": 1, "maxLength": 256},
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
DOCUMENT_SCHEMA: Final[Mapping[str, Any]] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "required": ["version", "default", "rules"],
    "properties": {
        "version": {"const": 1},
        "default": {"const": "deny"},
        "description": {"type": "string"},
        "principals": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "properties": {"roles": _NAME_LIST},
            },
        },
        "rules": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["id", "effect", "tools"],
                "anyOf": [{"required": ["roles"]}, {"required": ["principals"]}],
                "properties": {
                    "id": {"type": "string", "pattern": "^[a-z0-9][a-z0-9._-]{0,127}$"},
                    "effect": {"enum": ["allow", "deny"]},
                    "description": {"type": "string"},
                    "roles": _NAME_LIST,
                    "principals": _NAME_LIST,
                    "tools": {**_NAME_LIST, "minItems": 1},
                },
            },
        },
        "tools": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "properties": {"limits": _LIMITS},
            },
        },
    },
}
_DOCUMENT_VALIDATOR: Final = Draft202012Validator(DOCUMENT_SCHEMA, registry=Registry())


@dataclass(frozen=True, slots=True)
class Rule:
    """One permission rule: who may (or may not) call which tools."""

    id: RuleId
    effect: Literal["allow", "deny"]
    roles: frozenset[str]
    principals: frozenset[str]
    tools: frozenset[str]

    def matches(self, principal: str, roles: frozenset[str], tool: str) -> bool:
        who = (
            "*" in self.principals
            or principal in self.principals
            or "*" in self.roles
            or bool(self.roles & roles)
        )
        return who and ("*" in self.tools or tool in self.tools)


@dataclass(frozen=True, slots=True)
class PolicyDocument:
    """A loaded, validated policy, and the digest of exactly what was loaded."""

    rules: tuple[Rule, ...]
    principal_roles: Mapping[str, frozenset[str]]
    tool_limits: Mapping[str, Mapping[str, float | int]]
    digest: Sha256Hex
    source: str

    def roles_of(self, principal: str) -> frozenset[str]:
        return self.principal_roles.get(principal, frozenset())

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


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses duplicate mapping keys (PyYAML keeps the last)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in mapping:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        mapping[key] = loader.construct_object(value_node, deep=True)
    return mapping


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_unique_mapping,
)


def parse_policy(text: str, *, source: str = "<string>") -> PolicyDocument:
    """
    Parse and validate a policy document.

    Raises:
        PolicyInvalid: The text is not a valid version-1 policy; the message says where.
    """
    if len(text.encode("utf-8")) > MAX_POLICY_BYTES:
        raise PolicyInvalid(f"{source}: the policy is over {MAX_POLICY_BYTES} bytes")
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
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
    rules: list[Rule] = []
    seen: set[str] = set()
    for entry in raw["rules"]:
        if entry["id"] in seen:
            raise PolicyInvalid(f"{source}: two rules have the id {entry['id']!r}")
        seen.add(entry["id"])
        rules.append(
            Rule(
                id=RuleId(entry["id"]),
                effect=entry["effect"],
                roles=frozenset(entry.get("roles", ())),
                principals=frozenset(entry.get("principals", ())),
                tools=frozenset(entry["tools"]),
            )
        )
    principals = {
        name: frozenset(settings.get("roles", ()))
        for name, settings in (raw.get("principals") or {}).items()
    }
    tool_limits = {
        name: dict(settings.get("limits", {}))
        for name, settings in (raw.get("tools") or {}).items()
    }
    document = PolicyDocument(
        rules=tuple(rules),
        principal_roles=principals,
        tool_limits=tool_limits,
        digest=canonical_sha256(raw, domain=POLICY_DIGEST_DOMAIN),
        source=source,
    )
    for tool in tool_limits:
        try:
            document.limits_for(tool, ResourceLimits())
        except ValueError as exc:
            raise PolicyInvalid(f"{source}: limits of tool {tool!r}: {exc}") from exc
    return document


def load_policy(path: Path) -> PolicyDocument:
    """
    Load a policy file.

    Raises:
        PolicyInvalid: The file is missing, unreadable or invalid.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyInvalid(f"policy file {path} cannot be read ({type(exc).__name__})") from exc
    return parse_policy(text, source=str(path))
