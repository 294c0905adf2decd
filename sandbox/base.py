"""
The sandbox contract: what a backend reports, and how that becomes an ``Execution``.

A backend (one module per engine: ``_docker.py``, later ``_kubernetes.py``)
runs the in-container runner on one request and reports what it observed, as
a ``RawExecution``. ``Sandbox`` turns that into a ``callward.core.Execution``
and enforces the limits again itself, so no backend can forget one:

- more output than ``limits.output_bytes`` is ``output_limit``, whatever the
  backend flagged;
- a tool that ran past ``limits.wall_seconds`` is ``timeout``, whatever the
  backend flagged;
- a runner result is trusted only in the runner's own vocabulary: ``ok`` with
  an I-JSON value, or ``tool_error``/``memory_limit``/``pids_limit``/``disk_limit``;
  anything else (no result line, garbage, a value that is not I-JSON) is
  ``tool_error``.

When several things went wrong the first of these wins: output over the cap,
the kernel's OOM killer, the deadline (``pids_limit`` if the engine saw the
pids limit hit), then the runner's own report, then an unexplained SIGKILL
(``memory_limit``: inside its PID namespace nothing but the kernel can kill
the runner), then ``tool_error``.

Secrets handed to an execution travel only in its request; ``Sandbox`` cuts
their values (and simple encodings) from the value and message of the
``Execution`` it returns, and counts the cuts in its usage (``_secrets.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Final, Literal, Protocol

import structlog

from callward.core import (
    Execution,
    JSONValue,
    ResourceLimits,
    Sha256Hex,
    ToolCall,
    ToolSpec,
    Usage,
    canonical_bytes,
    sha256_hex,
    strict_loads,
)
from callward.core._canonical import canonical_loads
from callward.core.errors import ToolFailureKind
from callward.sandbox._secrets import SecretRedactor

log = structlog.get_logger()

MAX_MESSAGE_CHARS: Final = 500
#: How much later than ``wall_seconds`` a backend may report the tool's end
#: before ``Sandbox`` calls it a timeout itself (killing is not instant).
DEADLINE_GRACE_SECONDS: Final = 0.5
#: The failure kinds the runner may report; the others only the host can observe.
_RUNNER_FAILURE_KINDS: Final[dict[str, ToolFailureKind]] = {
    "tool_error": "tool_error",
    "memory_limit": "memory_limit",
    "pids_limit": "pids_limit",
    "disk_limit": "disk_limit",
}
_SIGKILL_EXIT: Final = 128 + 9

Isolation = Literal["call", "session"]


@dataclass(frozen=True, slots=True)
class RawExecution:
    """
    What a backend observed while running one request, before interpretation.

    Attributes:
        stdout: The runner's stdout, at most ``limits.output_bytes`` of it.
        output_bytes: Bytes seen on stdout and stderr together (may exceed what was kept).
        wall_seconds: From the container's start to the end of its output.
        exit_code: The runner's exit code, or None if the backend could not learn it.
        deadline_hit: The backend killed the container at ``limits.wall_seconds``.
        output_cap_hit: The backend killed the container at ``limits.output_bytes``.
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


class SandboxBackend(Protocol):
    """Runs the in-container runner on one request, in isolation. One module per engine."""

    @property
    def image_digest(self) -> Sha256Hex:
        """The digest of the image every execution runs in."""
        ...

    def execute(
        self,
        request_bytes: bytes,
        limits: ResourceLimits,
        session_key: str = "",
        egress: tuple[str, ...] = (),
    ) -> RawExecution:
        """
        Run the runner with ``request_bytes`` on stdin, in a fresh container under ``limits``.

        With ``egress`` (``host:port`` targets) the container may reach exactly those
        through the egress proxy, and nothing else; without, it has no network.

        The backend kills the container at ``limits.wall_seconds`` and once
        ``limits.output_bytes`` are exceeded, and always removes it. With a
        ``session_key`` the request runs in that session's container instead (a
        fresh process in it, /tmp wiped after), which outlives the call unless a
        limit was hit.

        Raises:
            SandboxUnavailable: The engine could not run the container at all.
        """
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


def session_key(principal: str, session_id: str) -> str:
    """The key of one agent session's container: its principal and session id, hashed."""
    return sha256_hex(canonical_bytes([principal, session_id]))


class Sandbox:
    """
    A ``ToolRunner`` on top of any ``SandboxBackend``, enforcing the limits itself.

    Args:
        backend: The engine that runs containers.
        clock: Monotonic seconds, injected for tests.
    """

    def __init__(
        self, backend: SandboxBackend, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._backend = backend
        self._clock = clock

    @property
    def image_digest(self) -> Sha256Hex:
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
        secrets: Mapping[str, str] | None = None,
        egress: tuple[str, ...] = (),
        egress_proxy: str = "",
    ) -> Execution:
        """
        Run ``spec`` with ``call``'s arguments under ``limits``.

        Args:
            isolation: ``call`` (a fresh container, the default) or ``session``
                (the container of this principal's session, a fresh process in it).
            principal: With ``session``: who calls.
            session_id: With ``session``: the agent session; the container is
                shared by exactly the calls with the same principal and session id.
            secrets: Secret values (by name) for this one execution; they are cut
                from what it returns.
            egress: ``host:port`` targets the execution may reach.
            egress_proxy: The proxy's URL, given to the tool's process with ``egress``.

        Returns an ``Execution`` for every way the tool can end.

        Raises:
            SandboxUnavailable: The backend could not run the tool at all.
            ValueError: ``session`` isolation without a principal.
        """
        clog = log.bind(call_id=call.id, tool=spec.ref, isolation=isolation)
        if bool(egress) != bool(egress_proxy):
            raise ValueError("egress and the egress proxy's URL come together")
        started = self._clock()
        if isolation == "session":
            if not principal:
                raise ValueError("session isolation needs the principal")
            request = request_bytes(spec, call, limits, secrets=secrets, egress_proxy=egress_proxy)
            key = session_key(principal, session_id)
        elif isolation == "call":
            request = request_bytes(spec, call, secrets=secrets, egress_proxy=egress_proxy)
            key = ""
        else:
            raise ValueError(f"isolation is call or session, not {isolation!r}")
        # Other backends are called exactly as before unless the call has egress.
        if egress:
            raw = self._backend.execute(request, limits, key, egress)
        elif key:
            raw = self._backend.execute(request, limits, key)
        else:
            raw = self._backend.execute(request, limits)
        del request
        elapsed = self._clock() - started
        execution = interpret(raw, limits)
        if secrets:
            execution = redact_secrets(execution, secrets)
        clog.info(
            "sandbox_call_finished",
            kind=execution.kind,
            exit_code=raw.exit_code,
            tool_ms=round(raw.wall_seconds * 1000, 3),
            total_ms=round(elapsed * 1000, 3),
            output_bytes=raw.output_bytes,
            container_id=raw.container_id[:12],
            secrets=len(secrets or {}),
            egress_refused=raw.egress_refused,
        )
        return execution


def redact_secrets(execution: Execution, secrets: Mapping[str, str]) -> Execution:
    """
    ``execution`` with every secret value (and its simple encodings) cut from its
    value and message, the names and the count of cuts in its usage.
    """
    redactor = SecretRedactor.for_secrets(secrets)
    message, count = redactor.redact_truncated(execution.message)
    value_json = execution.value_json
    if value_json is not None:
        value, value_count = redactor.redact_json(canonical_loads(value_json))
        value_json = canonical_bytes(value)
        count += value_count
    usage = replace(execution.usage, secrets_provided=tuple(secrets), secret_redactions=count)
    return Execution(kind=execution.kind, value_json=value_json, message=message, usage=usage)


def interpret(raw: RawExecution, limits: ResourceLimits) -> Execution:
    """Turn what a backend observed into the one way the execution ended."""
    usage = Usage(
        wall_ms=raw.wall_seconds * 1000,
        exit_code=raw.exit_code,
        output_bytes=raw.output_bytes,
        container_id=raw.container_id,
        egress_allowed=raw.egress_allowed,
        egress_refused=raw.egress_refused,
    )
    result = _runner_result(raw.stdout)
    over_time = raw.deadline_hit or raw.wall_seconds > limits.wall_seconds + DEADLINE_GRACE_SECONDS
    no_result = result is None
    pids_message = f"the tool tried to run more than {limits.pids} processes or threads"
    # In order of precedence: the first that holds is how the execution ended.
    limits_hit: tuple[tuple[bool, ToolFailureKind, str], ...] = (
        (
            raw.output_cap_hit or raw.output_bytes > limits.output_bytes,
            "output_limit",
            f"the tool wrote more than {limits.output_bytes} bytes",
        ),
        (
            raw.oom_killed,
            "memory_limit",
            f"the tool used more than {limits.memory_bytes} bytes of memory",
        ),
        (over_time and raw.pids_limit_hit, "pids_limit", pids_message),
        (over_time, "timeout", f"the tool ran longer than {limits.wall_seconds} s"),
        (no_result and raw.pids_limit_hit, "pids_limit", pids_message),
        (
            no_result and raw.exit_code == _SIGKILL_EXIT,
            "memory_limit",
            f"the runner was killed, most likely past {limits.memory_bytes} bytes of memory",
        ),
    )
    for hit, kind, message in limits_hit:
        if hit:
            return _failed(kind, message, usage)
    if result is None:
        return _failed(
            "tool_error", f"the runner gave no result (exit code {raw.exit_code})", usage
        )
    return _from_runner(result, usage)


def _failed(kind: ToolFailureKind, message: str, usage: Usage) -> Execution:
    return Execution(kind=kind, value_json=None, message=_truncate(message), usage=usage)


def _truncate(text: str) -> str:
    if len(text) <= MAX_MESSAGE_CHARS:
        return text
    return text[: MAX_MESSAGE_CHARS - 3] + "..."


def has_runner_result(stdout: bytes) -> bool:
    """Whether the last stdout line is a runner result object (of any outcome)."""
    return _runner_result(stdout) is not None


def _runner_result(stdout: bytes) -> dict[str, object] | None:
    """The runner's result object: the last stdout line, if it is one."""
    lines = stdout.rstrip(b"\n").rsplit(b"\n", 1)
    try:
        result = strict_loads(lines[-1])
    except ValueError:  # also UnicodeDecodeError and JSONDecodeError
        return None
    if not isinstance(result, dict) or not isinstance(result.get("ok"), bool):
        return None
    return result


def _from_runner(result: dict[str, object], usage: Usage) -> Execution:
    if result["ok"] is True:
        if "value" not in result:
            return _failed("tool_error", "the runner's result has no value", usage)
        try:
            value_json = canonical_bytes(result["value"])
        except ValueError:  # CanonicalizationError: NaN, an integer past 2**53, ...
            return _failed("tool_error", "the return value is not I-JSON", usage)
        return Execution(kind="ok", value_json=value_json, message="", usage=usage)
    raw_kind = result.get("kind")
    kind = _RUNNER_FAILURE_KINDS.get(raw_kind) if isinstance(raw_kind, str) else None
    if kind is None:
        return _failed("tool_error", "the runner's result has no valid kind", usage)
    error_type = result.get("error_type")
    message = result.get("message")
    text = f"{error_type}: {message}" if isinstance(error_type, str) else str(message)
    return _failed(kind, text, usage)
