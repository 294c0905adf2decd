"""
The three stages the gateway is handed, as small Protocols.

``callward.policies``, ``callward.sandbox`` and ``callward.audit`` each provide
a concrete class that satisfies one of these without importing the others;
tests pass ``Fake*``/``Stub*`` implementations the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

from callward.core._canonical import JSONValue, Sha256Hex
from callward.core.errors import SandboxUnavailable
from callward.core.types import (
    AuditRecord,
    CallContext,
    Decision,
    Execution,
    Placement,
    Receipt,
    ResourceLimits,
    ResultTreatment,
    ToolCall,
    ToolSpec,
)


class PolicyEngine(Protocol):
    """Decides whether one call may run. Never raises for a bad call: it denies."""

    @property
    def digest(self) -> Sha256Hex: ...

    def decide(self, call: ToolCall, spec: ToolSpec | None, context: CallContext) -> Decision:
        """
        Decide one call.

        Args:
            spec: The registered tool, or None when the name is unknown (always a denial).
        """
        ...

    def may_discover(self, spec: ToolSpec, context: CallContext) -> bool:
        """
        Whether a listing of tools shows ``spec`` to this caller: some call of it could
        be allowed. Hiding is not deciding: a hidden tool called by name is still
        decided, and denied. When in doubt, False.
        """
        ...


class PolicyReload(Protocol):
    """What a policy reload did; the gateway audits it (policy.reloaded / policy.reload_failed)."""

    @property
    def ok(self) -> bool: ...

    def to_json(self) -> dict[str, JSONValue]: ...


@runtime_checkable
class PolicyHooks(Protocol):
    """
    What a policy engine may add to deciding; the gateway uses it when the engine has it.

    ``observe_result`` runs after the tool and before ``call.completed`` is written:
    it may redact the result, decides whether the audit keeps its body, and records
    the result's data-flow labels for later calls in the session. ``poll_reload``
    runs before each decision and reports a reload for the gateway to audit.
    """

    def observe_result(
        self, call: ToolCall, spec: ToolSpec, context: CallContext, content_json: bytes
    ) -> ResultTreatment: ...

    def poll_reload(self) -> PolicyReload | None: ...


@runtime_checkable
class ShadowingPolicy(Protocol):
    """
    A policy engine that decides a candidate (shadow) policy beside the enforced one.

    ``decide_with_shadow`` returns the enforced decision and, when the candidate
    decided otherwise, the body of a ``policy.shadow_diverged`` record, which the
    gateway signs into the audit log. The candidate is never enforced: whatever it
    does, the enforced decision stands.
    """

    def decide_with_shadow(
        self, call: ToolCall, spec: ToolSpec | None, context: CallContext
    ) -> tuple[Decision, Mapping[str, JSONValue] | None]: ...


class ToolRunner(Protocol):
    """Runs one tool invocation in isolation and reports how it ended."""

    @property
    def image_digest(self) -> Sha256Hex: ...

    def run(self, spec: ToolSpec, call: ToolCall, limits: ResourceLimits) -> Execution:
        """
        Run ``spec`` with ``call``'s arguments under ``limits``.

        Returns an ``Execution`` for every way the tool itself can end (a value,
        an exception, a limit hit).

        Raises:
            SandboxUnavailable: The sandbox could not run the tool at all.
        """
        ...


@runtime_checkable
class PlacingToolRunner(ToolRunner, Protocol):
    """
    A ``ToolRunner`` that also runs where the policy says: in an agent session's
    container, on another runtime (gVisor), with secrets, with egress.
    """

    def run_placed(
        self, spec: ToolSpec, call: ToolCall, limits: ResourceLimits, placement: Placement
    ) -> Execution:
        """
        Run like ``run``, where ``placement`` says: in its isolation and on its runtime
        (None: the runner's own), handing the execution the named secrets and letting
        it reach the egress targets (``host:port``).

        Raises:
            SandboxUnavailable: The sandbox could not run the tool at all, or cannot
                give what the placement asks (it never runs the tool with less).
        """
        ...


def run_as_placed(
    runner: ToolRunner, spec: ToolSpec, call: ToolCall, limits: ResourceLimits,
    placement: Placement,
) -> Execution:
    """
    Run on ``runner`` where ``placement`` says: the one way a call is handed to a
    runner, by the gateway and by every runner that passes calls on to another.

    A placement any runner may take (``placement.anywhere``) is a plain ``run``; any
    other goes to a ``PlacingToolRunner``'s ``run_placed``. A runner that cannot place
    fails closed (``refuse_placement``) on secrets, egress and a runtime, and runs a
    ``session`` call in a fresh container of its own: the stricter choice.

    Raises:
        SandboxUnavailable: The runner could not run the tool, or cannot place it.
    """
    if placement.anywhere:
        return runner.run(spec, call, limits)
    if isinstance(runner, PlacingToolRunner):
        return runner.run_placed(spec, call, limits, placement)
    refuse_placement(spec, placement)
    return runner.run(spec, call, limits)


def refuse_placement(spec: ToolSpec, placement: Placement) -> None:
    """
    Refuse what a runner that cannot place would otherwise drop: secrets, egress, a runtime.

    Raises:
        SandboxUnavailable: ``placement`` grants secrets or egress, or names a runtime.
    """
    if placement.secrets or placement.egress:
        raise SandboxUnavailable(
            f"the policy grants {spec.name} secrets or egress, "
            "and this sandbox cannot hand them over"
        )
    if placement.runtime is not None:
        raise SandboxUnavailable(
            f"the policy runs {spec.name} on {placement.runtime}, "
            "and this sandbox cannot choose its runtime"
        )


class AuditLog(Protocol):
    """An append-only log of signed records."""

    def append(self, kind: str, body: Mapping[str, JSONValue]) -> AuditRecord:
        """
        Sign ``body`` as the next record and commit it before returning. A
        ``call.authorized`` is durable (on disk) before this returns; a store may let
        records that report on finished work (``call.completed``, ``call.denied``,
        ``call.rejected``) reach the disk with its next durable commit.

        Raises:
            AuditUnavailable: The record is not committed; the caller must not proceed.
        """
        ...


@runtime_checkable
class ReceiptIssuer(Protocol):
    """An audit log that can prove a record's inclusion under a signed checkpoint."""

    def receipt_for(self, record: AuditRecord) -> Receipt:
        """
        The record's receipt with its inclusion proof and signed checkpoint.

        Raises:
            AuditUnavailable: The proof could not be made; the caller must not proceed.
        """
        ...
