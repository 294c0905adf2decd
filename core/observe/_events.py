"""
What the gateway hands its observers once a call is finished.

Kept apart from ``_metrics`` so the gateway does not import the Prometheus client;
the stages are listed in ``callward.core.observe._metrics``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from callward.core._canonical import JSONValue


@dataclass(frozen=True, slots=True)
class CallEvent:
    """
    One finished call, as its observers see it.

    Attributes:
        call_id: The call's id.
        principal: Who made the call.
        tool: The registered tool name; ``""`` when no tool of that name is registered.
        outcome: The result kind (``ok``, a denial kind, a tool failure, …).
        record_kind: ``call.completed``, ``call.denied`` or ``call.rejected``.
        result_bytes: Bytes of the result the model got (0 for a denial).
        durations_ms: Stage name to milliseconds, for the stages the call went through.
        reasons: The rule ids of the decision.
        seq: The seq of the final record.
    """

    call_id: str
    principal: str
    tool: str
    outcome: str
    record_kind: str
    result_bytes: int = 0
    durations_ms: tuple[tuple[str, float], ...] = ()
    reasons: tuple[str, ...] = ()
    seq: int = 0

    def __post_init__(self) -> None:
        if self.record_kind not in {"call.completed", "call.denied", "call.rejected"}:
            raise ValueError(f"not a final call record kind: {self.record_kind!r}")
        if self.result_bytes < 0:
            raise ValueError("result_bytes is not negative")

    @property
    def denied(self) -> bool:
        return self.record_kind == "call.denied"

    @property
    def total_ms(self) -> float:
        """The call's time in the gateway: its stages summed (``queue`` is in ``sandbox``)."""
        return sum(ms for stage, ms in self.durations_ms if stage != "queue")


@runtime_checkable
class CallObserver(Protocol):
    """Sees every finished call after its final record is durable. Must be quick."""

    def observe(self, event: CallEvent) -> None: ...


@runtime_checkable
class RecordObserver(Protocol):
    """Sees the records written through ``Gateway.record`` (e.g. ``model.turn``)."""

    def observe_record(self, kind: str, body: Mapping[str, JSONValue]) -> None: ...
