"""
Test doubles for callward's backends. **For tests only**: nothing here isolates,
signs or stores anything, and no deployment should construct one.

They stand in for what a unit test cannot start (STYLE.md §6) and are handed to the
gateway like any backend, never patched in:

- ``StubRunner``: a ``ToolRunner`` that starts no container. Each tool's
  ``Execution`` is canned, or computed in-process from the call's arguments; it
  records every run and reports the image digest it is given.
- ``StubPlacingRunner``: the same, as a ``PlacingToolRunner``, recording the
  ``Placement`` (isolation, runtime, secrets, egress) each placed run is handed.
- ``StubFailingAuditLog``: wraps a real ``AuditLog`` and fails with
  ``AuditUnavailable`` on the Nth append, from the Nth on, or on given record kinds,
  like a disk that fills at the Nth write.
- ``ok_execution``, ``failed_execution`` and ``computed``: the answers a stub runner
  gives; ``kinds``: the kinds of an audit log's records, in order.

This module imports the kernel only, so any test may use it without loading a stage.

Example::

    >>> from callward.core import ResourceLimits, ToolCall, ToolSpec, sha256_hex
    >>> from callward.core.testing import StubRunner, computed
    >>> spec = ToolSpec(name="square", version="1.0.0", description="x squared",
    ...                 source="def square(x):\\n    return x * x\\n", entrypoint="square",
    ...                 parameters_json=b"{}", digest=sha256_hex(b"square"))
    >>> runner = StubRunner(computed(lambda x: x * x))
    >>> call = ToolCall.create(id="c1", name="square", arguments={"x": 3}, dialect="api")
    >>> runner.run(spec, call, ResourceLimits()).value
    9
    >>> [call.name for call in runner.calls]
    ['square']
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol, TypeAlias, runtime_checkable

from callward.core._canonical import JSONValue, Sha256Hex, canonical_bytes
from callward.core.errors import AuditUnavailable, SandboxUnavailable, ToolFailureKind
from callward.core.protocols import AuditLog
from callward.core.types import (
    AuditRecord,
    Execution,
    Placement,
    ResourceLimits,
    ToolCall,
    ToolSpec,
    Usage,
)

if TYPE_CHECKING:
    from callward.core.protocols import PlacingToolRunner, ToolRunner

#: The image digest a ``StubRunner`` reports unless it is given another.
STUB_IMAGE_DIGEST: Final = Sha256Hex("ab" * 32)

#: How a stub runner answers one run: from the spec, the call and the limits.
ToolAnswer: TypeAlias = Callable[[ToolSpec, ToolCall, ResourceLimits], Execution]


def ok_execution(value: JSONValue) -> Execution:
    """An execution that ended with ``value``, as a tool that returned it would."""
    value_json = canonical_bytes(value)
    return Execution("ok", value_json, "", Usage(wall_ms=1.0, exit_code=0,
                                                  output_bytes=len(value_json)))


def failed_execution(
    kind: ToolFailureKind = "tool_error", message: str = "the tool raised RuntimeError"
) -> Execution:
    """An execution that ended in a tool failure ``kind`` (the tool broke, or hit a limit)."""
    return Execution(kind, None, message, Usage(wall_ms=1.0, exit_code=1, output_bytes=0))


def computed(function: Callable[..., JSONValue]) -> ToolAnswer:
    """
    An answer computed in-process: ``function(**call.arguments)``, as the sandbox would
    call the tool. An exception ends the execution as ``tool_error``, naming only the
    exception's type (as the sandbox does, never its text, which can hold values).
    """

    def answer(spec: ToolSpec, call: ToolCall, limits: ResourceLimits) -> Execution:
        try:
            value = function(**call.arguments)
        except Exception as exc:  # noqa: BLE001 - a tool's exception is its tool_error
            return failed_execution("tool_error", f"the tool raised {type(exc).__name__}")
        return ok_execution(value)

    return answer


@dataclass(frozen=True, slots=True)
class StubRun:
    """
    One run a stub runner was asked for, whatever it answered.

    Attributes:
        placement: What ``run_placed`` was handed; None for a plain ``run``.
    """

    spec: ToolSpec
    call: ToolCall
    limits: ResourceLimits
    placement: Placement | None = None


class StubRunner:
    """
    A ``ToolRunner`` that starts nothing: each tool's execution is canned or computed.

    Every run is recorded before it is answered, so a test can prove a tool was never
    asked to run (``[] == runner.calls``). Safe to call from several threads.

    Args:
        answer: The answer of every tool without its own in ``tools``: an
            ``Execution``, or a function of ``(spec, call, limits)`` that returns one
            or raises (``SandboxUnavailable``, as a runner that cannot run does).
            None: such a run raises ``SandboxUnavailable`` (a stub is told each answer).
        tools: Answers by tool name, taken before ``answer``.
        image_digest: The digest it reports as its sandbox image's.
        before: Called with each call after it is recorded and before it is
            answered, e.g. to hold calls at a barrier and prove they run at once.
    """

    def __init__(
        self,
        answer: Execution | ToolAnswer | None = None,
        *,
        tools: Mapping[str, Execution | ToolAnswer] | None = None,
        image_digest: Sha256Hex = STUB_IMAGE_DIGEST,
        before: Callable[[ToolCall], None] | None = None,
    ) -> None:
        self._answer = answer
        self._tools = dict(tools or {})
        self._image_digest = image_digest
        self._before = before
        self._runs: list[StubRun] = []
        self._lock = threading.Lock()

    @property
    def image_digest(self) -> Sha256Hex:
        return self._image_digest

    @property
    def runs(self) -> list[StubRun]:
        """Every run asked for, in order (a copy)."""
        with self._lock:
            return list(self._runs)

    @property
    def calls(self) -> list[ToolCall]:
        """The call of every run asked for, in order."""
        return [run.call for run in self.runs]

    @property
    def specs(self) -> list[ToolSpec]:
        """The spec of every run asked for, in order."""
        return [run.spec for run in self.runs]

    def run(self, spec: ToolSpec, call: ToolCall, limits: ResourceLimits) -> Execution:
        """
        Record the run, then answer it.

        Raises:
            SandboxUnavailable: The stub has no answer for ``spec.name``, or its answer
                raised it.
        """
        return self._answer_run(StubRun(spec, call, limits))

    def _answer_run(self, run: StubRun) -> Execution:
        with self._lock:
            self._runs.append(run)
        if self._before is not None:
            self._before(run.call)
        answer = self._tools.get(run.spec.name, self._answer)
        if answer is None:
            raise SandboxUnavailable(f"StubRunner has no answer for the tool {run.spec.name}")
        if isinstance(answer, Execution):
            return answer
        return answer(run.spec, run.call, run.limits)


class StubPlacingRunner(StubRunner):
    """
    A ``StubRunner`` that is also a ``PlacingToolRunner``: a placed run is recorded
    with its placement (isolation, runtime, secrets, egress), then answered as ``run``.
    """

    @property
    def placed(self) -> list[StubRun]:
        """The runs that came through ``run_placed``, in order."""
        return [run for run in self.runs if run.placement is not None]

    def run_placed(
        self, spec: ToolSpec, call: ToolCall, limits: ResourceLimits, placement: Placement
    ) -> Execution:
        """
        Record the run with its placement, then answer it as ``run`` does.

        Raises:
            SandboxUnavailable: The stub has no answer for ``spec.name``, or its answer
                raised it.
        """
        return self._answer_run(StubRun(spec, call, limits, placement))


class StubFailingAuditLog:
    """
    A real ``AuditLog`` whose appends fail on demand with ``AuditUnavailable``, like a
    disk that fills at the Nth write. An append that fails reaches the wrapped log
    not at all; every other is the wrapped log's own.

    Only ``append`` is passed through: to the gateway this is a plain ``AuditLog``,
    one that issues no receipts with proofs.

    Args:
        log: The log that keeps the appends that succeed.
        fail_on: Fail the Nth append only (counted from 1, failed ones included).
        fail_from: Fail the Nth append and every later one (1: every append).
        fail_kinds: Fail every append of these record kinds.

    Attributes:
        appends: How many appends were asked for, failed ones included.
        refused: The kinds of the appends that failed, in order.

    Raises:
        ValueError: No failure is asked for, both counts are, or a count is below 1.
    """

    def __init__(
        self,
        log: AuditLog,
        *,
        fail_on: int | None = None,
        fail_from: int | None = None,
        fail_kinds: Collection[str] = (),
        message: str = "injected: the disk is full",
    ) -> None:
        if fail_on is None and fail_from is None and not fail_kinds:
            raise ValueError("say which appends fail: fail_on, fail_from or fail_kinds")
        if fail_on is not None and fail_from is not None:
            raise ValueError("fail_on (one append) and fail_from (from then on) exclude each other")
        if any(count is not None and count < 1 for count in (fail_on, fail_from)):
            raise ValueError("appends are counted from 1")
        self.log = log
        self._fail_on = fail_on
        self._fail_from = fail_from
        self._fail_kinds = frozenset(fail_kinds)
        self._message = message
        self.appends = 0
        self.refused: list[str] = []
        self._lock = threading.Lock()

    def append(self, kind: str, body: Mapping[str, JSONValue]) -> AuditRecord:
        """
        Append through the wrapped log, unless this append is one to fail.

        Raises:
            AuditUnavailable: This append is one to fail, or the wrapped log failed.
        """
        with self._lock:
            self.appends += 1
            number = self.appends
            failing = (
                number == self._fail_on
                or (self._fail_from is not None and number >= self._fail_from)
                or kind in self._fail_kinds
            )
            if failing:
                self.refused.append(kind)
        if failing:
            raise AuditUnavailable(self._message)
        return self.log.append(kind, body)


@runtime_checkable
class RecordSource(Protocol):
    """An audit log that can list its records in seq order (``SQLiteAuditStore``)."""

    def records(self) -> Iterable[AuditRecord]: ...


def kinds(log: RecordSource | Iterable[AuditRecord]) -> list[str]:
    """
    The kinds of an audit log's records, in seq order.

    Args:
        log: A log with ``records()``, or the records themselves (e.g. what
            ``callward.audit.read_records`` reads from a file).
    """
    records = log.records() if isinstance(log, RecordSource) else log
    return [record.kind for record in records]


if TYPE_CHECKING:
    # mypy checks that each double satisfies the Protocol it stands in for.
    def _satisfies_protocols(log: AuditLog) -> None:
        runner: ToolRunner = StubRunner()
        placing: PlacingToolRunner = StubPlacingRunner()
        failing: AuditLog = StubFailingAuditLog(log, fail_on=1)
        del runner, placing, failing


__all__ = [
    "STUB_IMAGE_DIGEST",
    "RecordSource",
    "StubFailingAuditLog",
    "StubPlacingRunner",
    "StubRun",
    "StubRunner",
    "ToolAnswer",
    "computed",
    "failed_execution",
    "kinds",
    "ok_execution",
]
