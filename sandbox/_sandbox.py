"""
The public sandbox: it places each call and keeps its limits, around any ``SandboxBackend``.

Invariants:

- Placement is decided here, never in a backend. ``session`` isolation runs the call
  in the container of exactly its (principal, session id), ``call`` isolation in one
  used for it alone; a runtime other than this sandbox's runs on a backend of its own
  for that runtime, made on first use and closed with this sandbox.
- Secrets are read from the ``SecretSource`` for the one execution that was granted
  them, all before a runner is asked for (a missing one is ``SecretUnavailable``);
  they travel only inside its request, and are cut from what it returns.
- The wall clock and the output cap are kept here (``exchange``): every read of the
  runner's output is bounded by the time left; the exchange stops at the deadline, or
  once more than ``limits.output_bytes`` were written, holding no more than that much
  stdout; the backend then kills the runner. ``interpret()`` judges both limits once
  more on what was observed.
- Every runner a backend opened is finished exactly once, whatever happened.
- A warm runner the engine lost before it answered is replaced once by one started
  for the call; a second failure is the engine's (``SandboxUnavailable``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Self

import structlog

from callward.core import (
    Execution,
    Isolation,
    Placement,
    ResourceLimits,
    Runtime,
    SandboxUnavailable,
    Sha256Hex,
    ToolCall,
    ToolSpec,
)
from callward.sandbox._interpret import (
    DEADLINE_GRACE_SECONDS,
    has_runner_result,
    interpret,
    redact_secrets,
)
from callward.sandbox._secrets import SecretSource, read_secrets
from callward.sandbox.base import (
    Ending,
    RawExecution,
    RunnerChannel,
    RunnerStream,
    SandboxBackend,
    request_bytes,
    session_container_key,
)

log = structlog.get_logger()


class Sandbox:
    """
    A ``PlacingToolRunner`` on any ``SandboxBackend``; it places calls and enforces the limits.

    Args:
        backend: The engine that provides runners on ``runtime``.
        runtime: The runtime ``backend`` runs containers on.
        backend_for: Makes the backend for another runtime, on first use; without it, a
            placement on another runtime fails closed.
        secrets: Where granted secrets are read from; without one, a call that needs
            a secret fails closed.
        clock: Monotonic seconds, injected for tests.
    """

    def __init__(
        self,
        backend: SandboxBackend,
        *,
        runtime: Runtime = "runc",
        backend_for: Callable[[Runtime], SandboxBackend] | None = None,
        secrets: SecretSource | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._backend = backend
        self._runtime: Runtime = runtime
        self._backend_for = backend_for
        self._others: dict[Runtime, SandboxBackend] = {}
        self._secret_source = secrets
        self._clock = clock
        self._lock = threading.Lock()

    @property
    def backend(self) -> SandboxBackend:
        """The backend of this sandbox's own runtime."""
        return self._backend

    @property
    def image_digest(self) -> Sha256Hex:
        """
        The digest of the image every call runs in.

        Raises:
            SandboxUnavailable: The backend cannot say (its engine cannot be reached).
        """
        return self._backend.image_digest

    def run(
        self,
        spec: ToolSpec,
        call: ToolCall,
        limits: ResourceLimits,
        *,
        isolation: Isolation = "call",
        principal: str = "",
        session_id: str = "",
        secrets: tuple[str, ...] = (),
        egress: tuple[str, ...] = (),
    ) -> Execution:
        """
        Run ``spec`` with ``call``'s arguments under ``limits``; the keywords are those
        of a ``Placement`` (on this sandbox's runtime), for ``run_placed``.

        Raises:
            As ``run_placed``; and ``ValueError`` for a placement that cannot exist
            (``session`` isolation without a principal).
        """
        placement = Placement(isolation=isolation, principal=principal, session_id=session_id,
                              secrets=secrets, egress=egress)
        return self.run_placed(spec, call, limits, placement)

    def run_placed(
        self, spec: ToolSpec, call: ToolCall, limits: ResourceLimits, placement: Placement
    ) -> Execution:
        """
        Run ``spec`` with ``call``'s arguments under ``limits``, where ``placement`` says.

        Returns an ``Execution`` for every way the tool can end.

        Raises:
            SecretUnavailable: A granted secret cannot be read; nothing ran.
            SandboxUnavailable: The backend could not run the tool at all, or cannot
                give the placement (another runtime without ``backend_for``, egress
                where its runtime has no network).
        """
        clog = log.bind(call_id=call.id, tool=spec.ref, isolation=placement.isolation)
        values = read_secrets(self._secret_source, placement.secrets)
        backend = self._backend_on(spec, placement.runtime)
        session = ("" if placement.isolation == "call"
                   else session_container_key(placement.principal, placement.session_id))
        started = self._clock()
        raw = self._execute(backend, _Request(spec, call, limits, session, values),
                            placement.egress)
        elapsed = self._clock() - started
        execution = interpret(raw, limits)
        if values:
            execution = redact_secrets(execution, values)
        clog.info(
            "sandbox_call_finished",
            kind=execution.kind,
            exit_code=raw.exit_code,
            tool_ms=round(raw.wall_seconds * 1000, 3),
            total_ms=round(elapsed * 1000, 3),
            output_bytes=raw.output_bytes,
            container_id=raw.container_id[:12],
            secrets=len(values),
            egress_refused=raw.egress_refused,
        )
        return execution

    def end_session(self, principal: str, session_id: str) -> None:
        """Remove the containers of one agent session, on every runtime, if it has any."""
        key = session_container_key(principal, session_id)
        with self._lock:
            backends = [self._backend, *self._others.values()]
        for backend in backends:
            backend.end_session(key)

    def close(self) -> None:
        """
        Close the backends of other runtimes, then this one's: every container they
        hold is removed. The sandbox can be used again after.
        """
        with self._lock:
            others = list(self._others.values())
            self._others.clear()
        for other in others:
            other.close()
        self._backend.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _backend_on(self, spec: ToolSpec, runtime: Runtime | None) -> SandboxBackend:
        if runtime is None or runtime == self._runtime:
            return self._backend
        with self._lock:
            backend = self._others.get(runtime)
            if backend is None:
                if self._backend_for is None:
                    raise SandboxUnavailable(
                        f"the policy runs {spec.name} on {runtime}, "
                        "and this sandbox cannot choose its runtime"
                    )
                backend = self._others[runtime] = self._backend_for(runtime)
            return backend

    def _execute(
        self, backend: SandboxBackend, request: _Request, egress: tuple[str, ...]
    ) -> RawExecution:
        channel = backend.open(request.limits, session=request.session, egress=egress)
        try:
            return self._exchange(channel, request)
        except SandboxUnavailable:
            if not channel.warm:
                raise
        # A warm runner can vanish while it waits (an operator removed it, the engine
        # restarted): the call gets one started for it; a second failure is the engine's.
        channel = backend.open(request.limits, session=request.session, egress=egress,
                               warm=False)
        return self._exchange(channel, request)

    def _exchange(self, channel: RunnerChannel, request: _Request) -> RawExecution:
        """One request on ``channel``, which is finished whatever happens."""
        limits = request.limits
        # A runner started for this call counts from its start, a waiting one from now.
        started = self._clock() - channel.head_start_seconds
        try:
            data = request_bytes(
                request.spec, request.call, limits if request.session else None,
                secrets=request.secrets, egress_proxy=channel.egress_proxy,
            )
            # A session's runner stops the call at wall_seconds itself; the host gives it
            # a grace before it kills the session's container.
            grace = DEADLINE_GRACE_SECONDS if request.session else 0.0
            exchanged = exchange(channel, data, deadline=started + limits.wall_seconds + grace,
                                 output_cap=limits.output_bytes, clock=self._clock)
            del data
            wall_seconds = self._clock() - started
        except BaseException:
            channel.finish("limit")
            raise
        ending: Ending = (
            "limit" if exchanged.deadline_hit or exchanged.output_cap_hit
            else "result" if has_runner_result(exchanged.stdout)
            else "silent"
        )
        observed = channel.finish(ending)
        # The host, not a session's runner, says timeout.
        over_time = bool(request.session) and wall_seconds >= limits.wall_seconds
        return RawExecution(
            stdout=exchanged.stdout,
            output_bytes=exchanged.output_bytes,
            wall_seconds=wall_seconds,
            exit_code=observed.exit_code,
            deadline_hit=exchanged.deadline_hit or over_time,
            output_cap_hit=exchanged.output_cap_hit,
            oom_killed=observed.oom_killed,
            pids_limit_hit=observed.pids_limit_hit,
            container_id=observed.container_id,
            egress_allowed=observed.egress_allowed,
            egress_refused=observed.egress_refused,
        )


@dataclass(frozen=True, slots=True)
class _Request:
    """One call's request, as placed: ``session`` is the session's key, or empty."""

    spec: ToolSpec
    call: ToolCall
    limits: ResourceLimits
    session: str
    secrets: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Exchanged:
    """What one exchange with a runner read, and which limit stopped it, if one did."""

    stdout: bytes
    output_bytes: int
    deadline_hit: bool = False
    output_cap_hit: bool = False


def exchange(
    stream: RunnerStream,
    request: bytes,
    *,
    deadline: float,
    output_cap: int,
    clock: Callable[[], float],
) -> Exchanged:
    """
    Send ``request``, then read the output until its first stdout line, its end, the
    deadline or the cap: the one loop that keeps a runner's wall clock and output cap.

    Output on stdout and stderr counts toward ``output_cap``; at most ``output_cap``
    bytes of stdout are kept. The runner writes one line to stdout, its result, and
    then exits: waiting for the stream's end would only wait for the engine to notice.
    """
    stdout = bytearray()
    output_bytes = 0

    def ended(*, deadline_hit: bool = False, output_cap_hit: bool = False) -> Exchanged:
        return Exchanged(bytes(stdout), output_bytes, deadline_hit, output_cap_hit)

    try:
        stream.send(request, max(deadline - clock(), 0.001))
    except TimeoutError:
        return ended(deadline_hit=True)
    except OSError as exc:
        # The runner is gone before it read its request; its output and exit say why.
        log.warning("sandbox_request_not_delivered", error=type(exc).__name__)
    while True:
        remaining = deadline - clock()
        if remaining <= 0:
            return ended(deadline_hit=True)
        try:
            received = stream.receive(remaining)
        except TimeoutError:
            return ended(deadline_hit=True)
        except OSError as exc:
            log.warning("sandbox_output_stream_broken", error=type(exc).__name__)
            return ended()
        part, counted = received or (b"", 0)
        output_bytes += counted
        kept = part[: max(output_cap - len(stdout), 0)]
        stdout += kept
        if output_bytes > output_cap:
            return ended(output_cap_hit=True)
        if received is None or b"\n" in kept:
            return ended()
