"""
Approvals bound to the exact call: signed, single-use, expiring.

The lifecycle: a decision that needs an approval records a proposal and
denies (``approval_required``, naming ``proposal.<id>``); an approver the
rule names approves or rejects it (``Approvals.settle``, audited as
``approval.granted``, ``approval.denied`` or ``approval.refused``); the same
call, decided again, runs on the approval once, and the commit of that
decision marks it used (``callward.policies._effects``).

An approval is the Ed25519 signature (by the gateway's audit key, handed in
through ``ApprovalSigner``) over the canonical bytes of
``{proposal, principal, tool, tool_digest, arguments_sha256, approved_by,
approved_at, expires_at}``. It is valid only for a call by the same principal
to the same tool version with arguments of the same canonical digest, only
before it expires, and only once; its signature is checked against the
signer's public key every time it is used. Nobody approves their own call,
and a rule whose approvers are anyone can never be approved.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from callward.core import (
    CallContext,
    JSONValue,
    PolicyDenied,
    RuleId,
    ToolCall,
    ToolSpec,
    canonical_bytes,
)
from callward.core.errors import StateUnavailable
from callward.core.protocols import AuditLog
from callward.policies._document import PolicyDocument
from callward.policies._effects import Pending
from callward.policies._state import PolicyStateStore, Proposal
from callward.policies._trace import STATE_RULE, Check, CheckRecord

APPROVAL_DOMAIN: Final = b"callward.approval.v1\x00"


class ApprovalSigner(Protocol):
    """What signs approvals: the audit signer satisfies it (``callward.audit.FileSigner``)."""

    @property
    def key_id(self) -> str: ...

    def sign(self, data: bytes) -> bytes: ...

    def public_key_pem(self) -> bytes: ...


class ApprovalRefused(PolicyDenied):
    """An approval could not be recorded: unknown, closed or expired proposal, or wrong approver."""

    def __init__(self, message: str, *, rule: str) -> None:
        super().__init__(message, kind="approval_required", rule=rule,
                         remediation="check the proposal id and who may approve it")


def approval_payload(proposal: Proposal, *, by: str, at: float) -> bytes:
    """The bytes an approval signs (domain-separated canonical JSON)."""
    body: dict[str, JSONValue] = {
        "proposal": proposal.id,
        "principal": proposal.principal,
        "tool": proposal.tool,
        "tool_digest": proposal.tool_digest,
        "arguments_sha256": proposal.arguments_sha256,
        "approved_by": by,
        "approved_at": round(at, 3),
        "expires_at": round(proposal.expires, 3),
    }
    return APPROVAL_DOMAIN + canonical_bytes(body)


def signature_valid(signer: ApprovalSigner, proposal: Proposal) -> bool:
    """Whether a stored approval is signed by ``signer``'s key and matches its proposal."""
    if proposal.approval is None or proposal.signature is None or proposal.key_id != signer.key_id:
        return False
    key = load_pem_public_key(signer.public_key_pem())
    if not isinstance(key, Ed25519PublicKey):
        return False
    try:
        key.verify(bytes(proposal.signature), bytes(proposal.approval))
    except InvalidSignature:
        return False
    expected = approval_payload(proposal, by=proposal.decided_by or "", at=0.0)
    # Everything but approved_at must match the proposal row it is stored with.
    return _without_time(bytes(proposal.approval)) == _without_time(expected)


def _without_time(payload: bytes) -> bytes:
    import json  # noqa: PLC0415 - only on the approval path

    body = json.loads(payload[len(APPROVAL_DOMAIN):])
    body.pop("approved_at", None)
    return canonical_bytes(body)


class Approvals:
    """
    The approval lifecycle of one policy, over its state.

    Args:
        document: The document in force now (it changes on reload).
        signer: Signs and verifies approvals; without one no approval is ever valid.
        clock: Seconds since the epoch.
        new_proposal_id: A fresh proposal id.
    """

    def __init__(self, state: PolicyStateStore, *, document: Callable[[], PolicyDocument],
                 signer: ApprovalSigner | None, clock: Callable[[], float],
                 new_proposal_id: Callable[[], str]) -> None:
        self._state = state
        self._document = document
        self._signer = signer
        self._clock = clock
        self._new_proposal_id = new_proposal_id

    def check(self, document: PolicyDocument, call: ToolCall, spec: ToolSpec, *,
              context: CallContext, pending: Pending, record: CheckRecord,
              now: float, commit: bool) -> None:
        """
        Pass on a valid approval of this exact call (``pending.approval``, used at the
        commit), or deny and name the proposal it records when ``commit``.
        """
        roles = document.caller_roles(context)
        groups = document.caller_groups(context)
        rules = [rule for rule in document.approvals
                 if (spec.name in rule.tools or "*" in rule.tools)
                 and rule.who.matches(context.principal, roles, groups)]
        held: tuple[RuleId, ...] = ()
        if pending.anomaly_approval is not None:
            # An open anomaly asks for approval first; the gate's rule names the approvers.
            rule_of_gate, held = pending.anomaly_approval
            rules.insert(0, rule_of_gate)
        if not rules:
            return
        rule = rules[0]
        digest = call.arguments_sha256
        try:
            approved = self._state.approved_for(context.principal, spec.name, digest, now)
            if approved is not None and approved.tool_digest == spec.digest and (
                self._signer is not None and signature_valid(self._signer, approved)
            ):
                pending.approval = approved
                record.add("approval_required", Check("approval", True, (rule.id,),
                                                      f"approved by {approved.decided_by}"))
                return
            proposal = Proposal(
                id=self._new_proposal_id(), rule_id=rule.id, call_id=call.id,
                principal=context.principal, session=context.session_id, tool=spec.name,
                tool_digest=spec.digest, arguments_sha256=digest, created=now,
                expires=now + rule.expires_seconds, status="proposed", decided_by=None,
                approval=None, signature=None, key_id=None, used_call_id=None)
            if commit:
                proposal = self._state.propose(proposal)
            expired = self._state.expired_approval(context.principal, spec.name, digest, now)
        except StateUnavailable:
            record.add("approval_required", Check("approval", False, (STATE_RULE,),
                                                  "policy state unavailable"))
            return
        # An approval that expired unused is named, so the log shows that lifecycle too.
        lapsed = () if expired is None else (RuleId(f"approval-expired.{expired}"),)
        record.add("approval_required", Check(
            "approval", False, (rule.id, *held, *lapsed, RuleId(f"proposal.{proposal.id}")),
            f"this call needs an approval: proposal {proposal.id}"))

    def settle(self, proposal_id: str, *, by: str, approve: bool, audit: AuditLog | None
               ) -> Proposal:
        """
        Approve (signed) or reject one proposal, and audit what happened.

        Raises:
            ApprovalRefused: Unknown, closed or expired proposal; an approver the
                rule does not name; the proposer approving their own call; no signer.
        """
        try:
            proposal = self._settle_unaudited(proposal_id, by=by, approve=approve)
        except ApprovalRefused as exc:
            if audit is not None:
                audit.append("approval.refused", {
                    "proposal": proposal_id[:128], "by": by[:256],
                    "action": "approve" if approve else "reject", "rule": exc.rule,
                    "message": exc.message, "policy_digest": self._document().digest})
            raise
        if audit is not None:
            audit.append("approval.granted" if approve else "approval.denied",
                         approval_record(proposal, self._document().digest))
        return proposal

    def _settle_unaudited(self, proposal_id: str, *, by: str, approve: bool) -> Proposal:
        proposal, rule_id = self._approvable(proposal_id, by)
        now = self._clock()
        payload = signature = key_id = None
        if approve:
            if self._signer is None:
                raise ApprovalRefused("no signer is configured, so no approval can be "
                                      "recorded", rule=rule_id)
            payload = approval_payload(proposal, by=by, at=now)
            signature = self._signer.sign(payload)
            key_id = self._signer.key_id
        if not self._state.decide_proposal(proposal_id, status="approved" if approve
                                           else "rejected", by=by, now=now, approval=payload,
                                           signature=signature, key_id=key_id):
            raise ApprovalRefused("the proposal is no longer open", rule=rule_id)
        settled = self._state.proposal(proposal_id)
        if settled is None:
            raise StateUnavailable("the proposal just written cannot be read back")
        return settled

    def _approvable(self, proposal_id: str, by: str) -> tuple[Proposal, str]:
        proposal = self._state.proposal(proposal_id)
        if proposal is None:
            raise ApprovalRefused("no proposal has that id", rule="approval.unknown")
        status = proposal.status_at(self._clock())
        if status != "proposed":
            raise ApprovalRefused(f"the proposal is {status}", rule=proposal.rule_id)
        document = self._document()
        rule = next((r for r in document.approval_rules if r.id == proposal.rule_id), None)
        if rule is None:
            raise ApprovalRefused("the rule that asked for approval is no longer in the policy",
                                  rule=proposal.rule_id)
        if by == proposal.principal:
            raise ApprovalRefused("a principal cannot approve their own call",
                                  rule=proposal.rule_id)
        if rule.approvers.anyone or not rule.approvers.matches(
            by, document.roles_of(by), document.groups_of(by)
        ):
            raise ApprovalRefused("that principal may not approve this call",
                                  rule=proposal.rule_id)
        return proposal, proposal.rule_id


def approval_record(proposal: Proposal, policy_digest: str) -> dict[str, JSONValue]:
    """The body of an ``approval.granted``/``approval.denied`` audit record."""
    body: dict[str, JSONValue] = {
        "proposal": proposal.id, "status": proposal.status, "rule": proposal.rule_id,
        "call_id": proposal.call_id, "principal": proposal.principal, "tool": proposal.tool,
        "tool_digest": proposal.tool_digest, "arguments_sha256": proposal.arguments_sha256,
        "by": proposal.decided_by, "expires": proposal.expires, "policy_digest": policy_digest,
    }
    if proposal.signature is not None:
        body["signature"] = bytes(proposal.signature).hex()
        body["key_id"] = proposal.key_id
    return body
