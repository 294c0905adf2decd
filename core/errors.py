"""
Every error callward raises, in one tree, each with a stable ``kind``.

::

    CallwardError                      kind                  who is at fault
    ├── PolicyDenied                   the answer is no: the call never ran
    │   ├── MalformedCall              malformed             the model's text
    │   ├── UnknownTool                unknown_tool          the model
    │   └── ApprovalRefused            approval_required     an approver (policies)
    │       (and, by kind: schema, permission, constraint, rate_limit,
    │        approval_required, flow)
    ├── ToolFailed                     the tool ran and broke (ToolResult.raise_for_kind)
    │   └── (kinds) tool_error, timeout, memory_limit, pids_limit,
    │               output_limit, disk_limit
    ├── InfrastructureError            callward itself could not do its job
    │   ├── SandboxUnavailable         sandbox_unavailable
    │   │   └── SecretUnavailable      sandbox_unavailable   a secret's source (sandbox)
    │   ├── AuditUnavailable           audit_unavailable
    │   ├── StateUnavailable           state_unavailable     the policy state (policies)
    │   └── AnomalyStateUnavailable    state_unavailable     the anomaly state (policies)
    ├── ConfigurationError             configuration_invalid the operator's files
    │   ├── PolicyInvalid              policy_invalid
    │   ├── PlanInvalid                plan_invalid          a plan (core.plans)
    │   └── ModelUnavailable           model_unavailable     the model's files or runtime
    │       └── ModelEndpointFailed    model_unavailable     a served model's answer
    └── VerificationFailed             verification_failed   an audit log does not verify

Kinds are the contract: users, the audit log and the model all see them, and
they never change. Messages may change. Messages never contain argument or
result values, which can hold secrets; they say *where* (a JSON path, a
character offset), never *what*.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

DenyKind = Literal[
    "malformed",
    "unknown_tool",
    "schema",
    "permission",
    "constraint",
    "rate_limit",
    "approval_required",
    "flow",
]
ToolFailureKind = Literal[
    "tool_error",
    "timeout",
    "memory_limit",
    "pids_limit",
    "output_limit",
    "disk_limit",
]
InfrastructureKind = Literal["sandbox_unavailable", "audit_unavailable", "state_unavailable"]
ConfigurationKind = Literal[
    "configuration_invalid", "policy_invalid", "plan_invalid", "model_unavailable"
]
ErrorKind = (
    DenyKind
    | ToolFailureKind
    | InfrastructureKind
    | ConfigurationKind
    | Literal["verification_failed"]
)
ResultKind = Literal["ok"] | DenyKind | ToolFailureKind | InfrastructureKind

DENY_KINDS: Final[frozenset[str]] = frozenset(get_args(DenyKind))
TOOL_FAILURE_KINDS: Final[frozenset[str]] = frozenset(get_args(ToolFailureKind))
INFRASTRUCTURE_KINDS: Final[frozenset[str]] = frozenset(get_args(InfrastructureKind))
RESULT_KINDS: Final[frozenset[str]] = frozenset(
    {"ok"} | DENY_KINDS | TOOL_FAILURE_KINDS | INFRASTRUCTURE_KINDS
)


class CallwardError(Exception):
    """
    Root of every error callward raises; catch it to catch them all.

    Args:
        message: What went wrong and where. Never argument or result values.
        kind: The stable kind users match on.
        remediation: What the operator (or the model) can do next.
    """

    def __init__(self, message: str, *, kind: ErrorKind, remediation: str) -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind
        self.message = message
        self.remediation = remediation

    def diagnostics(self) -> str:
        """A human-readable paragraph: the kind, the message and what to do."""
        return f"[{self.kind}] {self.message}\n  what to do: {self.remediation}"


class PolicyDenied(CallwardError):
    """
    The call was refused before anything ran.

    Args:
        rule: The id of the rule (or check) that denied it.
        json_path: Where in the arguments the failed check looked, if anywhere.
    """

    def __init__(
        self,
        message: str,
        *,
        kind: DenyKind,
        rule: str,
        json_path: str | None = None,
        remediation: str = "change the call, or ask the policy owner to allow it",
    ) -> None:
        super().__init__(message, kind=kind, remediation=remediation)
        self.deny_kind: DenyKind = kind
        self.rule = rule
        self.json_path = json_path


class MalformedCall(PolicyDenied):
    """
    Model output that claims to be a call but cannot be read as one.

    Args:
        offset: The character offset in the model's text where reading failed.
        tool: The tool the call named, when it got that far.
        json_path: Where in the arguments reading failed, when it was there.
    """

    def __init__(self, message: str, *, offset: int | None = None, dialect: str = "",
                 tool: str = "", json_path: str | None = None) -> None:
        super().__init__(
            message,
            kind="malformed",
            rule="parse",
            json_path=json_path,
            remediation="emit the call again as valid JSON in one supported format",
        )
        self.offset = offset
        self.dialect = dialect
        self.tool = tool


class UnknownTool(PolicyDenied):
    """The named tool is not in the registry; unknown means denied."""

    def __init__(self, name_length: int) -> None:
        super().__init__(
            f"no tool of that name is registered (name of {name_length} characters)",
            kind="unknown_tool",
            rule="registry.unknown-tool",
            remediation="call one of the registered tools (callward tools list)",
        )


class ToolFailed(CallwardError):
    """The tool ran in the sandbox and did not return a value."""

    def __init__(self, message: str, *, kind: ToolFailureKind, remediation: str) -> None:
        super().__init__(message, kind=kind, remediation=remediation)
        self.failure_kind: ToolFailureKind = kind


class InfrastructureError(CallwardError):
    """callward itself could not do its job; no result may reach the model."""

    def __init__(self, message: str, *, kind: InfrastructureKind, remediation: str) -> None:
        super().__init__(message, kind=kind, remediation=remediation)
        self.infrastructure_kind: InfrastructureKind = kind


class StateUnavailable(InfrastructureError):
    """
    The policy's state (rate limits, sessions, approvals, anomalies) could not be read
    or written. In a call the policy turns it into a denial (fail closed); a command
    that reads the state reports it.
    """

    def __init__(
        self,
        message: str,
        remediation: str = "check that the state file under CALLWARD_HOME is readable and "
        "writable and not corrupted (restore it from a backup, or remove it to start empty)",
    ) -> None:
        super().__init__(message, kind="state_unavailable", remediation=remediation)


class SandboxUnavailable(InfrastructureError):
    """The sandbox engine could not be reached or could not run the container."""

    def __init__(
        self,
        message: str,
        remediation: str = "start the Docker Engine (scripts/ensure-engine.sh) and run "
        "`callward sandbox doctor`",
    ) -> None:
        super().__init__(message, kind="sandbox_unavailable", remediation=remediation)


class AuditUnavailable(InfrastructureError):
    """An audit record could not be made durable, so the call cannot proceed."""

    def __init__(
        self,
        message: str,
        remediation: str = "check the disk and permissions of the audit database",
    ) -> None:
        super().__init__(message, kind="audit_unavailable", remediation=remediation)


class ConfigurationError(CallwardError):
    """An operator's file (configuration, tools, keys) is missing or invalid."""

    def __init__(
        self,
        message: str,
        *,
        kind: ConfigurationKind = "configuration_invalid",
        remediation: str = "fix the file named in the message",
    ) -> None:
        super().__init__(message, kind=kind, remediation=remediation)


class PolicyInvalid(ConfigurationError):
    """A policy file is missing, unreadable or invalid; callward refuses to start."""

    def __init__(self, message: str) -> None:
        super().__init__(
            message,
            kind="policy_invalid",
            remediation="fix the policy file; callward never falls back to allowing calls",
        )


class ModelUnavailable(ConfigurationError):
    """
    The model cannot be loaded or run: missing files, a digest that does not match,
    a template that does not render. callward never falls back to another model.
    """

    def __init__(
        self,
        message: str,
        *,
        remediation: str = "reinstall the model (scripts/setup-venv.sh) or point to another",
    ) -> None:
        super().__init__(message, kind="model_unavailable", remediation=remediation)


class ModelEndpointFailed(ModelUnavailable):
    """
    A served model (an OpenAI-compatible endpoint) gave no usable turn. Kind
    ``model_unavailable``, like any model that cannot run; ``reason`` says which way.

    Args:
        reason: ``timeout``, ``connection_failed``, ``http_status``, ``malformed_response``
            or ``no_api_key``.
        endpoint: The endpoint's base URL (never carries credentials).
        status: The HTTP status, for ``http_status``.
    """

    def __init__(
        self,
        message: str,
        *,
        reason: Literal["timeout", "connection_failed", "http_status", "malformed_response",
                        "no_api_key"],
        endpoint: str,
        status: int | None = None,
        remediation: str = "check that the model server runs and answers at model.endpoint",
    ) -> None:
        super().__init__(message, remediation=remediation)
        self.reason = reason
        self.endpoint = endpoint
        self.status = status


class VerificationFailed(CallwardError):
    """
    An audit log or record did not verify.

    Args:
        seq: The first record that failed, or None when the log as a whole failed.
    """

    def __init__(self, message: str, *, seq: int | None) -> None:
        super().__init__(
            message,
            kind="verification_failed",
            remediation="treat the log as tampered with from this record on",
        )
        self.seq = seq
