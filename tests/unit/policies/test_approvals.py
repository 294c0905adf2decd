"""
Approvals bound to the exact call: signed with a real Ed25519 key, single-use,
expiring, only by a principal the rule names, and never by the proposer.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from callward.audit import FileSigner, SQLiteAuditStore, read_records
from callward.core import CallContext, Execution, Sha256Hex, ToolCall, Usage, canonical_bytes
from callward.core.gateway import Gateway
from callward.policies import ApprovalRefused, Policy, PolicyState

POLICY = """
version: 1
default: deny
principals:
  sam: {roles: [support]}
  lena: {roles: [lead]}
  ivo: {roles: [support]}
rules:
  - {id: support-refunds, effect: allow, roles: [support], tools: [refund]}
approvals:
  - {id: refunds-need-a-lead, tools: [refund], approvers: {roles: [lead]}, expires_seconds: 600}
"""
ARGS = {"order_id": "A-1", "amount_cents": 4999}


class Clock:
    now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(name="clock")
def _clock():
    return Clock()


@pytest.fixture(name="policy")
def _policy(tmp_path, clock):
    signer = FileSigner.load_or_create(tmp_path / "keys")
    return Policy.from_text(POLICY, state=PolicyState(tmp_path / "policy-state.db"),
                            signer=signer, clock=clock)


def refund(policy, registry, arguments=None, principal="sam", call_id="c1"):
    call = ToolCall.create(id=call_id, name="refund", arguments=arguments or ARGS, dialect="api")
    return policy.decide(call, registry.get("refund"), CallContext(principal))


def proposal_of(decision) -> str:
    return decision.reasons[-1].removeprefix("proposal.")


class TestApprovalLifecycle:
    def test_a_call_is_proposed_and_nothing_runs(self, policy, registry):
        """The first call is denied as approval_required and recorded as proposed."""
        decision = refund(policy, registry)

        assert ("approval_required", "refunds-need-a-lead") == (decision.kind,
                                                                decision.reasons[0])
        assert ["proposed"] == [p.status for p in policy.state.proposals()]

    def test_the_approved_call_runs_once(self, policy, registry):
        """Approved by a lead, the same call is allowed once, then asks again."""
        policy.approve(proposal_of(refund(policy, registry)), by="lena")

        first = refund(policy, registry, call_id="c2")
        second = refund(policy, registry, call_id="c3")

        assert "allow" == first.effect
        assert first.reasons[-1].startswith("approval.apr_")
        assert "approval_required" == second.kind
        assert "executed" == policy.state.proposals()[0].status

    def test_other_arguments_are_not_approved(self, policy, registry):
        """The approval binds the argument digest: one cent more is a new proposal."""
        policy.approve(proposal_of(refund(policy, registry)), by="lena")

        decision = refund(policy, registry, {**ARGS, "amount_cents": 5000})

        assert "approval_required" == decision.kind
        assert 2 == len(policy.state.proposals())

    def test_another_principal_cannot_use_it(self, policy, registry):
        """The approval binds the principal who proposed the call."""
        policy.approve(proposal_of(refund(policy, registry)), by="lena")

        assert "approval_required" == refund(policy, registry, principal="ivo").kind

    def test_an_expired_approval_is_not_used(self, policy, registry, clock):
        """Past its expiry an approval no longer allows the call; the denial names it."""
        policy.approve(proposal_of(refund(policy, registry)), by="lena")
        clock.now += 601

        decision = refund(policy, registry)

        assert "approval_required" == decision.kind
        assert decision.reasons[1].startswith("approval-expired.apr_")
        assert "expired" == policy.state.proposals()[0].status_at(clock.now)

    @pytest.mark.parametrize(("by", "message"), [
        ("ivo", "may not approve"),
        ("sam", "their own call"),
        ("nobody", "may not approve"),
    ])
    def test_only_named_approvers_may_approve(self, policy, registry, by, message):
        """A principal the rule does not name, or the proposer, cannot approve."""
        proposal = proposal_of(refund(policy, registry))

        with pytest.raises(ApprovalRefused, match=message):
            policy.approve(proposal, by=by)
        assert "approval_required" == refund(policy, registry).kind

    def test_a_decided_proposal_cannot_be_approved_again(self, policy, registry):
        """Approving twice, or approving a rejected proposal, is refused."""
        proposal = proposal_of(refund(policy, registry))
        policy.reject(proposal, by="lena")

        with pytest.raises(ApprovalRefused, match="rejected"):
            policy.approve(proposal, by="lena")
        assert "approval_required" == refund(policy, registry).kind

    def test_a_forged_approval_is_not_accepted(self, policy, registry, tmp_path):
        """An approval row whose bytes were changed in the state file fails its signature."""
        proposal = proposal_of(refund(policy, registry))
        policy.approve(proposal, by="lena")
        db = sqlite3.connect(tmp_path / "policy-state.db")
        db.execute("UPDATE proposals SET arguments_sha256 = ? WHERE id = ?",
                   ("0" * 64, proposal))
        db.execute("INSERT INTO proposals SELECT 'apr_forged', rule_id, call_id, principal, "
                   "session, tool, tool_digest, ?, created, expires, status, decided_by, "
                   "decided_at, approval, signature, key_id, used_at, used_call_id "
                   "FROM proposals WHERE id = ?",
                   (ToolCall.create(id="x", name="refund", arguments=ARGS,
                                    dialect="api").arguments_sha256, proposal))
        db.commit()
        db.close()

        assert "approval_required" == refund(policy, registry).kind

    def test_without_a_signer_nothing_can_be_approved(self, registry):
        """A policy with no signer refuses approvals: fail closed."""
        policy = Policy.from_text(POLICY)
        proposal = proposal_of(refund(policy, registry))

        with pytest.raises(ApprovalRefused, match="no signer"):
            policy.approve(proposal, by="lena")


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "callward.core.cli", "--home", str(home),
                           *args], capture_output=True, text=True, check=False)


class TestApproveCommand:
    def test_approve_and_refusal_are_audited(self, tmp_path, registry):
        """`policy approve` writes a signed approval.granted; a refused one approval.refused."""
        policy_path = tmp_path / "policy.yaml"
        policy_path.write_text(POLICY)
        live = Policy.from_file(policy_path, state=PolicyState(tmp_path / "policy-state.db"),
                                signer=FileSigner.load_or_create(tmp_path / "keys"))
        proposal = proposal_of(refund(live, registry))
        live.state.close()

        refused = cli(tmp_path, "policy", "approve", proposal, "--by", "ivo",
                      "--policy", str(policy_path))
        granted = cli(tmp_path, "policy", "approve", proposal, "--by", "lena",
                      "--policy", str(policy_path))
        kinds = [(r.kind, r.body.get("by")) for r in read_records(tmp_path / "audit.db")]

        assert (1, 0) == (refused.returncode, granted.returncode)
        assert [("approval.refused", "ivo"), ("approval.granted", "lena")] == kinds


class TestLifecycleInTheAuditLog:
    def test_proposed_approved_executed_completed(self, tmp_path, registry, policy):
        """The log shows the proposal, a refused and a granted approval, then the one run."""
        class StubRunner:
            image_digest = Sha256Hex("cd" * 32)

            def run(self, spec, call, limits):
                return Execution("ok", canonical_bytes("refunded"), "", Usage(1.0, 0, 8))

        store = SQLiteAuditStore(tmp_path / "audit.db",
                                 FileSigner.load_or_create(tmp_path / "keys"))
        store.open()
        gateway = Gateway(registry=registry, policy=policy, runner=StubRunner(), audit=store)

        def attempt(call_id):
            return gateway.handle(ToolCall.create(id=call_id, name="refund", arguments=ARGS,
                                                  dialect="api"), principal="sam")

        proposed = attempt("c1")
        with pytest.raises(ApprovalRefused):
            policy.approve(proposal_of(proposed.decision), by="ivo", audit=store)
        approval = policy.approve(proposal_of(proposed.decision), by="lena", audit=store)
        executed = attempt("c2")
        again = attempt("c3")
        records = [(r.kind, r.body.get("decision", {}).get("kind")) for r in store.records()]
        authorized = next(r for r in store.records() if r.kind == "call.authorized")
        store.close()

        assert ("approval_required", "ok", "approval_required") == (
            proposed.kind, executed.kind, again.kind)
        assert [("call.denied", "approval_required"), ("approval.refused", None),
                ("approval.granted", None), ("call.authorized", None),
                ("call.completed", None), ("call.denied", "approval_required")] == records
        assert f"approval.{approval.id}" in authorized.body["decision"]["reasons"]
        assert approval.arguments_sha256 == authorized.body["call"]["arguments_sha256"]
