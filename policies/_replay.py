"""
Replay: what a candidate policy would have decided on a recorded audit log.

``replay`` re-decides every call of an audit log under a candidate policy and
reports what would change. It takes the records as plain data, so this
package never reads the audit store itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from callward.core import (
    CallContext,
    Decision,
    Identity,
    JSONValue,
    Provenance,
    ToolCall,
    ToolRegistry,
    ToolSpec,
    canonical_bytes,
)
from callward.core._canonical import CanonicalizationError
from callward.policies._anomaly_state import ANOMALY_METRICS, Anomaly, AnomalyState
from callward.policies._cases import ManualClock
from callward.policies._evaluator import Policy
from callward.policies._loader import load_policy
from callward.policies._state import PolicyState

MAX_EXAMPLES: Final = 5
#: In a replay an anomaly is open until its ``anomaly.resolved`` record.
_NEVER_QUIET_SECONDS: Final = 1e12


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
    clock = ManualClock()
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
    # A token's roles and groups replay too (the document's are the candidate's own).
    identity = body.get("identity")
    return call, CallContext(str(body["principal"]), str(body.get("session_id", "")),
                             None if provenance is None else Provenance.from_json(provenance),
                             None if identity is None else Identity.from_json(identity))


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
