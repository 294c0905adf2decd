"""
The side effects of a decision: rate-limit tokens taken and an approval used.

They are gathered in a ``Pending`` while the checks run and committed only
when every check passed and the decision is enforced (``explain`` and a
shadow policy never commit). Checking and charging the rate limits is one
write transaction per decision; when an approval may apply (or nothing will
be committed), the limits are checked read-only first, so a call over its
limit never opens a proposal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from callward.core import CallContext, RuleId, ToolCall, ToolSpec, canonical_bytes
from callward.core.errors import StateUnavailable
from callward.policies._document import ApprovalRule, PolicyDocument
from callward.policies._state import PolicyStateStore, Proposal, RateCharge
from callward.policies._trace import STATE_RULE, Check, CheckRecord


@dataclass(slots=True)
class Pending:
    """Side effects a decision takes only if it allows."""

    charges: list[RateCharge] = field(default_factory=list)
    approval: Proposal | None = None
    checked: bool = False
    #: An anomaly gate that asks for approval, and the open anomalies behind it.
    anomaly_approval: tuple[ApprovalRule, tuple[RuleId, ...]] | None = None


def rate_limit_check(state: PolicyStateStore, document: PolicyDocument, spec: ToolSpec,
                     *, context: CallContext, labels: frozenset[str], pending: Pending,
                     record: CheckRecord, now: float, commit: bool) -> None:
    """Gather the charges of every rate limit that applies; check them unless ``commit`` will."""
    roles = document.caller_roles(context)
    groups = document.caller_groups(context)
    for limit in document.rate_limits:
        if not limit.applies(context.principal, roles, groups, spec.name, labels):
            continue
        parts = {"principal": context.principal, "tool": spec.name,
                 "session": context.session_id}
        # Canonical JSON, so no principal or session id can forge another's key.
        key = canonical_bytes([limit.id, *([p, parts[p]] for p in limit.per)]).decode()
        pending.charges.append(RateCharge(limit.id, key, limit.algorithm, limit.limit,
                                          limit.window_seconds))
    approvals_apply = any(spec.name in r.tools or "*" in r.tools for r in document.approvals)
    if not pending.charges or (commit and not approvals_apply):
        # Checked and charged at once in commit_pending(): one write transaction per decision.
        return
    pending.checked = True
    try:
        exhausted = state.charge(pending.charges, now, commit=False)
    except StateUnavailable:
        record.add("rate_limit", Check("rate_limit", False, (STATE_RULE,),
                                       "policy state unavailable"))
        return
    if exhausted is not None:
        record.add("rate_limit", Check("rate_limit", False, (exhausted,),
                                       "the rate limit for this call is exhausted"))
    else:
        record.add("rate_limit", Check("rate_limit", True,
                                       tuple(c.rule for c in pending.charges)))


def commit_pending(state: PolicyStateStore, call: ToolCall, pending: Pending,
                   record: CheckRecord, now: float) -> None:
    """Use the approval and take the tokens; a failure here still turns the call down."""
    try:
        if pending.approval is not None and not state.use_approval(
            pending.approval.id, call.id, now
        ):
            record.add("approval_required", Check(
                "approval", False, (RuleId(f"proposal.{pending.approval.id}"),),
                "the approval was used or expired in the meantime"))
            return
        exhausted = state.charge(pending.charges, now)
    except StateUnavailable:
        record.add("rate_limit", Check("state", False, (STATE_RULE,),
                                       "policy state unavailable"))
        return
    if exhausted is not None:
        record.add("rate_limit", Check("rate_limit", False, (exhausted,),
                                       "the rate limit for this call is exhausted"))
    elif pending.charges and not pending.checked:
        record.add("rate_limit", Check("rate_limit", True,
                                       tuple(c.rule for c in pending.charges)))
