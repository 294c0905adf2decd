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

Data-flow labels: a result carries its tool's ``output_labels``. A call whose
provenance is known (``CallContext.provenance``: a plan step, whose arguments
are literals or ``$ref`` values from earlier calls) is checked **per value**:
each argument carries the labels recorded for the result it came from, plus,
transitively, whatever that result inherited; its own result inherits them too
unless the tool ``declassifies`` them. Another call of the same session that
takes nothing from a labelled result is allowed. A source the policy never
recorded in the session is judged by the session's labels; literal arguments
carry the labels of every result the session saw without provenance (a model
that read it may have written the plan). A call without provenance (a
model-emitted call: nobody knows which earlier result the model copied from)
keeps the strict session rule: once any result of the session was labelled, no
call of that session may reach a sink the flow rule names.
"""

from __future__ import annotations

import os
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

import structlog

from callward.core import (
    CallContext,
    Decision,
    JSONValue,
    PolicyDenied,
    PolicyInvalid,
    RuleId,
    Sha256Hex,
    ToolCall,
    ToolSpec,
    canonical_bytes,
    sha256_hex,
)
from callward.core._canonical import MAX_JSON_BYTES, canonical_loads, check_json_bounds
from callward.core.errors import DenyKind
from callward.core.protocols import AuditLog
from callward.core.types import Provenance, ResultTreatment
from callward.policies._anomaly_state import AnomalyStateUnavailable, OpenAnomalies
from callward.policies._approvals import (
    ApprovalRefused,
    ApprovalSigner,
    approval_payload,
    signature_valid,
)
from callward.policies._cedar import CedarPermissions, ContextError
from callward.policies._constraints import confinement_violation
from callward.policies._document import (
    ApprovalRule,
    PolicyDocument,
    ResultRule,
    load_policy,
    parse_policy,
)
from callward.policies._results import redact
from callward.policies._schema import SchemaCheck
from callward.policies._state import PolicyState, Proposal, RateCharge, StateUnavailable

log = structlog.get_logger()

UNKNOWN_TOOL_RULE: Final = RuleId("registry.unknown-tool")
DEFAULT_DENY_RULE: Final = RuleId("default-deny")
BOUNDS_RULE: Final = RuleId("input.bounds")
CEDAR_ERROR_RULE: Final = RuleId("cedar.evaluation-error")
CEDAR_CONTEXT_RULE: Final = RuleId("cedar.context")
STATE_RULE: Final = RuleId("policy.state-unavailable")
ANOMALY_STATE_RULE: Final = RuleId("anomaly.state-unavailable")
RELOAD_INTERVAL_SECONDS: Final = 1.0

Clock = Callable[[], float]


def _schema_rule(spec: ToolSpec) -> RuleId:
    return RuleId(f"schema.{spec.name}")


def _proposal_id() -> str:
    return f"apr_{uuid.uuid4().hex[:20]}"


def session_key(context: CallContext) -> str:
    """Labels are kept per principal and session; calls without a session share one."""
    return canonical_bytes([context.principal, context.session_id]).decode()


@dataclass(frozen=True, slots=True)
class _Inflow:
    """The labels one argument (an RFC 6901 pointer; "" for every literal) brings in."""

    argument: str
    labels: frozenset[str]
    origin: str


_IDENTIFIER: Final = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]*\Z")


def pointer_to_json_path(pointer: str) -> str:
    """``/hits/0/text`` as the ``$.hits[0].text`` form the other checks report."""
    path = "$"
    for token in pointer.split("/")[1:] if pointer else ():
        key = token.replace("~1", "/").replace("~0", "~")
        if key.isdigit():
            path += f"[{key}]"
        elif _IDENTIFIER.match(key):
            path += f".{key}"
        else:
            path += "[" + canonical_bytes(key).decode() + "]"
    return path


@dataclass(frozen=True, slots=True)
class Check:
    """One step of a decision trace: which check, which rule, what it found."""

    check: str
    passed: bool
    rules: tuple[RuleId, ...] = ()
    detail: str = ""
    json_path: str | None = None

    def to_json(self) -> dict[str, JSONValue]:
        return {"check": self.check, "passed": self.passed, "rules": list(self.rules),
                "detail": self.detail, "json_path": self.json_path}


@dataclass(frozen=True, slots=True)
class Trace:
    """The full decision trace of one call: every check in order, and the decision."""

    decision: Decision
    checks: tuple[Check, ...]
    labels: tuple[str, ...] = ()
    session_labels: tuple[str, ...] = ()

    def to_json(self) -> dict[str, JSONValue]:
        return {"decision": self.decision.to_json(),
                "checks": [c.to_json() for c in self.checks],
                "tool_labels": list(self.labels), "session_labels": list(self.session_labels)}


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """What a reload did: the new digest in force, or why the last good one was kept."""

    ok: bool
    digest: Sha256Hex
    previous_digest: Sha256Hex
    source: str
    message: str = ""

    def to_json(self) -> dict[str, JSONValue]:
        return {"ok": self.ok, "digest": self.digest, "previous_digest": self.previous_digest,
                "source": self.source, "message": self.message}


@dataclass(frozen=True, slots=True)
class _Compiled:
    document: PolicyDocument
    cedar: CedarPermissions


def _compile(document: PolicyDocument) -> _Compiled:
    return _Compiled(document, CedarPermissions(document))


class _Checks:
    """The checks of one decision in order, and those that failed with their kind."""

    def __init__(self) -> None:
        self.checks: list[Check] = []
        self.failed: list[tuple[DenyKind, Check]] = []

    @property
    def ok(self) -> bool:
        return not self.failed

    def add(self, kind: DenyKind, check: Check) -> None:
        self.checks.append(check)
        if not check.passed:
            self.failed.append((kind, check))

    def add_trace(self, check: Check) -> None:
        self.checks.append(check)

    def decision(self, document: PolicyDocument, spec: ToolSpec, permits: tuple[RuleId, ...],
                 pending: _Pending, diagnostics: tuple[str, ...]) -> Decision:
        if self.failed:
            kind, first = self.failed[0]
            reasons: list[RuleId] = []
            for _, check in self.failed:
                reasons.extend(r for r in check.rules if r not in reasons)
            return Decision("deny", tuple(reasons), document.digest, kind=kind,
                            message=first.detail, json_path=first.json_path,
                            diagnostics=diagnostics, policy_version=document.version)
        reasons = [_schema_rule(spec), *permits]
        if pending.approval is not None:
            reasons.append(RuleId(f"approval.{pending.approval.id}"))
        return Decision("allow", tuple(reasons), document.digest, message="allowed",
                        limits=document.limits_for(spec.name, spec.limits),
                        diagnostics=diagnostics, policy_version=document.version,
                        isolation=document.isolation_of(spec.name),
                        runtime=document.runtime_of(spec.name),
                        secrets=spec.secrets, egress=document.egress_of(spec.name))


@dataclass(slots=True)
class _Pending:
    """Side effects a decision takes only if it allows."""

    charges: list[RateCharge] = field(default_factory=list)
    approval: Proposal | None = None
    checked: bool = False
    #: An anomaly gate that asks for approval, and the open anomalies behind it.
    anomaly_approval: tuple[ApprovalRule, tuple[RuleId, ...]] | None = None


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
        state: PolicyState | None = None,
        signer: ApprovalSigner | None = None,
        clock: Clock = time.time,
        new_proposal_id: Callable[[], str] = _proposal_id,
        path: Path | None = None,
        shadow: Policy | None = None,
        anomalies: OpenAnomalies | None = None,
    ) -> None:
        self._compiled = _compile(document)
        self.anomalies = anomalies
        self._schema = SchemaCheck()
        self.state = state if state is not None else PolicyState()
        self._signer = signer
        self._clock = clock
        self._new_proposal_id = new_proposal_id
        self._path = path
        self._stamp = self._file_stamp()
        self._next_poll = 0.0
        self._reload_lock = threading.Lock()
        self.last_reload: ReloadResult | None = None
        self.shadow = shadow

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
        return self._evaluate(call, spec, context, commit=False)

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

    def _evaluate(self, call: ToolCall, spec: ToolSpec | None, context: CallContext, *,
                  commit: bool) -> Trace:
        compiled = self._compiled
        document = compiled.document
        # A call names a tool, or one version of it (name@version).
        if spec is None or call.name not in {spec.name, spec.ref}:
            decision = Decision("deny", (UNKNOWN_TOOL_RULE,), document.digest,
                                kind="unknown_tool", message="no tool of that name is registered")
            return Trace(decision, (Check("unknown_tool", False, (UNKNOWN_TOOL_RULE,)),))
        checks = _Checks()
        pin = document.pins.get(spec.name)
        if pin is not None:
            violation = pin.violation(spec.version, spec.digest)
            checks.add("permission", Check("pin", violation is None,
                                           (RuleId(f"tools.{spec.name}.pin"),), violation or ""))
        in_bounds = self._input_checks(document, call, spec, checks)
        now = self._clock()
        labels = document.labels_of(spec.name, spec.labels)
        inflows: tuple[_Inflow, ...] | None = None
        try:
            session_labels = self.state.session_labels(session_key(context))
            if document.flows:
                inflows = self._inflows(context, session_labels)
        except StateUnavailable:
            session_labels = frozenset()
            checks.add("flow", Check("state", False, (STATE_RULE,), "policy state unreadable"))
        permits: tuple[RuleId, ...] = ()
        diagnostics: tuple[str, ...] = ()
        if in_bounds:
            permits, diagnostics = self._permission_check(
                compiled.cedar, call, spec, context, session_labels, now, checks)
        else:
            checks.add_trace(Check("permission", False, (), "not evaluated: input out of bounds"))

        self._flow_check(document, labels, session_labels, inflows, context, checks)

        pending = _Pending()
        if document.anomaly_gates:
            self._anomaly_gates(document, spec, context, pending, checks, now)
        if checks.ok:
            self._rate_limits(document, spec, context=context, labels=labels, pending=pending,
                              record=checks, now=now, commit=commit)
        if checks.ok:
            self._approvals(document, call, spec, context=context, pending=pending,
                            record=checks, now=now, commit=commit)
        if checks.ok and commit:
            self._commit(call, pending, checks, now)
        decision = checks.decision(document, spec, permits, pending, diagnostics)
        return Trace(decision, tuple(checks.checks), tuple(sorted(labels)),
                     tuple(sorted(session_labels)))

    def _inflows(self, context: CallContext, session_labels: frozenset[str]
                 ) -> tuple[_Inflow, ...] | None:
        """
        Per argument, the labels it brings in; None when the provenance is unknown.

        Raises:
            StateUnavailable: The recorded labels cannot be read.
        """
        provenance = context.provenance
        if provenance is None:
            return None
        key = session_key(context)
        known = (self.state.call_labels(key, [edge.source_call_id for edge in provenance.edges])
                 if provenance.edges else {})
        # Literals carry what the caller says, and whatever a call of this session without
        # provenance (a model's) saw: the model may have written it into the plan.
        literals = provenance.literal_labels | self.state.unattributed_labels(key)
        inflows = [_Inflow("", literals, "a literal value")]
        for edge in provenance.edges:
            # A source never recorded in this session is judged by the whole session.
            labels = known.get(edge.source_call_id, session_labels)
            inflows.append(_Inflow(edge.argument, labels,
                                   f"the value from step {edge.source_step!r}"))
        return tuple(inflows)

    @staticmethod
    def _flow_check(document: PolicyDocument, labels: frozenset[str],  # noqa: PLR0917 - one private step
                    session_labels: frozenset[str], inflows: tuple[_Inflow, ...] | None,
                    context: CallContext, checks: _Checks) -> None:
        if not document.flows:
            return
        if inflows is None and context.provenance is not None:
            return  # the state was unreadable; that check already denies
        if inflows is None:
            flows = tuple(flow.id for flow in document.flows
                          if flow.sources & session_labels and flow.sinks & labels)
            if flows:
                checks.add("flow", Check("flow", False, flows,
                                         "labelled data from this session may not reach "
                                         "this tool"))
            else:
                checks.add("flow", Check("flow", True, ()))
            return
        hits = [(flow, inflow) for inflow in inflows for flow in document.flows
                if flow.sources & inflow.labels and flow.sinks & labels]
        if not hits:
            checks.add("flow", Check("flow", True, ()))
            return
        flow, inflow = hits[0]
        carried = ", ".join(sorted(flow.sources & inflow.labels))
        checks.add("flow", Check(
            "flow", False, tuple(dict.fromkeys(f.id for f, _ in hits)),
            f"{inflow.origin} carries {carried}, which may not reach this tool",
            pointer_to_json_path(inflow.argument)))

    def _input_checks(self, document: PolicyDocument, call: ToolCall, spec: ToolSpec,
                      checks: _Checks) -> bool:
        """Bounds, schema and path constraints; False when the input is out of bounds."""
        bounds = self._bounds(call)
        if bounds is not None:
            checks.add("schema", Check("bounds", False, (BOUNDS_RULE,), bounds, "$"))
            return False
        violation = self._schema.violation(call, spec)
        checks.add("schema", Check(
            "schema", violation is None, (_schema_rule(spec),),
            "" if violation is None else violation.message,
            None if violation is None else violation.json_path))
        confinement = document.confinements.get(spec.name)
        if confinement is not None:
            path = confinement_violation(confinement, call.arguments)
            checks.add("constraint", Check(
                "constraint", path is None, (RuleId(f"confine.{spec.name}"),),
                "" if path is None else f"a path argument leaves {confinement.root}", path))
        if spec.secrets:  # the tool declares, the policy grants; anything else is denied
            missing = document.ungranted_secrets(spec.name, spec.secrets)
            checks.add("permission", Check(
                "secrets", not missing, (RuleId(f"secrets.{spec.name}"),),
                f"the policy grants {spec.name} no secret {', '.join(missing)}" if missing
                else ""))
        return True

    @staticmethod
    def _permission_check(cedar: CedarPermissions, call: ToolCall, spec: ToolSpec,  # noqa: PLR0917 - one private step
                          context: CallContext, session_labels: frozenset[str], now: float,
                          checks: _Checks) -> tuple[tuple[RuleId, ...], tuple[str, ...]]:
        try:
            answer = cedar.decide(
                principal=context.principal, spec=spec, arguments=call.arguments,
                session_id=context.session_id, session_labels=session_labels, now=now)
        except ContextError as exc:
            checks.add("constraint", Check("cedar.context", False, (CEDAR_CONTEXT_RULE,),
                                           str(exc), exc.json_path))
            return (), ()
        if answer.errors:
            checks.add("permission", Check("permission", False, (CEDAR_ERROR_RULE,),
                                           "a Cedar policy failed to evaluate"))
        elif answer.forbids:
            checks.add("permission", Check("permission", False, answer.forbids,
                                           "a forbid policy matches this call"))
        elif not answer.allowed:
            checks.add("permission", Check("permission", False, (DEFAULT_DENY_RULE,),
                                           "no rule allows this principal this tool"))
        else:
            checks.add("permission", Check("permission", True, answer.permits))
        return answer.permits, answer.errors

    @staticmethod
    def _bounds(call: ToolCall) -> str | None:
        if len(call.arguments_json) > MAX_JSON_BYTES:
            return f"the arguments are over {MAX_JSON_BYTES} bytes"
        # Nesting deeper than the bound needs more characters than this.
        if len(call.arguments_json) > 128:
            try:
                check_json_bounds(call.arguments_json.decode("utf-8"))
            except ValueError as exc:
                return str(exc)
        return None

    def _rate_limits(self, document: PolicyDocument, spec: ToolSpec, *,
                     context: CallContext, labels: frozenset[str], pending: _Pending,
                     record: _Checks, now: float, commit: bool) -> None:
        roles = document.roles_of(context.principal)
        groups = document.groups_of(context.principal)
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
            # Checked and charged at once in _commit: one write transaction per decision.
            return
        pending.checked = True
        try:
            exhausted = self.state.charge(pending.charges, now, commit=False)
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

    def _anomaly_gates(self, document: PolicyDocument, spec: ToolSpec,  # noqa: PLR0917 - one private step
                       context: CallContext, pending: _Pending, checks: _Checks,
                       now: float) -> None:
        """Deny, or ask for approval, while an anomaly a gate names is open for the caller."""
        roles = document.roles_of(context.principal)
        groups = document.groups_of(context.principal)
        gates = [g for g in document.anomaly_gates
                 if g.applies(context.principal, roles, groups, spec.name)]
        if not gates:
            return
        kind: DenyKind = "permission" if gates[0].approval is None else "approval_required"
        if self.anomalies is None:
            checks.add(kind, Check("anomaly", False, (ANOMALY_STATE_RULE,),
                                   "no anomaly state is configured"))
            return
        try:
            open_now = self.anomalies.open_for(context.principal, now)
        except AnomalyStateUnavailable:
            checks.add(kind, Check("anomaly", False, (ANOMALY_STATE_RULE,),
                                   "the anomaly state is unreadable"))
            return
        for gate in gates:
            held = [a for a in open_now if a.metric in gate.metrics]
            if not held:
                continue
            ids = tuple(RuleId(f"anomaly.{a.id}") for a in held)
            if gate.approval is None:
                checks.add("permission", Check(
                    "anomaly", False, (gate.id, *ids),
                    f"an anomaly ({held[0].metric}) is open for this principal"))
            elif pending.anomaly_approval is None:
                pending.anomaly_approval = (gate.approval, ids)
        if checks.ok and pending.anomaly_approval is None:
            checks.add_trace(Check("anomaly", True, tuple(g.id for g in gates)))

    def _approvals(self, document: PolicyDocument, call: ToolCall, spec: ToolSpec, *,
                   context: CallContext, pending: _Pending, record: _Checks,
                   now: float, commit: bool) -> None:
        roles = document.roles_of(context.principal)
        groups = document.groups_of(context.principal)
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
            approved = self.state.approved_for(context.principal, spec.name, digest, now)
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
                proposal = self.state.propose(proposal)
            expired = self.state.expired_approval(context.principal, spec.name, digest, now)
        except StateUnavailable:
            record.add("approval_required", Check("approval", False, (STATE_RULE,),
                                              "policy state unavailable"))
            return
        # An approval that expired unused is named, so the log shows that lifecycle too.
        lapsed = () if expired is None else (RuleId(f"approval-expired.{expired}"),)
        record.add("approval_required", Check(
            "approval", False, (rule.id, *held, *lapsed, RuleId(f"proposal.{proposal.id}")),
            f"this call needs an approval: proposal {proposal.id}"))

    def _commit(self, call: ToolCall, pending: _Pending, record: _Checks, now: float) -> None:
        try:
            if pending.approval is not None and not self.state.use_approval(
                pending.approval.id, call.id, now
            ):
                record.add("approval_required", Check(
                    "approval", False, (RuleId(f"proposal.{pending.approval.id}"),),
                    "the approval was used or expired in the meantime"))
                return
            exhausted = self.state.charge(pending.charges, now)
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
                labels |= self._inherited(context, provenance) - document.declassifies.get(
                    spec.name, frozenset())
            self.state.add_session_labels(session_key(context), labels, call.id, self._clock(),
                                          per_call=provenance is not None)
        except StateUnavailable:
            log.warning("policy_state_unavailable", call_id=call.id, stage="observe_result")
            return ResultTreatment(
                canonical_bytes({"error": "flow", "message":
                                 "the result's labels could not be recorded; it is withheld"}),
                labels=tuple(sorted(labels)), withheld_kind="flow")
        return _treat(rules, content_json, labels)

    # -- upstream MCP resources and prompts -----------------------------------

    def mcp_content_rule(self, server: str, kind: Literal["resource", "prompt"], name: str,
                         principal: str) -> RuleId | None:
        """
        The rule that enables one upstream resource (by URI) or prompt (by name) for
        ``principal``, or None: resources and prompts are off unless a rule names them.
        """
        document = self._compiled.document
        roles, groups = document.roles_of(principal), document.groups_of(principal)
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
        return _treat([rule for rule in document.results if rule.applies(name)], content_json,
                      frozenset())

    def _inherited(self, context: CallContext, provenance: Provenance) -> frozenset[str]:
        """
        The labels a call's arguments brought in, which its result carries on.

        Raises:
            StateUnavailable: The recorded labels cannot be read.
        """
        session_labels = (self.state.session_labels(session_key(context))
                          if provenance.edges else frozenset())
        inflows = self._inflows(context, session_labels) or ()
        return frozenset().union(*(inflow.labels for inflow in inflows))

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
        return self._settle(proposal_id, by=by, approve=True, audit=audit)

    def reject(self, proposal_id: str, *, by: str, audit: AuditLog | None = None
               ) -> Proposal:
        """
        Record that a proposal is denied (``approval.denied``); it can never run on it.

        Raises:
            ApprovalRefused: As for ``approve``.
        """
        return self._settle(proposal_id, by=by, approve=False, audit=audit)

    def _settle(self, proposal_id: str, *, by: str, approve: bool, audit: AuditLog | None
                ) -> Proposal:
        try:
            proposal = self._settle_unaudited(proposal_id, by=by, approve=approve)
        except ApprovalRefused as exc:
            if audit is not None:
                audit.append("approval.refused", {
                    "proposal": proposal_id[:128], "by": by[:256],
                    "action": "approve" if approve else "reject", "rule": exc.rule,
                    "message": exc.message, "policy_digest": self.digest})
            raise
        if audit is not None:
            audit.append("approval.granted" if approve else "approval.denied",
                         approval_record(proposal, self.digest))
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
        if not self.state.decide_proposal(proposal_id, status="approved" if approve
                                          else "rejected", by=by, now=now, approval=payload,
                                          signature=signature, key_id=key_id):
            raise ApprovalRefused("the proposal is no longer open", rule=rule_id)
        settled = self.state.proposal(proposal_id)
        if settled is None:
            raise StateUnavailable("the proposal just written cannot be read back")
        return settled

    def _approvable(self, proposal_id: str, by: str) -> tuple[Proposal, str]:
        proposal = self.state.proposal(proposal_id)
        if proposal is None:
            raise ApprovalRefused("no proposal has that id", rule="approval.unknown")
        status = proposal.status_at(self._clock())
        if status != "proposed":
            raise ApprovalRefused(f"the proposal is {status}", rule=proposal.rule_id)
        document = self._compiled.document
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

    # -- reload -----------------------------------------------------------------

    def _file_stamp(self) -> tuple[tuple[int, int], ...]:
        if self._path is None:
            return ()
        paths = [self._path, *(self._path.parent / name
                               for name, _ in self._compiled.document.cedar_sources
                               if name != "<inline>")]
        stamps = []
        for path in paths:
            try:
                stat = os.stat(path)
                stamps.append((stat.st_mtime_ns, stat.st_size))
            except OSError:
                stamps.append((-1, -1))
        return tuple(stamps)

    def poll_reload(self) -> ReloadResult | None:
        """
        Reload when the policy file (or a Cedar file) changed; at most once a second.

        Returns:
            None when nothing changed; else what the reload did, for the gateway to audit.
        """
        if self._path is None:
            return None
        now = time.monotonic()
        if now < self._next_poll:
            return None
        self._next_poll = now + RELOAD_INTERVAL_SECONDS
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return None
        self._stamp = stamp
        return self.reload()

    def _load_again(self) -> _Compiled:
        if self._path is None:
            raise PolicyInvalid("this policy was not loaded from a file")
        return _compile(load_policy(self._path))

    def reload(self) -> ReloadResult:
        """Load the file again: swap it in whole, or keep the last good policy."""
        previous = self.digest
        source = str(self._path)
        with self._reload_lock:
            try:
                compiled = self._load_again()
            except PolicyInvalid as exc:
                result = ReloadResult(False, previous, previous, source, exc.message[:1000])
                log.warning("policy_reload_failed", digest=previous)
            else:
                self._compiled = compiled
                self._stamp = self._file_stamp()
                result = ReloadResult(True, compiled.document.digest, previous, source)
                log.info("policy_reloaded", digest=compiled.document.digest, previous=previous)
        self.last_reload = result
        return result


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


def _treat(rules: list[ResultRule], content_json: bytes, labels: frozenset[str]
           ) -> ResultTreatment:
    """Redaction and what the audit keeps, by the result rules that apply."""
    patterns = [p for rule in rules for p in rule.redact]
    content, redactions = content_json, 0
    if patterns:
        value, redactions = redact(canonical_loads(content_json), patterns)
        if redactions:
            content = canonical_bytes(value)
    keep = [rule.audit_body for rule in rules if rule.audit_body is not None]
    return ResultTreatment(
        content_json=content,
        keep_body=bool(keep) and keep[-1] == "body",
        labels=tuple(sorted(labels)),
        rules=tuple(rule.id for rule in rules),
        redactions=redactions,
    )


def _summary(decision: Decision) -> dict[str, JSONValue]:
    return {"effect": decision.effect, "kind": decision.kind, "reasons": list(decision.reasons)}


def arguments_digest(arguments: dict[str, JSONValue]) -> Sha256Hex:
    """The digest an approval is bound to: SHA-256 of the canonical arguments."""
    return sha256_hex(canonical_bytes(arguments))
