"""
Running a plan: every step through ``Gateway.handle``, independent steps at once.

Invariants:

- Nothing runs before the whole plan is valid against the gateway's registry;
  a refused plan is audited as ``plan.rejected``.
- Every step is a call through ``Gateway.handle`` (policy, sandbox, audit,
  receipt), with the step's provenance: for each argument filled by a ``$ref``,
  the source step, its call id, the output path and the seq of the source's
  ``call.completed`` record. The policy checks flow labels per value with it,
  and every record of the call names it.
- A step that did not end ``ok`` skips every step that depends on it, each with
  the reason (``skipped: dependency X ended <kind>``) in a ``plan.step_skipped``
  record; a ``$ref`` that does not resolve fails its step (``plan.step_failed``,
  kind ``unresolved_ref``) without calling the tool.
- ``plan.started`` (the plan digest and its steps) comes before any step;
  ``plan.completed`` (each step's outcome and receipt seq) after the last.
- A plan runs in a session of its own unless told otherwise, so the labels of
  earlier, model-driven calls do not taint its literal arguments and the
  labels of its steps do not taint other sessions.

With tracing on (the gateway's ``Tracing``), a plan run is one trace: a
``callward.plan {name}`` span holding its records' spans and each step's
``execute_tool`` span, whichever worker thread runs the step.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

import structlog

from callward.core._canonical import JSONValue, canonical_loads, sha256_hex
from callward.core.errors import DENY_KINDS
from callward.core.observe._tracing import annotate_outcome
from callward.core.plans._document import (
    DEFAULT_MAX_PARALLEL,
    MAX_PARALLEL,
    Plan,
    PlanInvalid,
    PlanStep,
    RefUnresolved,
    load_plan,
    substitute,
)
from callward.core.types import CallId, Provenance, ProvenanceEdge, Receipt, ToolCall

if TYPE_CHECKING:
    from callward.core.gateway import Gateway

log = structlog.get_logger()

StepStatus = Literal["ok", "denied", "failed", "skipped"]
UNRESOLVED_REF: Final = "unresolved_ref"
SKIPPED: Final = "skipped"


@dataclass(frozen=True, slots=True)
class StepOutcome:
    """
    How one step ended.

    Attributes:
        kind: The call's result kind (``ok``, a denial, a tool or infrastructure
            failure), ``unresolved_ref``, or ``skipped``.
        receipt: The receipt of the record that explains it: the call's, or the
            ``plan.step_failed``/``plan.step_skipped`` record's.
        output_json: The result the tool returned (after the policy's result rules).
    """

    step: str
    tool: str
    status: StepStatus
    kind: str
    message: str
    receipt: Receipt | None
    call_id: str | None = None
    output_json: bytes | None = None
    provenance: tuple[ProvenanceEdge, ...] = ()
    wall_ms: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict[str, JSONValue]:
        return {
            "step": self.step, "tool": self.tool, "status": self.status, "kind": self.kind,
            "message": self.message, "call_id": self.call_id,
            "output": None if self.output_json is None else canonical_loads(self.output_json),
            "provenance": [edge.to_json() for edge in self.provenance],
            "receipt": None if self.receipt is None else self.receipt.to_json(),
            "wall_ms": self.wall_ms,
        }


@dataclass(frozen=True, slots=True)
class PlanReport:
    """What a plan run did: every step's outcome in plan order, and the plan records."""

    plan_digest: str
    name: str
    session_id: str
    outcomes: tuple[StepOutcome, ...]
    started: Receipt
    completed: Receipt
    wall_ms: float

    @property
    def ok(self) -> bool:
        return all(outcome.ok for outcome in self.outcomes)

    def outcome(self, step: str) -> StepOutcome:
        return next(o for o in self.outcomes if o.step == step)

    def to_json(self) -> dict[str, JSONValue]:
        return {"plan": self.name, "plan_digest": self.plan_digest, "ok": self.ok,
                "session_id": self.session_id, "wall_ms": self.wall_ms,
                "steps": [outcome.to_json() for outcome in self.outcomes],
                "started": self.started.to_json(), "completed": self.completed.to_json()}


def reject_plan(gateway: Gateway, error: PlanInvalid, *, principal: str,
                text: bytes | None = None) -> Receipt:
    """
    Audit a refused plan as ``plan.rejected``.

    Raises:
        AuditUnavailable: The record is not durable.
    """
    body: dict[str, JSONValue] = {
        "source": error.source[:1024], "principal": principal,
        "problems": [problem.to_json() for problem in error.problems[:100]],
        "plan_sha256": None if text is None else sha256_hex(text),
    }
    return gateway.record("plan.rejected", body)


def run_plan_file(gateway: Gateway, path: Path, *, principal: str,
                  session_id: str | None = None, max_parallel: int | None = None) -> PlanReport:
    """
    Load a plan file, check it against the gateway's registry and run it.

    Raises:
        PlanInvalid: The plan is refused (and audited as ``plan.rejected``); nothing ran.
        AuditUnavailable: A record could not be written.
    """
    try:
        text = path.read_bytes()
    except OSError:
        text = None
    try:
        plan = load_plan(path, tools={spec.name for spec in gateway.registry})
    except PlanInvalid as exc:
        reject_plan(gateway, exc, principal=principal, text=text)
        raise
    return run_plan(gateway, plan, principal=principal, session_id=session_id,
                    max_parallel=max_parallel)


def run_plan(gateway: Gateway, plan: Plan, *, principal: str,
             session_id: str | None = None, max_parallel: int | None = None,
             literal_labels: frozenset[str] = frozenset()) -> PlanReport:
    """
    Run every step of ``plan`` through ``gateway``, independent steps in parallel.

    Args:
        session_id: The policy session of every step; default a fresh ``plan_…`` one.
        max_parallel: At most this many steps at once (default: the plan's, else 4).
        literal_labels: Labels the plan's literal arguments carry, for a plan whose
            text came from labelled data (e.g. written by a model that read a secret).

    Raises:
        PlanInvalid: A tool is not registered (audited as ``plan.rejected``); nothing ran.
        ValueError: ``max_parallel`` is out of range.
        AuditUnavailable: A record could not be written; no later step is started.
    """
    try:
        plan.check_tools({spec.name for spec in gateway.registry})
    except PlanInvalid as exc:
        reject_plan(gateway, exc, principal=principal)
        raise
    limit = max_parallel or plan.max_parallel or DEFAULT_MAX_PARALLEL
    if not 1 <= limit <= MAX_PARALLEL:
        raise ValueError(f"max_parallel is from 1 to {MAX_PARALLEL}")
    run = _PlanRun(gateway, plan, principal=principal,
                   session_id=session_id or f"plan_{uuid.uuid4().hex[:20]}",
                   literal_labels=literal_labels)
    return run.run(limit)


class _PlanRun:
    """One run of one plan: the scheduler (one thread) and the steps (a pool)."""

    def __init__(self, gateway: Gateway, plan: Plan, *, principal: str, session_id: str,
                 literal_labels: frozenset[str]) -> None:
        self._gateway = gateway
        self._plan = plan
        self._principal = principal
        self._session_id = session_id
        self._literal_labels = literal_labels
        self._outcomes: dict[str, StepOutcome] = {}

    def run(self, limit: int) -> PlanReport:
        plan = self._plan
        with self._gateway.tracing.plan_span(plan.name, plan.digest, len(plan.steps)) as span:
            report = self._run(limit)
            annotate_outcome(span, "ok" if report.ok else "failed")
            return report

    def _run(self, limit: int) -> PlanReport:
        plan = self._plan
        started_at = time.perf_counter()
        started = self._gateway.record("plan.started", {
            **self._plan_fields(), "max_parallel": limit,
            "steps": [step.to_json() for step in plan.steps]})
        log.info("plan_started", plan_digest=plan.digest, steps=len(plan.steps), seq=started.seq)
        waiting = {step.id: set(step.depends_on) for step in plan.steps}
        ready = [step_id for step_id in plan.order if not waiting[step_id]]
        running: dict[concurrent.futures.Future[StepOutcome], str] = {}
        with concurrent.futures.ThreadPoolExecutor(max_workers=limit,
                                                   thread_name_prefix="callward-plan") as pool:
            try:
                while ready or running:
                    while ready and len(running) < limit:
                        step = plan.step(ready.pop(0))
                        # In this thread's context, so the step's spans join the plan's.
                        running[pool.submit(contextvars.copy_context().run,
                                            self._run_step, step)] = step.id
                    done, _ = concurrent.futures.wait(
                        running, return_when=concurrent.futures.FIRST_COMPLETED)
                    for future in done:
                        del running[future]
                        self._settle(future.result(), waiting, ready)
            except BaseException:
                for future in running:
                    future.cancel()
                raise
        outcomes = tuple(self._outcomes[step.id] for step in plan.steps)
        completed = self._gateway.record("plan.completed", {
            **self._plan_fields(), "ok": all(o.ok for o in outcomes),
            "steps": [{"step": o.step, "status": o.status, "kind": o.kind, "call_id": o.call_id,
                       "seq": None if o.receipt is None else o.receipt.seq} for o in outcomes]})
        wall_ms = round((time.perf_counter() - started_at) * 1000, 3)
        log.info("plan_completed", plan_digest=plan.digest, seq=completed.seq, wall_ms=wall_ms)
        return PlanReport(plan.digest, plan.name, self._session_id, outcomes, started,
                          completed, wall_ms)

    def _plan_fields(self) -> dict[str, JSONValue]:
        return {"plan_digest": self._plan.digest, "name": self._plan.name,
                "principal": self._principal, "session_id": self._session_id}

    def _settle(self, outcome: StepOutcome, waiting: dict[str, set[str]],
                ready: list[str]) -> None:
        """Record an outcome; release the dependents it unblocks, skip those it dooms."""
        self._outcomes[outcome.step] = outcome
        for dependent in self._plan.dependents(outcome.step):
            if dependent in self._outcomes:
                continue
            if not outcome.ok:
                self._settle(self._skip(self._plan.step(dependent), outcome), waiting, ready)
                continue
            waiting[dependent].discard(outcome.step)
            if not waiting[dependent]:
                ready.append(dependent)

    def _skip(self, step: PlanStep, cause: StepOutcome) -> StepOutcome:
        message = f"skipped: dependency {cause.step} ended {cause.kind}"
        receipt = self._gateway.record("plan.step_skipped", {
            **self._plan_fields(), "step": step.id, "tool": step.tool, "message": message,
            "dependency": cause.step, "dependency_kind": cause.kind,
            "dependency_seq": None if cause.receipt is None else cause.receipt.seq})
        log.info("plan_step_skipped", step=step.id, dependency=cause.step, kind=cause.kind)
        return StepOutcome(step.id, step.tool, "skipped", SKIPPED, message, receipt)

    def _run_step(self, step: PlanStep) -> StepOutcome:
        """Resolve the step's references, then call its tool through the gateway."""
        started = time.perf_counter()
        values: dict[str, JSONValue] = {}
        edges: list[ProvenanceEdge] = []
        for pointer, ref in step.refs:
            source = self._outcomes[ref.step]
            output_json = source.output_json if source.output_json is not None else b"null"
            try:
                values[pointer] = ref.resolve(canonical_loads(output_json))
            except RefUnresolved as exc:
                return self._unresolved(step, pointer, ref.text, str(exc), started)
            if source.call_id is None or source.receipt is None:  # pragma: no cover
                raise ValueError("an ok step has a call id and a receipt")
            edges.append(ProvenanceEdge(pointer, ref.step, CallId(source.call_id),
                                        ref.output_path, source.receipt.seq))
        arguments = substitute(step.arguments, values)
        if not isinstance(arguments, Mapping):  # pragma: no cover - validation keeps an object
            raise TypeError("step arguments are an object")
        call = ToolCall.create(id=self._gateway.new_id(), name=step.tool, arguments=arguments,
                               dialect="api")
        result = self._gateway.handle(
            call, principal=self._principal, session_id=self._session_id,
            provenance=Provenance(tuple(edges), self._literal_labels))
        status: StepStatus = ("ok" if result.kind == "ok" else
                              "denied" if result.kind in DENY_KINDS else "failed")
        message = ""
        if result.kind != "ok":
            error = canonical_loads(result.content_json)
            message = str(error.get("message", "")) if isinstance(error, dict) else ""
        return StepOutcome(step.id, step.tool, status, result.kind, message, result.receipt,
                           call_id=call.id,
                           output_json=result.content_json if result.kind == "ok" else None,
                           provenance=tuple(edges), wall_ms=_ms_since(started))

    def _unresolved(self, step: PlanStep, pointer: str, ref: str, reason: str,
                    started: float) -> StepOutcome:
        message = f"$ref {ref} does not resolve: {reason}"
        receipt = self._gateway.record("plan.step_failed", {
            **self._plan_fields(), "step": step.id, "tool": step.tool, "kind": UNRESOLVED_REF,
            "argument": pointer, "ref": ref, "message": message})
        log.info("plan_step_failed", step=step.id, kind=UNRESOLVED_REF)
        return StepOutcome(step.id, step.tool, "failed", UNRESOLVED_REF, message, receipt,
                           wall_ms=_ms_since(started))


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
