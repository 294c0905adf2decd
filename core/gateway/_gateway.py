"""
The gateway: the one path every model-emitted call takes.

Invariants, in the order a call meets them:

1. A call that cannot be parsed, names an unknown tool, or is denied by the
   policy is written to the audit log (``call.rejected`` / ``call.denied``)
   and never runs.
2. ``call.authorized`` is durable in the audit log before the sandbox is
   asked to run anything; if it cannot be written, nothing runs and the
   caller gets ``AuditUnavailable``.
3. No result reaches the model without a signed ``call.completed``; if that
   write fails, the result is withheld and the caller gets
   ``AuditUnavailable``.

Every ``ToolResult`` that leaves the gateway therefore carries the receipt of
the signed record that explains it.

Observers (``callward.core.observe._events``: the metrics, the anomaly detector) see a
call only after its final record is durable; one that raises is logged and
skipped, so observing can neither fail, lose nor change a call. With tracing on
(``callward.core.observe._tracing``), a call is an ``execute_tool`` span with a child
per stage, and each record names the span it was written in; spans hold no
argument or result value, and with tracing off the records are as without it.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio.to_thread
import structlog

from callward.core._canonical import (
    JSONValue,
    canonical_bytes,
    canonical_loads,
    elide_large_values,
    sha256_hex,
)
from callward.core.errors import CallwardError, MalformedCall, SandboxUnavailable
from callward.core.gateway._config import (
    DEFAULT_MAX_ARGUMENT_BYTES,
    MIN_MAX_ARGUMENT_BYTES,
    build_parts,
)
from callward.core.gateway._fleet import FleetSettings
from callward.core.gateway._start import (
    StartFacts,
    callward_version,
    prove_start,
    record_start,
    refusal,
    start_body,
)
from callward.core.observe._events import CallEvent, CallObserver, RecordObserver
from callward.core.observe._tracing import (
    Tracing,
    annotate_decision,
    annotate_outcome,
    annotate_record,
    annotate_result,
)
from callward.core.parse._front import parse_model_output
from callward.core.protocols import (
    AuditLog,
    PolicyEngine,
    PolicyHooks,
    ReceiptIssuer,
    ShadowingPolicy,
    ToolRunner,
    run_as_placed,
)
from callward.core.registry._registry import ToolRegistry
from callward.core.types import (
    AuditRecord,
    CallContext,
    CallId,
    Decision,
    Execution,
    Identity,
    Placement,
    Provenance,
    Receipt,
    ResourceLimits,
    ResultKind,
    RuleId,
    ToolCall,
    ToolResult,
    ToolSpec,
)

if TYPE_CHECKING:
    from callward.core.gateway._replicas import ReplicaRegistry

log = structlog.get_logger()

Clock = Callable[[], float]
NewId = Callable[[], str]
_ORIGIN: contextvars.ContextVar[dict[str, JSONValue] | None] = contextvars.ContextVar(
    "callward_call_origin", default=None
)
_RECORD_KIND = re.compile(r"\A[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+\Z")


def new_call_id() -> str:
    """A fresh call id for calls whose model gave none."""
    return f"call_{uuid.uuid4().hex[:24]}"


def _ms(start: float, end: float) -> float:
    return round((end - start) * 1000, 3)


def _error_content(kind: str, message: str, **extra: JSONValue) -> bytes:
    return canonical_bytes({"error": kind, "message": message, **extra})


#: Runs one allowed call, awaited on the running loop (``Gateway.handle_awaiting``).
AwaitedRun = Callable[[ToolSpec, ToolCall, ResourceLimits], Awaitable[Execution]]


@dataclass(frozen=True, slots=True)
class _Authorized:
    """A call the policy allowed whose ``call.authorized`` is durable: it may run now."""

    call: ToolCall
    spec: ToolSpec
    decision: Decision
    context: CallContext
    authorized: AuditRecord
    clog: structlog.typing.FilteringBoundLogger
    durations_ms: tuple[tuple[str, float], tuple[str, float], tuple[str, float]]


@dataclass(frozen=True, slots=True)
class _Outcome:
    execution: Execution | None
    kind: ResultKind
    content_json: bytes
    message: str


class Gateway:
    """
    Wires registry, policy, sandbox and audit log in the order of DESIGN.md.

    The gateway holds what it was handed; it does no I/O when constructed.
    """

    def __init__(
        self,
        *,
        registry: ToolRegistry,
        policy: PolicyEngine,
        runner: ToolRunner,
        audit: AuditLog,
        clock: Clock = time.perf_counter,
        new_id: NewId = new_call_id,
        closers: tuple[Callable[[], None], ...] = (),
        observers: tuple[CallObserver, ...] = (),
        max_argument_bytes: int = DEFAULT_MAX_ARGUMENT_BYTES,
        tracing: Tracing | None = None,
    ) -> None:
        if max_argument_bytes < MIN_MAX_ARGUMENT_BYTES:
            raise ValueError(f"max_argument_bytes is at least {MIN_MAX_ARGUMENT_BYTES}")
        self.max_argument_bytes = max_argument_bytes
        self.registry = registry
        self.policy = policy
        self._policy_hooks = policy if isinstance(policy, PolicyHooks) else None
        self._shadowing = policy if isinstance(policy, ShadowingPolicy) else None
        self.runner = runner
        self.audit = audit
        self._issuer_of: AuditLog | None = None
        self._issuer: ReceiptIssuer | None = None
        self._clock = clock
        self._new_id = new_id
        self._closers = closers
        self.observers = observers
        # Spans of the calls (callward.core.observe._tracing); off unless configured.
        self.tracing = tracing if tracing is not None else Tracing.from_global()
        # Set by join_fleet when this gateway is a replica of a fleet.
        self._replica: ReplicaRegistry | None = None
        self._replica_id: str | None = None

    def close(self) -> None:
        """Release what the gateway was handed to own (the audit store, the engine client)."""
        for closer in self._closers:
            closer()

    def __enter__(self) -> Gateway:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @classmethod
    def from_config(cls, path: object, *, home: object = None,
                    unsafe_skip_probes: bool = False) -> Gateway:
        """
        Build a gateway from a configuration file: the configuration builds the parts
        (``callward.core.gateway._config``), the gateway assembles them.

        Raises:
            ConfigurationError: The configuration, a tool file or the policy is invalid.
        """
        parts = build_parts(path, home=home)
        gateway = cls(registry=parts.registry, policy=parts.policy, runner=parts.runner,
                      audit=parts.audit, closers=parts.closers, observers=parts.observers,
                      max_argument_bytes=parts.max_argument_bytes, tracing=parts.tracing)
        try:
            gateway.prove_start(parts.start, unsafe_skip_probes=unsafe_skip_probes)
            if parts.fleet is not None and parts.start.replica is not None:
                gateway.join_fleet(parts.fleet, parts.start.replica)
        except BaseException:
            gateway.close()
            raise
        return gateway

    def join_fleet(self, fleet: FleetSettings, replica_id: str) -> None:
        """
        Register this gateway in its fleet's replica table (id, host, version, policy
        and image digests) and keep its heartbeat; ``policy.reloaded`` names it from
        now on, and each reload updates the policy digest the fleet sees.

        Raises:
            StateUnavailable: The fleet's database cannot be reached.
        """
        from callward.core.gateway._replicas import ReplicaRegistry  # noqa: PLC0415

        replica = ReplicaRegistry(
            fleet.url, replica_id=replica_id, version=callward_version(),
            policy_digest=str(self.policy.digest), image_digest=self._image_digest() or "",
            heartbeat_seconds=fleet.heartbeat_seconds, lease_seconds=fleet.lease_seconds)
        replica.start()
        self._replica, self._replica_id = replica, replica_id
        self._closers = (replica.stop, *self._closers)

    def share_fleet_membership(self, other: Gateway) -> None:
        """
        Act as the same replica as ``other`` (a gateway this one wraps, e.g. with MCP
        upstreams): its policy reloads name that replica and update its registration.
        ``other`` keeps owning the registration (and stops it on close).
        """
        self._replica, self._replica_id = other._replica, other._replica_id

    def prove_start(self, facts: StartFacts, *, unsafe_skip_probes: bool = False) -> None:
        """
        Prove, live, that the sandbox protects calls on every runtime in force, then
        write the signed ``gateway.started`` record (callward's version, the policy,
        image and configuration digests, the runtimes, each probe's findings).

        Raises:
            SandboxUnavailable: A probe failed; ``gateway.start_refused`` says which.
            AuditUnavailable: The log is not writable.
        """
        probes = () if unsafe_skip_probes else prove_start(self.runner, facts)
        if unsafe_skip_probes:
            log.warning("unsafe_skip_probes", runtimes=list(facts.runtimes))
        body = start_body(facts, policy_digest=str(self.policy.digest),
                          image_digest=self._image_digest(), probes=probes,
                          unsafe_skip_probes=unsafe_skip_probes)
        if not all(probe.ok for probe in probes):
            record_start(self.audit, "gateway.start_refused", body)
            raise refusal(probes)
        record_start(self.audit, "gateway.started", body)

    @property
    def new_id(self) -> NewId:
        """Makes an id for a call whose model gave none (callers that parse use it too)."""
        return self._new_id

    def tools_for(self, principal: str, *, session_id: str = "",
                  identity: Identity | None = None) -> tuple[ToolSpec, ...]:
        """
        The registered tools a listing shows this caller (MCP ``tools/list``, the agent's
        prompt): those the policy could allow it. A tool left out is still decided, and
        denied, when called by name; a listing is never an authorization.
        """
        context = CallContext(principal=principal, session_id=session_id, identity=identity)
        return tuple(spec for spec in self.registry if self.policy.may_discover(spec, context))

    def record(self, kind: str, body: Mapping[str, JSONValue]) -> Receipt:
        """
        Sign ``body`` into the same audit log as the calls, e.g. a ``model.turn``.

        ``call.*`` kinds are the gateway's own and cannot be written through here.

        Raises:
            ValueError: ``kind`` is a ``call.*`` kind or not dotted snake_case.
            AuditUnavailable: The record is not durable.
        """
        if kind.startswith("call.") or not _RECORD_KIND.match(kind):
            raise ValueError("a record kind is dotted snake_case and not call.*")
        receipt = self._receipt(self._append("callward.audit.record", kind, body))
        for observer in self.observers:
            if isinstance(observer, RecordObserver):
                try:
                    observer.observe_record(kind, body)
                except Exception:  # an observer never fails a record
                    log.exception("observer_failed", observer=type(observer).__name__)
        return receipt

    @contextlib.contextmanager
    def produced_by(self, origin: Mapping[str, JSONValue]) -> Iterator[None]:
        """
        Within the block, every call record (``call.*``) carries ``origin`` under
        ``"model"``: which model (id, digest) and turn emitted the calls. Per context
        (thread, task), so concurrent runs do not mix.
        """
        token = _ORIGIN.set(dict(origin))
        try:
            yield
        finally:
            _ORIGIN.reset(token)

    # -- entry points ---------------------------------------------------------

    def handle_text(
        self,
        text: str | Mapping[str, object],
        *,
        principal: str,
        session_id: str = "",
        identity: Identity | None = None,
    ) -> tuple[ToolResult, ...]:
        """
        Parse one model message and run every call in it through the gateway.

        Returns:
            One result per call, in order; a single ``malformed`` result when the
            message could not be read (then nothing ran); an empty tuple when the
            message asks for no tool.

        Raises:
            AuditUnavailable: A record could not be written; see the module invariants.
        """
        context = CallContext(principal=principal, session_id=session_id, identity=identity)
        started = self._clock()
        self.registry.refresh()
        with self.tracing.span("callward.parse") as span:
            try:
                calls = parse_model_output(
                    text, parameter_order=self.registry.parameter_order, new_id=self._new_id
                )
            except MalformedCall as exc:
                annotate_outcome(span, "malformed")
                return (self._reject(text, exc, context),)
            span.set_attribute("callward.parse.calls", len(calls))
        parse_ms = _ms(started, self._clock())
        return tuple(self.handle(call, principal=principal, session_id=session_id,
                                 parse_ms=parse_ms, identity=identity) for call in calls)

    def handle(
        self,
        call: ToolCall,
        *,
        principal: str,
        session_id: str = "",
        parse_ms: float = 0.0,
        provenance: Provenance | None = None,
        identity: Identity | None = None,
    ) -> ToolResult:
        """
        Run one parsed call: decide, audit, execute, audit, return.

        Denials and tool failures come back as results with their kind; only a
        failed audit write raises.

        Args:
            provenance: Where the arguments came from (a plan step's ``$ref`` edges);
                the policy checks flow rules per value with it, and every record of
                the call carries it. None: unknown, flow rules apply to the session.
            identity: What the caller's verified access token says (issuer, roles,
                groups, a hash of its ``jti``); the policy adds its roles and groups to
                the document's, and every record of the call carries it.

        Raises:
            AuditUnavailable: A record could not be written; nothing is returned.
        """
        with self.tracing.tool_span(call) as span:
            step = self._authorize(call, principal=principal, session_id=session_id,
                                   parse_ms=parse_ms, provenance=provenance, identity=identity)
            if isinstance(step, ToolResult):
                annotate_result(span, step)
                return step
            started = self._clock()
            with self.tracing.span("callward.sandbox") as run_span:
                outcome = self._execute(call, step.spec, step.decision, step.context)
                annotate_outcome(run_span, outcome.kind)
            result = self._complete(step, outcome, _ms(started, self._clock()))
            annotate_result(span, result)
            return result

    async def handle_awaiting(
        self,
        call: ToolCall,
        *,
        principal: str,
        session_id: str = "",
        run: AwaitedRun,
        identity: Identity | None = None,
    ) -> ToolResult:
        """
        ``handle``, with the tool's run awaited (``run``) instead of blocking a thread.

        For tools whose run is I/O on the running loop (an upstream MCP server's
        client). The stages before and after the run are the same calls as in
        ``handle`` (``call.authorized`` durable before ``run`` starts, the result
        rules and a durable ``call.completed`` before anything is returned), and
        block this loop's thread while they decide and make the records durable:
        call it only on a loop that may wait for that (the upstream clients' loop,
        see ``callward.core.mcp._server``). A decision that places the call
        (isolation, runtime, secrets, egress) runs as ``handle`` would, on a worker
        thread.

        Raises:
            AuditUnavailable: A record could not be written; nothing is returned.
        """
        with self.tracing.tool_span(call) as span:
            step = self._authorize(call, principal=principal, session_id=session_id,
                                   identity=identity)
            if isinstance(step, ToolResult):
                annotate_result(span, step)
                return step
            started = self._clock()
            with self.tracing.span("callward.sandbox") as run_span:
                outcome = await self._run_awaiting(step, run, started)
                annotate_outcome(run_span, outcome.kind)
            result = self._complete(step, outcome, _ms(started, self._clock()))
            annotate_result(span, result)
            return result

    async def _run_awaiting(self, step: _Authorized, run: AwaitedRun, started: float
                            ) -> _Outcome:
        """
        ``handle_awaiting``'s run: awaited on this loop when the decision places the call
        anywhere, else ``_execute`` on a worker thread. A run cancelled while it ran gets
        its ``call.completed`` first, then the cancellation goes on.
        """
        call, decision = step.call, step.decision
        if not Placement.of(decision, step.context).anywhere:
            return await anyio.to_thread.run_sync(
                self._execute, call, step.spec, decision, step.context)
        try:
            execution = await run(step.spec, call, _limits_of(decision, step.spec))
        except Exception as exc:  # noqa: BLE001 - stage boundary, as in _execute
            return self._failed_run(call, exc)
        except BaseException:  # cancelled while it ran: its record first, then go on
            cancelled = SandboxUnavailable("the call was cancelled while it ran")
            self._complete(step, self._failed_run(call, cancelled),
                           _ms(started, self._clock()))
            raise
        return _outcome_of(execution)

    def _authorize(
        self,
        call: ToolCall,
        *,
        principal: str,
        session_id: str,
        parse_ms: float = 0.0,
        provenance: Provenance | None = None,
        identity: Identity | None = None,
    ) -> ToolResult | _Authorized:
        """Decide; a denial is audited and returned, an allowance made durable first."""
        context = CallContext(principal=principal, session_id=session_id,
                              provenance=provenance, identity=identity)
        clog = log.bind(call_id=call.id, tool_name_sha256=sha256_hex(call.name.encode())[:16])
        clog.info("call_received", dialect=call.dialect, arguments_bytes=len(call.arguments_json))

        self.registry.refresh()  # versions loaded, activated or unloaded since the last call
        spec = self.registry.get(call.name)
        started = self._clock()
        with self.tracing.span("callward.policy") as span:
            self.poll_policy_reload()
            decision = self._decide(call, spec, context)
            annotate_decision(span, decision)
        policy_ms = _ms(started, self._clock())

        if decision.effect == "deny" or spec is None:
            return self._deny(
                call=call,
                spec=spec,
                decision=decision,
                context=context,
                parse_ms=parse_ms,
                policy_ms=policy_ms,
            )

        started = self._clock()
        authorized = self._append(
            "callward.audit.authorized", "call.authorized",
            self._call_body(call, spec, decision, context)
        )
        authorize_ms = _ms(started, self._clock())
        clog.info("call_authorized", seq=authorized.seq)
        return _Authorized(call, spec, decision, context, authorized, clog,
                           (("parse", parse_ms), ("policy", policy_ms),
                            ("audit_authorized", authorize_ms)))

    def _complete(self, step: _Authorized, outcome: _Outcome, sandbox_ms: float) -> ToolResult:
        """Apply the result rules, make ``call.completed`` durable, and return the result."""
        call, spec, decision, context = step.call, step.spec, step.decision, step.context
        (_, parse_ms), (_, policy_ms), (_, authorize_ms) = step.durations_ms
        queue_ms = None
        if outcome.execution is not None:
            queue_ms = round(max(0.0, sandbox_ms - outcome.execution.usage.wall_ms), 3)
        expected_matched = None
        if call.expected_json is not None and outcome.kind == "ok":
            expected_matched = outcome.content_json == call.expected_json
        outcome, result_body = self._treat_result(call, spec, context, outcome)
        execution = outcome.execution
        started = self._clock()
        completed = self._append(
            "callward.audit.completed", "call.completed",
            {
                "call_id": call.id,
                "tool": spec.ref,
                "authorized_seq": step.authorized.seq,
                "outcome": outcome.kind,
                "message": outcome.message,
                "result_sha256": sha256_hex(outcome.content_json),
                "result_bytes": len(outcome.content_json),
                "expected_matched": expected_matched,
                "usage": execution.usage.to_json() if execution else None,
                "durations_ms": {
                    "parse": parse_ms,
                    "policy": policy_ms,
                    "audit_authorized": authorize_ms,
                    "sandbox": sandbox_ms,
                },
                "image_digest": self._image_digest(),
                **result_body,
                **_origin_fields(),
                **_provenance_fields(context),
                **_identity_fields(context),
            },
        )
        stages = (*step.durations_ms, ("sandbox", sandbox_ms),
                  ("audit_completed", _ms(started, self._clock())))
        step.clog.info("call_completed", outcome=outcome.kind, seq=completed.seq,
                       result_bytes=len(outcome.content_json))
        self._notify(CallEvent(
            call_id=call.id, principal=context.principal, tool=spec.name, outcome=outcome.kind,
            record_kind="call.completed", result_bytes=len(outcome.content_json),
            durations_ms=stages if queue_ms is None else (*stages, ("queue", queue_ms)),
            reasons=decision.reasons, seq=completed.seq))
        return ToolResult(
            call_id=call.id,
            tool=spec.name,
            kind=outcome.kind,
            content_json=outcome.content_json,
            receipt=self._receipt(completed),
            expected_matched=expected_matched,
            decision=decision,
        )

    # -- stages ---------------------------------------------------------------

    def _notify(self, event: CallEvent) -> None:
        """
        Hand a finished call to the observers (metrics, anomaly detector).

        Runs after the final record is durable; an observer that raises is logged
        and skipped, so observing can never lose, fail or change a call.
        """
        for observer in self.observers:
            try:
                observer.observe(event)
            except Exception:  # observers are not evidence; the call stands
                log.exception("observer_failed", observer=type(observer).__name__,
                              call_id=event.call_id)

    def poll_policy_reload(self) -> None:
        """
        Reload the policy if its file changed, and audit it (or a failed reload, which
        keeps the last good policy). Each call does it first; other faces that consult
        the policy (MCP resources and prompts) call it too.

        Raises:
            AuditUnavailable: The reload could not be recorded.
        """
        if self._policy_hooks is None:
            return
        report = self._policy_hooks.poll_reload()
        if report is not None:
            kind = "policy.reloaded" if report.ok else "policy.reload_failed"
            body = report.to_json()
            if self._replica_id is not None:
                body["replica"] = self._replica_id
            record = self.audit.append(kind, body)
            log.info("policy_reload_audited", kind=kind, seq=record.seq)
            if report.ok and self._replica is not None:
                self._replica.update(policy_digest=str(self.policy.digest))

    def _treat_result(
        self, call: ToolCall, spec: ToolSpec, context: CallContext, outcome: _Outcome
    ) -> tuple[_Outcome, dict[str, JSONValue]]:
        """The policy's result rules, applied before the result is audited or returned."""
        if self._policy_hooks is None:
            return outcome, {}
        try:
            treatment = self._policy_hooks.observe_result(call, spec, context,
                                                          outcome.content_json)
        except Exception:  # stage boundary: the result is withheld, and audited
            log.exception("policy_result_failed", call_id=call.id)
            message = "the policy could not check the result, so it is withheld"
            return (_Outcome(outcome.execution, "flow", _error_content("flow", message), message),
                    {"result_rules": ["gateway.result-policy-error"]})
        if treatment.withheld_kind is not None:
            message = "the policy withheld the result"
            outcome = _Outcome(outcome.execution, treatment.withheld_kind,
                               treatment.content_json, message)
        elif treatment.content_json != outcome.content_json:
            outcome = _Outcome(outcome.execution, outcome.kind, treatment.content_json,
                               outcome.message)
        return outcome, {
            "result_labels": list(treatment.labels),
            "result_rules": list(treatment.rules),
            "redactions": treatment.redactions,
            "result": canonical_loads(outcome.content_json) if treatment.keep_body else None,
        }

    def _decide(self, call: ToolCall, spec: ToolSpec | None, context: CallContext) -> Decision:
        try:
            if self._shadowing is not None:
                decision, diverged = self._shadowing.decide_with_shadow(call, spec, context)
                if diverged is not None:
                    self._record_shadow(call, diverged)
                return decision
            return self.policy.decide(call, spec, context)
        except Exception:
            log.exception("policy_failed", call_id=call.id)
            return Decision(
                "deny",
                (RuleId("gateway.policy-error"),),
                self.policy.digest,
                kind="permission",
                message="the policy could not decide this call, so it is denied",
            )

    def _record_shadow(self, call: ToolCall, body: Mapping[str, JSONValue]) -> None:
        """Sign a shadow divergence; a failure is logged and never touches the call."""
        try:
            record = self.audit.append("policy.shadow_diverged", {**body, **_origin_fields()})
        except Exception:  # the candidate is advisory: the call goes on as decided
            log.exception("policy_shadow_unrecorded", call_id=call.id)
        else:
            log.info("policy_shadow_diverged", call_id=call.id, seq=record.seq)

    def _execute(
        self, call: ToolCall, spec: ToolSpec, decision: Decision, context: CallContext
    ) -> _Outcome:
        try:
            execution = self._run(call, spec, _limits_of(decision, spec), decision, context)
        except Exception as exc:  # noqa: BLE001 - stage boundary; _failed_run re-raises the rest
            return self._failed_run(call, exc)
        return _outcome_of(execution)

    @staticmethod
    def _failed_run(call: ToolCall, exc: Exception) -> _Outcome:
        """
        A run that raised, as ``sandbox_unavailable``.

        Raises:
            CallwardError: ``exc`` itself when it is a callward error of another kind.
        """
        if isinstance(exc, CallwardError):
            if isinstance(exc, SandboxUnavailable):
                return _Outcome(None, "sandbox_unavailable",
                                _error_content(exc.kind, exc.message), exc.message)
            raise exc
        log.error("sandbox_failed", call_id=call.id, exc_info=exc)
        message = f"the sandbox failed unexpectedly ({type(exc).__name__})"
        return _Outcome(None, "sandbox_unavailable",
                        _error_content("sandbox_unavailable", message), message)

    def _run(
        self,
        call: ToolCall,
        spec: ToolSpec,
        limits: ResourceLimits,
        decision: Decision,
        context: CallContext,
    ) -> Execution:
        """
        Run where the decision places the call (``run_as_placed``): a runtime, secrets or
        egress the runner cannot give fail closed; a session it cannot give runs in a
        fresh container, the stricter choice.
        """
        return run_as_placed(self.runner, spec, call, limits, Placement.of(decision, context))

    def _deny(
        self,
        *,
        call: ToolCall,
        spec: ToolSpec | None,
        decision: Decision,
        context: CallContext,
        parse_ms: float,
        policy_ms: float,
    ) -> ToolResult:
        kind = decision.kind if decision.kind is not None else "permission"
        body = self._call_body(call, spec, decision, context)
        body["durations_ms"] = {"parse": parse_ms, "policy": policy_ms}
        started = self._clock()
        record = self._append("callward.audit.denied", "call.denied", body)
        log.info("call_denied", call_id=call.id, kind=kind, rule=decision.reasons[0],
                 seq=record.seq)
        self._notify(CallEvent(
            call_id=call.id, principal=context.principal,
            tool=spec.name if spec is not None else "", outcome=kind, record_kind="call.denied",
            durations_ms=(("parse", parse_ms), ("policy", policy_ms),
                          ("audit_denied", _ms(started, self._clock()))),
            reasons=decision.reasons, seq=record.seq))
        extra: dict[str, JSONValue] = {"rule": decision.reasons[0]}
        if decision.json_path is not None:
            extra["json_path"] = decision.json_path
        return ToolResult(
            call_id=call.id,
            tool=call.name if spec is not None else "",
            kind=kind,
            content_json=_error_content(kind, decision.message, **extra),
            receipt=self._receipt(record),
            decision=decision,
        )

    def _reject(
        self, text: str | Mapping[str, object], error: MalformedCall, context: CallContext
    ) -> ToolResult:
        raw = _message_bytes(text)
        call_id = CallId(self._new_id())
        record = self._append(
            "callward.audit.rejected", "call.rejected",
            {
                "call_id": call_id,
                "principal": context.principal,
                "session_id": context.session_id,
                "kind": "malformed",
                "dialect": error.dialect,
                "offset": error.offset,
                "tool": error.tool,
                "json_path": error.json_path,
                "message": error.message,
                "text_sha256": sha256_hex(raw),
                "text_bytes": len(raw),
                **_origin_fields(),
                **_identity_fields(context),
            },
        )
        log.info("call_rejected", call_id=call_id, dialect=error.dialect, offset=error.offset,
                 seq=record.seq)
        self._notify(CallEvent(call_id=call_id, principal=context.principal, tool="",
                               outcome="malformed", record_kind="call.rejected", seq=record.seq))
        return ToolResult(
            call_id=call_id,
            tool=error.tool,
            kind="malformed",
            content_json=_error_content("malformed", error.message, offset=error.offset,
                                        json_path=error.json_path),
            receipt=self._receipt(record),
        )

    # -- records --------------------------------------------------------------

    def _append(self, span_name: str, kind: str, body: Mapping[str, JSONValue]) -> AuditRecord:
        """
        Append a record in its own span: with tracing on, the body names that span
        (``"trace"``) and the span the record's seq and hash.
        """
        with self.tracing.span(span_name) as span:
            if span.is_recording():
                body = {**body, **self.tracing.record_fields()}
            record = self.audit.append(kind, body)
            annotate_record(span, record)
        return record

    def _receipt(self, record: AuditRecord) -> Receipt:
        """The record's receipt, with an inclusion proof when the log can give one."""
        audit = self.audit
        if self._issuer_of is not audit:  # a Protocol isinstance is slow: once per log
            self._issuer_of = audit
            self._issuer = audit if isinstance(audit, ReceiptIssuer) else None
        if self._issuer is not None:
            return self._issuer.receipt_for(record)
        return record.receipt

    def _image_digest(self) -> str | None:
        try:
            return str(self.runner.image_digest)
        except CallwardError:
            return None

    def _call_body(
        self,
        call: ToolCall,
        spec: ToolSpec | None,
        decision: Decision,
        context: CallContext,
    ) -> dict[str, JSONValue]:
        arguments: JSONValue = None
        elided: tuple[str, ...] = ()
        if spec is not None:
            arguments = call.arguments
            if len(call.arguments_json) > self.max_argument_bytes:
                arguments, elided = elide_large_values(call.arguments, self.max_argument_bytes)
        return {
            "call": {
                "id": call.id,
                "name": call.name[:256],
                "name_sha256": sha256_hex(call.name.encode("utf-8", "surrogatepass")),
                "dialect": call.dialect,
                "arguments": arguments,
                "arguments_sha256": call.arguments_sha256,
                **({"arguments_elided": list(elided)} if elided else {}),
                "expected": call.expected,
            },
            "principal": context.principal,
            "session_id": context.session_id,
            "decision": decision.to_json(),
            "limits": decision.limits.to_json() if decision.limits is not None else None,
            "tool": None if spec is None else {
                "ref": spec.ref, "digest": spec.digest,
                **({} if spec.model is None else {"model": spec.model.to_json()})},
            "image_digest": self._image_digest(),
            **_origin_fields(),
            **_provenance_fields(context),
            **_identity_fields(context),
        }


def _limits_of(decision: Decision, spec: ToolSpec) -> ResourceLimits:
    """The policy's limits for the call, else the tool's own."""
    return decision.limits if decision.limits is not None else spec.limits


def _outcome_of(execution: Execution) -> _Outcome:
    if execution.kind == "ok" and execution.value_json is not None:
        return _Outcome(execution, "ok", execution.value_json, "")
    return _Outcome(execution, execution.kind,
                    _error_content(execution.kind, execution.message), execution.message)


def _provenance_fields(context: CallContext) -> dict[str, JSONValue]:
    return {} if context.provenance is None else {"provenance": context.provenance.to_json()}


def _identity_fields(context: CallContext) -> dict[str, JSONValue]:
    """The caller's token identity (issuer, roles, groups, ``jti`` hash), never the token."""
    return {} if context.identity is None else {"identity": context.identity.to_json()}


def _origin_fields() -> dict[str, JSONValue]:
    origin = _ORIGIN.get()
    return {} if origin is None else {"model": origin}


def _message_bytes(text: str | Mapping[str, object]) -> bytes:
    """The bytes of a model message, for its hash in a ``call.rejected`` record."""
    if isinstance(text, str):
        return text.encode("utf-8", "surrogatepass")
    try:
        return canonical_bytes(dict(text))
    except ValueError:
        return repr(text).encode("utf-8", "backslashreplace")
