"""
Cedar policies as lint reasons about them: scopes, conditions, and what covers what.

A policy becomes a ``Shape``: its principal and resource constraints, each a
disjunction of scopes that must all hold, and its other conditions as
canonical JSON. Lint compares shapes to find permits a forbid always
overrides; each comparison says yes only where it can tell, and a scope it
cannot compare does not cover.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from callward.policies._document import PolicyDocument


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
class Shape:
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


def shape_of(summary: Mapping[str, Any]) -> Shape:
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
    return Shape(str(summary["rule_id"]), str(summary["effect"]), tuple(principal),
                  tuple(resource), frozenset(others), never, calls)


def constraints_cover(wide: tuple[tuple[Mapping[str, Any], ...], ...],
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


def contradicted(conditions: frozenset[str], others: frozenset[str]) -> bool:
    """Whether one of ``conditions`` is the negation of one of ``others``."""
    return any(_negations(condition) & others for condition in conditions)


_RESOURCE_LABELS: Final = {".": {"left": {"Var": "resource"}, "attr": "labels"}}


def pinned_tools(shape: Shape) -> frozenset[str] | None:
    """The tools a policy's resource constraints limit it to, or None when unlimited."""
    pinned: frozenset[str] | None = None
    for alternatives in shape.resource:
        # A tool has no parents, so ``in Tool::"x"`` is ``== Tool::"x"``.
        if all(a.get("op") in {"==", "in"} and a.get("entity", {}).get("type") == "Tool"
               for a in alternatives):
            names = frozenset(str(a["entity"].get("id")) for a in alternatives)
            pinned = names if pinned is None else pinned & names
    return pinned


def settle_labels(conditions: frozenset[str], tools: frozenset[str] | None,
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
