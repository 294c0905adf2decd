"""
How what the host observed of one execution becomes an ``Execution``.

Every limit is judged again here, so no backend can forget one:

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

Secrets handed to an execution travel only in its request; ``redact_secrets``
cuts their values (and simple encodings) from the value and message of the
``Execution``, and counts the cuts in its usage (``_secrets.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Final

from callward.core import (
    Execution,
    ResourceLimits,
    Usage,
    canonical_bytes,
    strict_loads,
)
from callward.core._canonical import canonical_loads
from callward.core.errors import ToolFailureKind
from callward.sandbox._secrets import SecretRedactor
from callward.sandbox.base import RawExecution

MAX_MESSAGE_CHARS: Final = 500
#: How much later than ``wall_seconds`` a tool may be seen to end before it is a
#: timeout (killing is not instant), and how long past ``wall_seconds`` the host
#: waits for a runner that stops a call at ``wall_seconds`` itself (a session's).
DEADLINE_GRACE_SECONDS: Final = 0.5
#: The failure kinds the runner may report; the others only the host can observe.
_RUNNER_FAILURE_KINDS: Final[dict[str, ToolFailureKind]] = {
    "tool_error": "tool_error",
    "memory_limit": "memory_limit",
    "pids_limit": "pids_limit",
    "disk_limit": "disk_limit",
}
_SIGKILL_EXIT: Final = 128 + 9


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
