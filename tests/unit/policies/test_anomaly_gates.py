"""
Policy gates on open anomalies: deny, or require approval, while an anomaly is
open for the caller; fail closed when the anomaly state cannot be read.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from callward.audit import FileSigner, SQLiteAuditStore
from callward.core import CallContext, Execution, PolicyInvalid, Sha256Hex, ToolCall, Usage
from callward.core._canonical import canonical_bytes
from callward.core.gateway import Gateway
from callward.core.observe._anomaly import AnomalyDetector, resolve
from callward.policies import Policy, PolicyState
from callward.policies._anomaly_state import Anomaly, AnomalyState
from callward.policies._cases import run_cases
from callward.policies._replay import replay

NOW = 1_800_000_000.0
ARGS = {"order_id": "A-1", "amount_cents": 4999}
BASE = """
version: 1
default: deny
principals:
  sam: {roles: [support]}
  lena: {roles: [security]}
rules:
  - {id: support-refunds, effect: allow, roles: [support], tools: [refund, read_file]}
"""
APPROVAL_GATE = BASE + """
anomalies:
  - {id: hold-anomalous, effect: approval, tools: [refund], metrics: [call_rate, denial_ratio],
     approvers: {roles: [security]}}
"""
DENY_GATE = BASE + """
anomalies:
  - {id: stop-anomalous, effect: deny, tools: [refund], roles: [support]}
"""


class Clock:
    now = NOW

    def __call__(self) -> float:
        return self.now


@pytest.fixture(name="anomalies")
def _anomalies(tmp_path: Path):
    state = AnomalyState(tmp_path / "anomaly-state.db")
    yield state
    state.close()


def open_anomaly(state: AnomalyState, metric: str = "call_rate", principal: str = "sam"
                 ) -> Anomaly:
    anomaly = Anomaly(id=f"anm_{metric}", principal=principal, tool="refund",
                      metric=metric,  # type: ignore[arg-type]
                      evidence={"observed": 200}, detected_at=NOW - 5, last_seen=NOW - 5)
    state.add(anomaly)
    return anomaly


def make_policy(text: str, tmp_path: Path, anomalies: AnomalyState | None,
                clock: Clock | None = None) -> Policy:
    return Policy.from_text(text, state=PolicyState(tmp_path / "policy-state.db"),
                            signer=FileSigner.load_or_create(tmp_path / "keys"),
                            clock=clock or Clock(), anomalies=anomalies)


def refund(policy: Policy, registry, principal: str = "sam", name: str = "refund"):
    call = ToolCall.create(id="c1", name=name, arguments=ARGS if name == "refund"
                           else {"path": "/workspace/a"}, dialect="api")
    return policy.decide(call, registry.get(name), CallContext(principal))


class TestApprovalGate:
    def test_open_anomaly_requires_approval(self, registry, anomalies, tmp_path):
        """While a call_rate anomaly is open, the principal's refunds need approval."""
        anomaly = open_anomaly(anomalies)
        policy = make_policy(APPROVAL_GATE, tmp_path, anomalies)

        decision = refund(policy, registry)

        assert ("deny", "approval_required") == (decision.effect, decision.kind)
        assert ("hold-anomalous", f"anomaly.{anomaly.id}") == decision.reasons[:2]

    def test_without_an_open_anomaly_the_call_is_allowed(self, registry, anomalies, tmp_path):
        """No anomaly (or one of a metric the gate does not name): allowed as usual."""
        open_anomaly(anomalies, metric="first_use")
        policy = make_policy(APPROVAL_GATE, tmp_path, anomalies)

        assert "allow" == refund(policy, registry).effect

    def test_resolved_anomaly_no_longer_holds(self, registry, anomalies, tmp_path):
        """Once resolved (audited), the same call is allowed again."""
        anomaly = open_anomaly(anomalies)
        policy = make_policy(APPROVAL_GATE, tmp_path, anomalies)
        store = SQLiteAuditStore(tmp_path / "audit.db",
                                 FileSigner.load_or_create(tmp_path / "keys"))
        store.open()
        try:
            resolve(anomalies, store, anomaly.id, by="lena", now=NOW)
        finally:
            store.close()

        assert "allow" == refund(policy, registry).effect

    def test_approver_can_approve_the_held_call(self, registry, anomalies, tmp_path):
        """The gate's approvers approve the proposal; the same call then runs once."""
        open_anomaly(anomalies)
        policy = make_policy(APPROVAL_GATE, tmp_path, anomalies)
        proposal = refund(policy, registry).reasons[-1].removeprefix("proposal.")

        policy.approve(proposal, by="lena")

        assert "allow" == refund(policy, registry).effect
        assert "approval_required" == refund(policy, registry).kind

    def test_quiet_anomaly_no_longer_counts(self, registry, anomalies, tmp_path):
        """An anomaly not seen for the quiet period does not hold calls."""
        state = AnomalyState(tmp_path / "quiet.db", quiet_seconds=1)
        open_anomaly(state)
        policy = make_policy(APPROVAL_GATE, tmp_path, state)

        assert "allow" == refund(policy, registry).effect
        state.close()


class TestDenyGate:
    def test_open_anomaly_denies(self, registry, anomalies, tmp_path):
        """effect: deny turns the call down as permission, naming the anomaly."""
        anomaly = open_anomaly(anomalies, metric="first_use")
        decision = refund(make_policy(DENY_GATE, tmp_path, anomalies), registry)

        assert ("permission", ("stop-anomalous", f"anomaly.{anomaly.id}")) == (
            decision.kind, decision.reasons)

    def test_other_principals_and_tools_are_not_held(self, registry, anomalies, tmp_path):
        """Only the principal with the anomaly, and only the tools the gate names."""
        open_anomaly(anomalies, principal="someone-else")
        policy = make_policy(DENY_GATE, tmp_path, anomalies)
        allowed_while_others_are_held = refund(policy, registry).effect
        open_anomaly(anomalies, metric="result_size")

        assert "allow" == allowed_while_others_are_held
        assert "allow" == refund(policy, registry, name="read_file").effect


class TestFailClosed:
    def test_unreadable_state_denies_when_a_gate_applies(self, registry, tmp_path):
        """The anomaly state cannot be read: a call a gate covers is denied."""
        (tmp_path / "dir.db").mkdir()
        policy = make_policy(APPROVAL_GATE, tmp_path, AnomalyState(tmp_path / "dir.db"))

        decision = refund(policy, registry)

        assert ("deny", "anomaly.state-unavailable") == (decision.effect, decision.reasons[0])

    def test_unreadable_state_does_not_touch_calls_no_gate_covers(self, registry, tmp_path):
        """A tool no gate names does not depend on the anomaly state."""
        (tmp_path / "dir.db").mkdir()
        policy = make_policy(APPROVAL_GATE, tmp_path, AnomalyState(tmp_path / "dir.db"))

        assert "allow" == refund(policy, registry, name="read_file").effect

    def test_no_anomaly_state_configured_denies(self, registry, tmp_path):
        """A gate with no state to read is a gate that cannot prove allow."""
        decision = refund(make_policy(DENY_GATE, tmp_path, None), registry)

        assert ("permission", "anomaly.state-unavailable") == (decision.kind,
                                                               decision.reasons[0])


class TestDocument:
    @pytest.mark.parametrize("gate", [
        "{id: g, effect: approval, tools: [refund]}",
        "{id: g, effect: deny, approvers: {roles: [x]}}",
        "{id: g, effect: deny, metrics: [cpu]}",
        "{id: g, effect: maybe}",
    ])
    def test_invalid_gates_are_refused(self, gate):
        """approval needs approvers, deny takes none, metrics and effects are closed sets."""
        with pytest.raises(PolicyInvalid):
            Policy.from_text(BASE + f"anomalies:\n  - {gate}\n")


class RefundRunner:
    @property
    def image_digest(self) -> Sha256Hex:
        return Sha256Hex("ab" * 32)

    def run(self, spec, call, limits) -> Execution:
        return Execution("ok", canonical_bytes({"refunded": True}), "", Usage(1.0, 0, 16))


class TestThroughTheGateway:
    def test_burst_opens_an_anomaly_then_calls_need_approval(self, registry, anomalies,
                                                             tmp_path):
        """Spaced calls, then a burst: anomaly.detected, and the next call is held."""
        clock = Clock()
        store = SQLiteAuditStore(tmp_path / "audit.db",
                                 FileSigner.load_or_create(tmp_path / "keys"))
        store.open()
        policy = make_policy(APPROVAL_GATE, tmp_path, anomalies, clock)
        detector = AnomalyDetector(anomalies, store, clock=clock)
        gateway = Gateway(registry=registry, policy=policy, runner=RefundRunner(), audit=store,
                          observers=(detector,))
        try:
            for gap in [4.0, 2.5, 3.5] * 40 + [0.01] * 60:
                clock.now += gap
                result = gateway.handle(ToolCall.create(id="c", name="refund", arguments=ARGS,
                                                        dialect="api"), principal="sam")
            kinds = [r.kind for r in store.records()]
        finally:
            store.close()

        assert "approval_required" == result.kind
        assert 1 == kinds.count("anomaly.detected")
        assert "call.denied" == kinds[-1]


def authorized(call_id: str, ts: str) -> tuple[str, str, dict[str, object]]:
    return ("call.authorized", ts, {
        "call": {"id": call_id, "name": "refund", "arguments": ARGS}, "principal": "sam",
        "session_id": "", "decision": {"effect": "allow", "kind": None,
                                       "reasons": ["support-refunds"]}})


class TestAuthoring:
    def test_replay_opens_anomalies_from_the_log(self, registry, tmp_path):
        """Replay holds exactly the calls made between anomaly.detected and anomaly.resolved."""
        candidate = tmp_path / "candidate.yaml"
        candidate.write_text(DENY_GATE, encoding="utf-8")
        records = [
            authorized("before", "2027-01-01T00:00:00.000000Z"),
            ("anomaly.detected", "2027-01-01T00:01:00.000000Z",
             {"anomaly_id": "anm_1", "principal": "sam", "tool": "refund",
              "metric": "call_rate"}),
            authorized("during", "2027-01-01T00:02:00.000000Z"),
            ("anomaly.resolved", "2027-01-01T00:03:00.000000Z",
             {"anomaly_id": "anm_1", "by": "lena"}),
            authorized("after", "2027-01-01T00:04:00.000000Z"),
        ]

        report = replay(records, candidate, registry).to_json()

        assert (3, 2, 1) == (report["calls"], report["unchanged"], report["allow_to_deny"])
        assert ["during"] == [e["call_id"] for e in report["examples"]["allow_to_deny"]]

    def test_policy_test_cases_run_with_no_anomaly_open(self, registry, tmp_path):
        """`policy test` decides with no open anomaly, so a gate does not deny every case."""
        path = tmp_path / "policy.yaml"
        path.write_text(APPROVAL_GATE, encoding="utf-8")

        (result,) = run_cases(path, registry, [{
            "principal": "sam", "call": {"name": "refund", "arguments": ARGS},
            "expect": {"effect": "allow"}}])

        assert result.passed, result.why
