"""
The policy evaluator: default deny, every decision explained.

Invariants:

- Whatever cannot prove "allow" denies: an unknown tool, a version or digest
  the policy does not pin, arguments that fail the schema or a constraint, a
  principal no permit names, a Cedar policy that errors, a labelled result
  that would flow where a rule forbids, a missing or spent approval, an
  exhausted rate limit, and any error inside a check (the policy state
  unreadable included, and the anomaly state when an ``anomalies`` gate
  applies to the call).
- A matching ``forbid`` (a ``deny`` rule) overrides every ``permit``.
- ``decide()`` evaluates the checks in pipeline order (unknown_tool, the
  version pin (kind ``permission``, rule ``tools.NAME.pin``), schema,
  constraint, permission, flow, anomaly, approval_required, rate_limit) and returns a
  ``Decision`` listing every rule that decided; its ``kind`` is the first
  failed check. Checks with side effects (a proposal recorded, an approval
  used, a rate-limit token taken) run only when every check before them
  passed. ``explain()`` runs the same checks without any side effect.
- The Cedar policy set is parsed once per loaded document. A reload swaps the
  whole compiled policy at once, or keeps the last good one.

Each step has a module of its own: the checks that change nothing
(``_checks``), data-flow labels (``_flows``), the side effects and their
commit (``_effects``), approvals (``_approvals``), the trace every check
writes to (``_trace``), result rules (``_results``) and reload (``_reload``).
This module runs them in order.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Final, Literal

import cedarpy
import structlog

from callward.core import (
    CallContext,
    Decision,
    Identity,
    JSONValue,
    PolicyDenied,
    RuleId,
    Sha256Hex,
    ToolCall,
    ToolSpec,
    canonical_bytes,
    sha256_hex,
)
from callward.core.errors import DenyKind, StateUnavailable
from callward.core.protocols import AuditLog
from callward.core.types import ResultTreatment
from callward.policies._anomaly_state import OpenAnomalies
from callward.policies._approvals import Approvals, ApprovalSigner
from callward.policies._checks import anomaly_check, input_checks, permission_check, pin_check
from callward.policies._document import PolicyDocument
from callward.policies._effects import Pending, commit_pending, rate_limit_check
from callward.policies._flows import Inflow, flow_check, inflows_of, inherited, labels_session_key
from callward.policies._loader import load_policy, parse_policy
from callward.policies._reload import (
    RELOAD_INTERVAL_SECONDS,
    Compiled,
    PolicyFile,
    ReloadResult,
    compile_policy,
)
from callward.policies._results import treat
from callward.policies._schema import SchemaCheck
from callward.policies._state import PolicyState, PolicyStateStore, Proposal
from callward.policies._trace import STATE_RULE, UNKNOWN_TOOL_RULE, Check, CheckRecord, Trace

log = structlog.get_logger()

Clock = Callable[[], float]
#: The Cedar context attribute that carries the session's labels (``_cedar``).
_SESSION_LABELS: Final = "session_labels"


def _proposal_id() -> str:
    return f"apr_{uuid.uuid4().hex[:20]}"


class Policy:
    """
    A loaded policy, ready to decide calls. Satisfies ``PolicyEngine``.

    Args:
        state: Where rate limits, session labels and approvals live (in memory if None).
        signer: Signs and verifies approvals; without one no approval is ever valid.
        clock: Seconds since the epoch (injected so tests can move time).
        path: The file the document came from, watched for hot reload.
        shadow: A candidate policy decided beside this one on every call, read-only
            (give it the same state, so it sees the same counters and labels); where
            it differs, ``decide_with_shadow`` says so for the gateway to audit
            (``policy.shadow_diverged``); it is never enforced.
        anomalies: The open anomalies, for the document's ``anomalies`` gates;
            without it a gate that applies denies (fail closed).

    Example::

        >>> policy = Policy.from_text('''
        ... version: 1
        ... default: deny
        ... rules: []
        ... ''')
        >>> len(policy.digest)
        64
    """

    def __init__(
        self,
        document: PolicyDocument,
        *,
        state: PolicyStateStore | None = None,
        signer: ApprovalSigner | None = None,
        clock: Clock = time.time,
        new_proposal_id: Callable[[], str] = _proposal_id,
        path: Path | None = None,
        shadow: Policy | None = None,
        anomalies: OpenAnomalies | None = None,
    ) -> None:
        self._compiled = compile_policy(document)
        self.anomalies = anomalies
        self._schema = SchemaCheck()
        self.state: PolicyStateStore = state if state is not None else PolicyState()
        self._clock = clock
        self._approvals = Approvals(self.state, document=lambda: self._compiled.document,
                                    signer=signer, clock=clock,
                                    new_proposal_id=new_proposal_id)
        self._file = PolicyFile(path, document)
        self._next_poll = 0.0
        self._reload_lock = threading.Lock()
        self.last_reload: ReloadResult | None = None
        self.shadow = shadow
        # Whether the compiled policy it names can use the session's labels.
        self._labels_used: tuple[Compiled, bool] | None = None

    @classmethod
    def from_file(cls, path: Path, **options: object) -> Policy:
        """
        Raises:
            PolicyInvalid: The file is missing or invalid; nothing is allowed in its place.
        """
        return cls(load_policy(path), path=path, **options)  # type: ignore[arg-type]

    @classmethod
    def from_text(cls, text: str, *, source: str = "<string>", **options: object) -> Policy:
        return cls(parse_policy(text, source=source), **options)  # type: ignore[arg-type]

    @property
    def digest(self) -> Sha256Hex:
        return self._compiled.document.digest

    @property
    def document(self) -> PolicyDocument:
        return self._compiled.document

    @property
    def cedar_text(self) -> str:
        return self._compiled.cedar.text

    # -- deciding -------------------------------------------------------------

    def may_discover(self, spec: ToolSpec, context: CallContext) -> bool:
        """
        Whether a listing of tools (MCP ``tools/list``, the agent's prompt) shows this
        tool to this caller: its permission rules, evaluated without arguments, could
        allow it. A hidden tool is still decided, and denied, when called by name. A
        Cedar evaluation that fails hides the tool (fail closed).
        """
        try:
            return self._compiled.cedar.may_discover(principal=context.principal, spec=spec,
                                                     now=self._clock(),
                                                     identity=context.identity)
        except Exception:  # noqa: BLE001 - a listing boundary: what cannot be shown allowed is hidden
            log.warning("tool_discovery_failed", tool=spec.name)
            return False

    def decide(self, call: ToolCall, spec: ToolSpec | None, context: CallContext) -> Decision:
        """Decide one call; never raises for anything about the call itself."""
        return self.decide_with_shadow(call, spec, context)[0]

    def decide_with_shadow(self, call: ToolCall, spec: ToolSpec | None, context: CallContext
                           ) -> tuple[Decision, dict[str, JSONValue] | None]:
        """
        Decide one call, and the shadow beside it when there is one.

        The shadow decides first, read-only, so both see the same counters and labels.

        Returns:
            The enforced decision, and the body of a ``policy.shadow_diverged`` record
            when the shadow decided otherwise (None when it agreed, failed or is absent).
        """
        candidate = None if self.shadow is None else self._shadow_decide(self.shadow, call,
                                                                         spec, context)
        decision = self._evaluate(call, spec, context, commit=True).decision
        if candidate is None or self.shadow is None:
            return decision, None
        if (candidate.effect, candidate.kind) == (decision.effect, decision.kind):
            return decision, None
        log.info("policy_shadow_differs", call_id=call.id, enforced=decision.effect,
                 shadow=candidate.effect)
        return decision, {
            "call_id": call.id, "principal": context.principal,
            "session_id": context.session_id, "tool": call.name[:256],
            "enforced": _summary(decision), "candidate": _summary(candidate),
            "enforced_digest": decision.policy_digest, "candidate_digest": self.shadow.digest,
        }

    @staticmethod
    def _shadow_decide(shadow: Policy, call: ToolCall, spec: ToolSpec | None,
                       context: CallContext) -> Decision | None:
        """The shadow's decision, read-only; None when it failed (which changes nothing)."""
        try:
            return shadow._evaluate(call, spec, context, commit=False).decision
        except Exception:  # the candidate is advisory: never let it touch the call
            log.exception("policy_shadow_failed", call_id=call.id)
            return None

    def explain(self, call: ToolCall, spec: ToolSpec | None, context: CallContext) -> Trace:
        """The full decision trace of a call, without recording or consuming anything."""
        return self._evaluate(call, spec, context, commit=False, full_trace=True)

    def enforce(self, call: ToolCall, spec: ToolSpec | None, context: CallContext) -> Decision:
        """
        Decide, and raise on a denial.

        Raises:
            PolicyDenied: The decision was deny; carries the kind, rule and JSON path.
        """
        decision = self.decide(call, spec, context)
        if decision.effect == "deny":
            kind: DenyKind = decision.kind if decision.kind is not None else "permission"
            raise PolicyDenied(decision.message, kind=kind, rule=decision.reasons[0],
                               json_path=decision.json_path)
        return decision

    def _uses_session_labels(self, compiled: Compiled) -> bool:
        """``_uses_session_labels`` of ``compiled``, worked out once per compiled policy."""
        known = self._labels_used
        if known is None or known[0] is not compiled:
            known = (compiled, _uses_session_labels(compiled))
            self._labels_used = known
        return known[1]

    def _evaluate(self, call: ToolCall, spec: ToolSpec | None, context: CallContext, *,
                  commit: bool, full_trace: bool = False) -> Trace:
        compiled = self._compiled
        document = compiled.document
        # A call names a tool, or one version of it (name@version).
        if spec is None or call.name not in {spec.name, spec.ref}:
            decision = Decision("deny", (UNKNOWN_TOOL_RULE,), document.digest,
                                kind="unknown_tool", message="no tool of that name is registered")
            return Trace(decision, (Check("unknown_tool", False, (UNKNOWN_TOOL_RULE,)),))
        record = CheckRecord()
        pin_check(document, spec, record)
        in_bounds = input_checks(self._schema, document, call, spec, record, context=context)
        now = self._clock()
        labels = document.labels_of(spec.name, spec.labels)
        inflows: tuple[Inflow, ...] | None = None
        session_labels: frozenset[str] = frozenset()
        # The session's labels are read when a flow rule or a Cedar policy can use them;
        # otherwise no answer depends on them (explain still reads them for its trace).
        needed = self._uses_session_labels(compiled)
        if needed or full_trace:
            try:
                session_labels = self.state.session_labels(labels_session_key(context))
                if document.flows:
                    inflows = inflows_of(self.state, context, session_labels)
            except StateUnavailable:
                session_labels = frozenset()
                if needed:
                    record.add("flow", Check("state", False, (STATE_RULE,),
                                             "policy state unreadable"))
        permits: tuple[RuleId, ...] = ()
        diagnostics: tuple[str, ...] = ()
        if in_bounds:
            permits, diagnostics = permission_check(
                compiled.cedar, call, spec, context=context, session_labels=session_labels,
                now=now, record=record)
        else:
            record.add_trace(Check("permission", False, (), "not evaluated: input out of bounds"))

        flow_check(document, labels, session_labels=session_labels, inflows=inflows,
                   context=context, record=record)

        pending = Pending()
        if document.anomaly_gates:
            anomaly_check(self.anomalies, document, spec, context=context, pending=pending,
                          record=record, now=now)
        if record.ok:
            rate_limit_check(self.state, document, spec, context=context, labels=labels,
                             pending=pending, record=record, now=now, commit=commit)
        if record.ok:
            self._approvals.check(document, call, spec, context=context, pending=pending,
                                  record=record, now=now, commit=commit)
        if record.ok and commit:
            commit_pending(self.state, call, pending, record, now)
        decision = record.decision(document, spec, permits, pending.approval, diagnostics)
        return Trace(decision, tuple(record.checks), tuple(sorted(labels)),
                     tuple(sorted(session_labels)))

    # -- results --------------------------------------------------------------

    def observe_result(self, call: ToolCall, spec: ToolSpec, context: CallContext,
                       content_json: bytes) -> ResultTreatment:
        """
        Apply the result rules to a result and record its labels in the session.

        Called by the gateway after the run and before ``call.completed`` is
        written. When the labels cannot be recorded, the result is withheld
        (``withheld_kind="flow"``): a later call could otherwise slip past a flow rule.
        """
        document = self._compiled.document
        labels = document.output_labels.get(spec.name, frozenset())
        rules = [rule for rule in document.results if rule.applies(spec.name)]
        provenance = context.provenance
        try:
            if provenance is not None:
                labels |= inherited(self.state, context, provenance) - document.declassifies.get(
                    spec.name, frozenset())
            self.state.add_session_labels(labels_session_key(context), labels, call.id,
                                          self._clock(),
                                          per_call=provenance is not None)
        except StateUnavailable:
            log.warning("policy_state_unavailable", call_id=call.id, stage="observe_result")
            return ResultTreatment(
                canonical_bytes({"error": "flow", "message":
                                 "the result's labels could not be recorded; it is withheld"}),
                labels=tuple(sorted(labels)), withheld_kind="flow")
        return treat(rules, content_json, labels)

    # -- upstream MCP resources and prompts -----------------------------------

    def mcp_content_rule(self, server: str, kind: Literal["resource", "prompt"], name: str,
                         principal: str, identity: Identity | None = None) -> RuleId | None:
        """
        The rule that enables one upstream resource (by URI) or prompt (by name) for
        ``principal`` (with its token's ``identity``), or None: resources and prompts are
        off unless a rule names them.
        """
        document = self._compiled.document
        context = CallContext(principal, identity=identity)
        roles, groups = document.caller_roles(context), document.caller_groups(context)
        for rule in document.mcp_content:
            if rule.enables(server, kind, name) and rule.who.matches(principal, roles, groups):
                return rule.id
        return None

    def treat_content(self, name: str, content_json: bytes) -> ResultTreatment:
        """
        The result rules applied to an upstream resource or prompt, as to the result of
        a tool named ``name`` (``<server>__resources`` or ``<server>__<prompt>``).
        """
        document = self._compiled.document
        return treat([rule for rule in document.results if rule.applies(name)], content_json,
                     frozenset())

    # -- approvals --------------------------------------------------------------

    def approve(self, proposal_id: str, *, by: str, audit: AuditLog | None = None
                ) -> Proposal:
        """
        Record a signed, single-use approval of one proposal.

        Args:
            audit: Where to record it: ``approval.granted``, or ``approval.refused``
                when refused (the gateway's ``audit`` for the API, the CLI's store).

        Raises:
            ApprovalRefused: Unknown, closed or expired proposal; an approver the
                rule does not name; the proposer approving their own call; no signer.
        """
        return self._approvals.settle(proposal_id, by=by, approve=True, audit=audit)

    def reject(self, proposal_id: str, *, by: str, audit: AuditLog | None = None
               ) -> Proposal:
        """
        Record that a proposal is denied (``approval.denied``); it can never run on it.

        Raises:
            ApprovalRefused: As for ``approve``.
        """
        return self._approvals.settle(proposal_id, by=by, approve=False, audit=audit)

    # -- reload -----------------------------------------------------------------

    def poll_reload(self) -> ReloadResult | None:
        """
        Reload when the policy file (or a Cedar file) changed; at most once a second.

        Returns:
            None when nothing changed; else what the reload did, for the gateway to audit.
        """
        if self._file.path is None:
            return None
        now = time.monotonic()
        if now < self._next_poll:
            return None
        self._next_poll = now + RELOAD_INTERVAL_SECONDS
        if not self._file.changed(self._compiled.document):
            return None
        return self.reload()

    def reload(self) -> ReloadResult:
        """Load the file again: swap it in whole, or keep the last good policy."""
        previous = self.digest
        with self._reload_lock:
            compiled, result = self._file.reload(previous)
            if compiled is not None:
                self._compiled = compiled
        self.last_reload = result
        return result


def _uses_session_labels(compiled: Compiled) -> bool:
    """
    Whether a decision under ``compiled`` can depend on the session's labels: it has a
    flow rule, or its Cedar text names the context attribute that carries them, in
    the text itself or in Cedar's own parse of it (which resolves escapes such as
    ``context["session\\u{5f}labels"]``). When in doubt (the parse fails): yes.
    """
    if compiled.document.flows:
        return True
    text = compiled.cedar.text
    if _SESSION_LABELS in text:
        return True
    if not text.strip():
        return False
    try:
        parsed = cedarpy.policies_to_json_str(text)
    except Exception:  # noqa: BLE001 - unsure: the labels are read
        return True
    return _SESSION_LABELS in parsed


def _summary(decision: Decision) -> dict[str, JSONValue]:
    return {"effect": decision.effect, "kind": decision.kind, "reasons": list(decision.reasons)}


def arguments_digest(arguments: dict[str, JSONValue]) -> Sha256Hex:
    """The digest an approval is bound to: SHA-256 of the canonical arguments."""
    return sha256_hex(canonical_bytes(arguments))
