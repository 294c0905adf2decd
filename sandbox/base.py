"""
The sandbox contract: what a backend does for one execution, and what is observed.

``Sandbox`` (``_sandbox.py``) is the public class. It owns placement (isolation,
runtime, secrets, egress) and the limits no backend may forget: it reads the runner's
output itself, stops at the deadline and at the output cap, and has the runner killed.
A backend (one module per engine: ``_docker.py``, later ``_kubernetes.py``) only
provides a runner for one request and says how that runner ended:

1. ``SandboxBackend.open`` gives a ``RunnerChannel``: the in-container runner under
   the given limits, waiting for its request (in a container of its own, or in an
   agent session's container);
2. ``Sandbox`` sends the request once and receives output until the result line, the
   end of the output, the deadline or the output cap, each read bounded by the time
   left;
3. ``RunnerChannel.finish`` is called exactly once, whatever happened: the backend
   kills a runner that hit a limit, releases the rest, and reports what the engine
   and the kernel saw (``Observation``).

``RawExecution`` is what the host observed of one execution, both halves together;
``interpret()`` (``_interpret.py``) turns it into the one way the execution ended.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from callward.core import (
    JSONValue,
    ResourceLimits,
    Sha256Hex,
    ToolCall,
    ToolSpec,
    canonical_bytes,
    sha256_hex,
)

#: How an exchange with a runner ended, as ``Sandbox`` tells the backend:
#: ``result``: the runner wrote its result line; ``silent``: its output ended (or
#: broke) without one; ``limit``: the host stopped it at the deadline or the output
#: cap, or something raised on the way (the runner must not be used again).
Ending = Literal["result", "silent", "limit"]


@dataclass(frozen=True, slots=True)
class RawExecution:
    """
    What the host observed while running one request, before interpretation.

    Attributes:
        stdout: The runner's stdout, at most ``limits.output_bytes`` of it.
        output_bytes: Bytes seen on stdout and stderr together (may exceed what was kept).
        wall_seconds: From the tool's start to the end of its output.
        exit_code: The runner's exit code, or None if the backend could not learn it.
        deadline_hit: The host stopped the runner at ``limits.wall_seconds``.
        output_cap_hit: The host stopped the runner past ``limits.output_bytes``.
        oom_killed: The engine reports the kernel's OOM killer ran in the container.
        pids_limit_hit: The engine saw a fork or clone refused by the pids limit.
        container_id: The engine's id of the container, for operators.
        egress_allowed: Connections the egress proxy forwarded for this request.
        egress_refused: Connections the egress proxy refused for this request.
    """

    stdout: bytes
    output_bytes: int
    wall_seconds: float
    exit_code: int | None
    deadline_hit: bool = False
    output_cap_hit: bool = False
    oom_killed: bool = False
    pids_limit_hit: bool = False
    container_id: str = ""
    egress_allowed: int = 0
    egress_refused: int = 0

    def __post_init__(self) -> None:
        if self.output_bytes < len(self.stdout):
            raise ValueError("output_bytes counts stdout, so it is at least len(stdout)")
        if self.wall_seconds < 0:
            raise ValueError("wall_seconds is not negative")


@dataclass(frozen=True, slots=True)
class Observation:
    """
    What a backend saw of a runner when its execution ended (``RunnerChannel.finish``).

    Attributes:
        container_id: The engine's id of the container, for operators.
        exit_code: The runner's exit code, or None if it was not learnt (killed, still
            serving a session, or its result was enough).
        oom_killed: The kernel's OOM killer ran in the container during the execution.
        pids_limit_hit: A fork or clone was refused by the pids limit during it.
        egress_allowed: Connections the egress proxy forwarded for it.
        egress_refused: Connections the egress proxy refused for it.
    """

    container_id: str
    exit_code: int | None = None
    oom_killed: bool = False
    pids_limit_hit: bool = False
    egress_allowed: int = 0
    egress_refused: int = 0

    def __post_init__(self) -> None:
        if self.egress_allowed < 0 or self.egress_refused < 0:
            raise ValueError("connection counts are not negative")


class RunnerStream(Protocol):
    """
    A runner's stdin and output, each call bounded in time.

    ``send`` and ``receive`` return (or raise ``TimeoutError``) within the time they
    are given: that is how the host keeps the deadline (``_sandbox.exchange``).
    """

    def send(self, request: bytes, timeout_seconds: float) -> None:
        """
        Hand the runner its request.

        Raises:
            TimeoutError: It could not be handed over within ``timeout_seconds``.
            OSError: The runner is gone (its output and exit then say why).
        """
        ...

    def receive(self, timeout_seconds: float) -> tuple[bytes, int] | None:
        """
        The runner's next output: the stdout bytes in it and how many bytes it held on
        stdout and stderr together; None once the output has ended.

        Raises:
            TimeoutError: Nothing came within ``timeout_seconds``.
            OSError: The output stream broke.
        """
        ...


class RunnerChannel(RunnerStream, Protocol):
    """One runner, waiting for one request: from ``SandboxBackend.open``, driven by ``Sandbox``."""

    @property
    def head_start_seconds(self) -> float:
        """
        How much of the execution's wall time has passed when ``open`` returns: the
        time since the start of a container started for this request (its start counts
        against the tool), 0 for a runner that was already waiting (warm, a session's).
        """
        ...

    @property
    def warm(self) -> bool:
        """
        Whether the runner was started ahead of demand (a warm pool's). If the engine
        loses it before it answers (``finish`` raises), ``Sandbox`` runs the request
        once more in one started for it (``open(..., warm=False)``).
        """
        ...

    @property
    def egress_proxy(self) -> str:
        """The egress proxy's URL for the tool's process; empty without egress."""
        ...

    def finish(self, ending: Ending) -> Observation:
        """
        End the execution and release the runner, whatever happens here: kill it after
        ``limit``; a single-use runner is removed in any case.

        Raises:
            SandboxUnavailable: The engine could not say how the runner ended (never
                for ``limit``).
        """
        ...


class SandboxBackend(Protocol):
    """Provides the in-container runner for one request at a time. One module per engine."""

    @property
    def image_digest(self) -> Sha256Hex:
        """The digest of the image every execution runs in."""
        ...

    def open(
        self,
        limits: ResourceLimits,
        *,
        session: str = "",
        egress: tuple[str, ...] = (),
        warm: bool = True,
    ) -> RunnerChannel:
        """
        A runner under ``limits``, waiting for one request.

        Without ``session``, in a hardened container used for that request alone (one
        started ahead of demand when ``warm`` and one is ready under exactly these
        limits and egress). With a ``session`` key, in that session's container under
        these limits, started on its first request (a fresh process per request, /tmp
        wiped after); it outlives the request unless the request ends other than
        ``result``. With ``egress`` (``host:port`` targets), the container may reach
        exactly those through the egress proxy and nothing else; without, it has no
        network.

        Raises:
            SandboxUnavailable: The engine could not start the runner, or cannot give
                egress on its runtime.
        """
        ...

    def end_session(self, session: str) -> None:
        """Remove the containers of the session with that key, if it has any."""
        ...

    def close(self) -> None:
        """Remove every container still held; the backend can be used again after."""
        ...


def request_bytes(
    spec: ToolSpec,
    call: ToolCall,
    limits: ResourceLimits | None = None,
    *,
    secrets: Mapping[str, str] | None = None,
    egress_proxy: str = "",
) -> bytes:
    """
    The runner's request for ``call`` to ``spec``, as RFC 8785 bytes.

    A session request (``limits`` given) also carries the runner's soft time limit.
    ``secrets`` and ``egress_proxy`` become environment variables of the tool's
    process only; a request without them is what older runners read.
    """
    request: dict[str, JSONValue] = {
        "source": spec.source, "entrypoint": spec.entrypoint, "arguments": call.arguments
    }
    if limits is not None:
        request["wall_seconds"] = limits.wall_seconds
    if secrets:
        request["secrets"] = dict(secrets)
    if egress_proxy:
        request["egress_proxy"] = egress_proxy
    return canonical_bytes(request)


def session_container_key(principal: str, session_id: str) -> str:
    """The key of one agent session's container: its principal and session id, hashed."""
    return sha256_hex(canonical_bytes([principal, session_id]))
