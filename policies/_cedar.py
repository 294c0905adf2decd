"""
Permissions in Cedar: the request callward builds from a call, and its answer.

The entity model, which ``callward policy lint`` also writes out as a Cedar
schema generated from the tool registry::

    Principal::"alice"   in Role::"analyst", Group::"emea"
    Action::"Call"
    Tool::"refund"       {labels: Set<String>}
    context              {arguments: {…this tool's validated arguments…},
                          session_id: String, session_labels: Set<String>,
                          time: {epoch_seconds: Long, hour_utc: Long, weekday_utc: Long}}

``context.arguments`` is typed per tool: ``callward policy lint`` validates each
policy against the schema of every tool it can apply to (``cedar_schema``).
JSON integers become Cedar ``Long``; other JSON numbers become ``decimal``
(four places), and a number ``decimal`` cannot hold is refused before Cedar
sees it. Cedar's implicit deny and ``forbid``-overrides-``permit`` are kept,
and one more rule closes Cedar's open door: a policy that errors during
evaluation is skipped by Cedar, so any evaluation error denies the call.

The policy set and the principals are parsed once per loaded document; a
tool's entity is added once per tool digest. A caller with an ``Identity`` (a
verified access token) is ``Principal::"<name>"`` with the document's roles and
groups for that name and the token's as parents; its entity set is built once
per (tool digest, name, roles, groups) and kept in a bounded cache. A caller
without one takes the unchanged path.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from threading import Lock
from typing import Any, Final

import cedarpy

from callward.core import Identity, JSONValue, PolicyInvalid, RuleId, ToolSpec
from callward.policies._document import PolicyDocument, Rule

ACTION: Final = {"type": "Action", "id": "Call"}
#: How many (tool, caller identity) entity sets are kept before the oldest is dropped.
_MAX_IDENTITY_ENTITIES: Final = 1024
_DECIMAL_MAX: Final = Decimal("922337203685477.5807")


class ContextError(ValueError):
    """An argument value has no faithful Cedar form; the call is denied, never coerced."""

    def __init__(self, json_path: str, reason: str) -> None:
        super().__init__(f"{reason} at {json_path}")
        self.json_path = json_path


def cedar_string(text: str) -> str:
    """A Cedar string literal; Cedar's escapes differ from JSON's."""
    out = ['"']
    for char in text:
        if char in {'"', "\\"}:
            out.append("\\" + char)
        elif char.isprintable() and char != "\x7f":
            out.append(char)
        else:
            out.append(f"\\u{{{ord(char):x}}}")
    out.append('"')
    return "".join(out)


def _who_condition(rule: Rule) -> str:
    names = rule.principals | rule.roles | rule.groups
    if "*" in names:
        return "true"
    parts = [f"principal == Principal::{cedar_string(p)}" for p in sorted(rule.principals)]
    parts += [f"principal in Role::{cedar_string(r)}" for r in sorted(rule.roles)]
    parts += [f"principal in Group::{cedar_string(g)}" for g in sorted(rule.groups)]
    return " || ".join(parts) or "false"


def compile_rules(rules: Iterable[Rule]) -> str:
    """The Cedar text of the document's simple rules, each with its rule id as ``@id``."""
    policies = []
    for rule in rules:
        effect = "permit" if rule.effect == "allow" else "forbid"
        what = (
            "true"
            if "*" in rule.tools
            else " || ".join(f"resource == Tool::{cedar_string(t)}" for t in sorted(rule.tools))
        )
        policies.append(
            f"@id({cedar_string(rule.id)})\n{effect} (principal, action == Action::\"Call\", "
            f"resource)\nwhen {{ ({_who_condition(rule)}) && ({what}) }};"
        )
    return "\n\n".join(policies)


def cedar_text(document: PolicyDocument) -> str:
    """Every Cedar policy the document holds, simple rules first."""
    parts = [compile_rules(document.rules)] if document.rules else []
    parts += [text for _, text in document.cedar_sources]
    return "\n\n".join(parts)


def _uid(kind: str, name: str) -> dict[str, str]:
    return {"type": kind, "id": name}


def principal_entities(document: PolicyDocument) -> list[dict[str, Any]]:
    entities: list[dict[str, Any]] = []
    roles: set[str] = set()
    groups: set[str] = set()
    for name in sorted(set(document.principal_roles) | set(document.principal_groups)):
        own_roles = document.roles_of(name)
        own_groups = document.groups_of(name)
        roles |= own_roles
        groups |= own_groups
        entities.append({
            "uid": _uid("Principal", name),
            "attrs": {},
            "parents": [_uid("Role", r) for r in sorted(own_roles)]
            + [_uid("Group", g) for g in sorted(own_groups)],
        })
    entities += [{"uid": _uid("Role", r), "attrs": {}, "parents": []} for r in sorted(roles)]
    entities += [{"uid": _uid("Group", g), "attrs": {}, "parents": []} for g in sorted(groups)]
    return entities


def _schema_type(schema: Any) -> str | None:
    if not isinstance(schema, Mapping):
        return None
    kind = schema.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        kind = kinds[0] if len(kinds) == 1 else None
    return kind if isinstance(kind, str) else None


def to_cedar(value: JSONValue, schema: Any, json_path: str = "$") -> Any:
    """
    The Cedar JSON form of one argument value, guided by its JSON Schema.

    Raises:
        ContextError: The value has no faithful Cedar form (a huge integer, a
            number ``decimal`` cannot hold).
    """
    if isinstance(value, bool | str):
        return value
    if value is None:
        raise ContextError(json_path, "null has no Cedar form")
    if isinstance(value, int) and _schema_type(schema) != "number":
        if not -(2**63) <= value < 2**63:
            raise ContextError(json_path, "an integer outside Cedar's 64-bit Long")
        return value
    if isinstance(value, (int, float)):
        try:
            number = Decimal(repr(value) if isinstance(value, float) else value)
        except InvalidOperation as exc:  # pragma: no cover - canonical JSON has finite numbers
            raise ContextError(json_path, "a number with no decimal form") from exc
        if not number.is_finite() or abs(number) > _DECIMAL_MAX:
            raise ContextError(json_path, "a number outside Cedar's decimal range")
        return {"__extn": {"fn": "decimal", "arg": f"{number.quantize(Decimal('0.0001')):f}"}}
    if isinstance(value, Mapping):
        properties = schema.get("properties", {}) if isinstance(schema, Mapping) else {}
        # Cedar has no null: a null attribute is absent (``has`` is false), never "".
        return {
            key: to_cedar(item, properties.get(key), f"{json_path}.{key}")
            for key, item in value.items()
            if item is not None
        }
    items = schema.get("items") if isinstance(schema, Mapping) else None
    return [to_cedar(item, items, f"{json_path}[{index}]") for index, item in enumerate(value)]


_SCALARS: Final[dict[str, dict[str, str]]] = {
    "string": {"type": "String"},
    "integer": {"type": "Long"},
    "number": {"type": "Extension", "name": "decimal"},
    "boolean": {"type": "Boolean"},
}


def _cedar_type(schema: Any) -> dict[str, Any] | None:
    kind = _schema_type(schema)
    if kind in _SCALARS:
        return dict(_SCALARS[kind])
    if kind == "array":
        element = _cedar_type(schema.get("items"))
        return None if element is None else {"type": "Set", "element": element}
    if kind == "object":
        return _record(schema)
    return None


def _nullable(schema: Any) -> bool:
    kind = schema.get("type") if isinstance(schema, Mapping) else None
    return isinstance(kind, list) and "null" in kind


def _record(schema: Mapping[str, Any]) -> dict[str, Any]:
    """
    A closed Cedar record of an object schema's typed properties.

    A property is required in Cedar when the schema requires it and it cannot be
    null (a null argument is absent from the Cedar context).
    """
    required = set(schema.get("required", ()))
    attributes = {}
    for name, sub in (schema.get("properties") or {}).items():
        cedar = _cedar_type(sub)
        if cedar is not None:
            attributes[name] = {**cedar, "required": name in required and not _nullable(sub)}
    return {"type": "Record", "attributes": attributes}


def _properties(spec: ToolSpec) -> Mapping[str, Any]:
    properties = spec.parameters.get("properties")
    return properties if isinstance(properties, Mapping) else {}


def argument_names(spec: ToolSpec) -> frozenset[str]:
    """The arguments a tool's JSON Schema declares."""
    return frozenset(_properties(spec))


def untyped_arguments(spec: ToolSpec) -> frozenset[str]:
    """The tool's arguments that have no Cedar type (a Cedar policy cannot read them)."""
    return frozenset(name for name, sub in _properties(spec).items() if _cedar_type(sub) is None)


def cedar_schema(spec: ToolSpec | None) -> dict[str, Any]:
    """
    The Cedar schema of ``Call`` on one tool: ``context.arguments`` is a closed
    record typed from that tool's own JSON Schema (required where the tool requires
    an argument). Cedar types a context per action, and every call is ``Call``, so
    lint validates each policy once per tool it can apply to, against that tool's
    schema. ``None`` gives the schema of a tool without arguments.
    """
    arguments = (_record(spec.parameters) if spec is not None
                 else {"type": "Record", "attributes": {}})
    string_set = {"type": "Set", "element": {"type": "String"}}
    long = {"type": "Long"}
    return {
        "": {
            "entityTypes": {
                "Principal": {"memberOfTypes": ["Role", "Group"]},
                "Role": {},
                "Group": {},
                "Tool": {"shape": {"type": "Record", "attributes": {"labels": string_set}}},
            },
            "actions": {
                "Call": {
                    "appliesTo": {
                        "principalTypes": ["Principal"],
                        "resourceTypes": ["Tool"],
                        "context": {
                            "type": "Record",
                            "attributes": {
                                "arguments": arguments,
                                "session_id": {"type": "String"},
                                "session_labels": string_set,
                                "time": {"type": "Record", "attributes": {
                                    "epoch_seconds": long, "hour_utc": long,
                                    "weekday_utc": long}},
                            },
                        },
                    }
                }
            },
        }
    }


@dataclass(frozen=True, slots=True)
class CedarAnswer:
    """What Cedar said, with the rule ids (``@id``) of the policies that decided."""

    allowed: bool
    permits: tuple[RuleId, ...]
    forbids: tuple[RuleId, ...]
    errors: tuple[str, ...]


class CedarPermissions:
    """
    The document's Cedar policy set, parsed once, and the principals' entities.

    Raises:
        PolicyInvalid: The Cedar text does not parse.
    """

    def __init__(self, document: PolicyDocument) -> None:
        text = cedar_text(document)
        try:
            self._policies = cedarpy.PolicySet.from_str(text)
            self._base = cedarpy.Entities.from_json_str(
                json.dumps(principal_entities(document))
            )
        except ValueError as exc:
            raise PolicyInvalid(f"{document.source}: the Cedar policies do not parse: "
                                f"{str(exc)[:500]}") from exc
        self.text = text
        self._effects, self.ids = _policy_ids(text)
        duplicates = {i for i in self.ids.values() if list(self.ids.values()).count(i) > 1}
        if duplicates:
            raise PolicyInvalid(f"{document.source}: two Cedar policies have the @id "
                                f"{sorted(duplicates)[0]!r}")
        self._document = document
        self._entities: dict[str, cedarpy.Entities] = {}
        self._callers: dict[tuple[str, str, frozenset[str], frozenset[str]],
                            cedarpy.Entities] = {}
        self._lock = Lock()

    def _tool_entity(self, spec: ToolSpec) -> dict[str, Any]:
        labels = sorted(self._document.labels_of(spec.name, spec.labels))
        return {"uid": _uid("Tool", spec.name), "attrs": {"labels": labels}, "parents": []}

    def _entities_for(self, spec: ToolSpec) -> cedarpy.Entities:
        entities = self._entities.get(spec.digest)
        if entities is None:
            entities = self._base.with_added_json_str(json.dumps([self._tool_entity(spec)]))
            with self._lock:
                self._entities[spec.digest] = entities
        return entities

    def _entities_of(self, spec: ToolSpec, principal: str,
                     identity: Identity | None) -> cedarpy.Entities:
        """
        The entities of a call by ``principal``: with an identity that carries roles or
        groups, the principal's parents are the document's and the identity's.
        """
        if identity is None or not (identity.roles or identity.groups):
            return self._entities_for(spec)
        key = (spec.digest, principal, identity.roles, identity.groups)
        entities = self._callers.get(key)
        if entities is not None:
            return entities
        document = self._document
        roles = document.roles_of(principal) | identity.roles
        groups = document.groups_of(principal) | identity.groups
        caller = {"uid": _uid("Principal", principal), "attrs": {},
                  "parents": [_uid("Role", r) for r in sorted(roles)]
                  + [_uid("Group", g) for g in sorted(groups)]}
        if principal in document.principal_roles or principal in document.principal_groups:
            # Listed in the document: its entity is in the base, so the set is built anew
            # with this one in its place (Cedar refuses a second entity of one uid).
            others = [entity for entity in principal_entities(document)
                      if entity["uid"] != caller["uid"]]
            entities = cedarpy.Entities.from_json_str(
                json.dumps([*others, caller, self._tool_entity(spec)]))
        else:
            entities = self._entities_for(spec).with_added_json_str(json.dumps([caller]))
        with self._lock:
            if len(self._callers) >= _MAX_IDENTITY_ENTITIES:
                self._callers.pop(next(iter(self._callers)))
            self._callers[key] = entities
        return entities

    def decide(
        self,
        *,
        principal: str,
        spec: ToolSpec,
        arguments: Mapping[str, JSONValue],
        session_id: str,
        session_labels: frozenset[str],
        now: float,
        identity: Identity | None = None,
    ) -> CedarAnswer:
        """
        Ask Cedar about one call (by ``principal``, with its token's ``identity``).

        Raises:
            ContextError: An argument has no Cedar form.
        """
        moment = time.gmtime(now)
        context = {
            "arguments": to_cedar(dict(arguments), spec.parameters),
            "session_id": session_id,
            "session_labels": sorted(session_labels),
            "time": {"epoch_seconds": int(now), "hour_utc": moment.tm_hour,
                     "weekday_utc": moment.tm_wday},
        }
        request = {
            "principal": _uid("Principal", principal),
            "action": ACTION,
            "resource": _uid("Tool", spec.name),
            "context": context,
        }
        result = cedarpy.is_authorized(request, self._policies,
                                       self._entities_of(spec, principal, identity))
        diagnostics = result.diagnostics
        reasons = diagnostics.reasons
        permits = tuple(self.ids[p] for p in reasons if self._effects.get(p) == "permit")
        forbids = tuple(self.ids[p] for p in reasons if self._effects.get(p) == "forbid")
        errors = tuple(str(e)[:300] for e in diagnostics.errors)
        return CedarAnswer(result.allowed and not errors, permits, forbids, errors)

    def may_discover(self, *, principal: str, spec: ToolSpec, now: float,
                     identity: Identity | None = None) -> bool:
        """
        Whether some call of this tool by this principal could be permitted, asked of
        Cedar without arguments: yes if a permit matched, or failed only because it
        needs an argument to decide; no if a forbid matched with no argument at all,
        or nothing permits.
        """
        moment = time.gmtime(now)
        request = {
            "principal": _uid("Principal", principal),
            "action": ACTION,
            "resource": _uid("Tool", spec.name),
            "context": {"arguments": {}, "session_id": "", "session_labels": [],
                        "time": {"epoch_seconds": int(now), "hour_utc": moment.tm_hour,
                                 "weekday_utc": moment.tm_wday}},
        }
        result = cedarpy.is_authorized(request, self._policies,
                                       self._entities_of(spec, principal, identity))
        diagnostics = result.diagnostics
        if any(self._effects.get(p) == "forbid" for p in diagnostics.reasons):
            return False
        if result.allowed:
            return True
        failed = {match.group(1) for error in diagnostics.errors
                  if (match := _FAILED_POLICY.search(str(error)))}
        return any(self._effects.get(p) == "permit" for p in failed)


_FAILED_POLICY: Final = re.compile(r"policy `([^`]+)`")


def _policy_ids(text: str) -> tuple[dict[str, str], dict[str, RuleId]]:
    """
    Each Cedar policy's effect and rule id, by Cedar's positional id.

    The rule id is its ``@id`` annotation, else ``cedar.policyN``.
    """
    effects: dict[str, str] = {}
    ids: dict[str, RuleId] = {}
    if not text.strip():
        return effects, ids
    policies = json.loads(cedarpy.policies_to_json_str(text))["staticPolicies"]
    for pid, policy in policies.items():
        effects[pid] = policy["effect"]
        ids[pid] = RuleId((policy.get("annotations") or {}).get("id") or f"cedar.{pid}")
    return effects, ids


def policy_summaries(text: str) -> list[dict[str, Any]]:
    """Every Cedar policy as its JSON form (EST) with ``rule_id``, for lint."""
    if not text.strip():
        return []
    policies = json.loads(cedarpy.policies_to_json_str(text))["staticPolicies"]
    _, ids = _policy_ids(text)
    return [{"rule_id": ids[pid], "cedar_id": pid, **policy} for pid, policy in policies.items()]

