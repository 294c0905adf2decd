"""
Policy test cases: decide a file of cases against a policy and say why each one failed.

``run_cases`` decides the cases in order on a fresh in-memory state, with a
clock that moves only when a case says so (``advance_seconds``), so rate
limits, approvals and data-flow labels carry from one case to the next. A
malformed case fails and says why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from callward.core import (
    CallContext,
    Decision,
    JSONValue,
    PolicyInvalid,
    ToolCall,
    ToolRegistry,
    canonical_bytes,
)
from callward.core._canonical import CanonicalizationError
from callward.policies._anomaly_state import AnomalyState
from callward.policies._evaluator import Policy
from callward.policies._loader import load_policy
from callward.policies._state import PolicyState


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
class ManualClock:
    """A clock that tells the time it is set to: a case, or a replayed record, moves it."""

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
    clock = ManualClock()
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
