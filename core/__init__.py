"""
The kernel every part of callward shares: the values that flow through a call,
the errors, the protocols of the backends, canonical bytes, and the tool registry.

The stages (``callward.policies``, ``callward.sandbox``, ``callward.audit``) import
only this kernel; the wiring above them lives in sub-packages of this package
(``observe``, ``models``, ``gateway``, ``agent``, ``plans``, ``mcp``, ``cli``), and
importing this face loads none of it.

Example::

    >>> from callward.core import ToolCall
    >>> call = ToolCall.create(id="c1", name="square", arguments={"x": 3}, dialect="api")
    >>> call.arguments
    {'x': 3}
"""

from callward.core._canonical import (
    JSONValue,
    Sha256Hex,
    canonical_bytes,
    canonical_sha256,
    sha256_hex,
    strict_loads,
)
from callward.core.errors import (
    AuditUnavailable,
    CallwardError,
    ConfigurationError,
    InfrastructureError,
    MalformedCall,
    ModelEndpointFailed,
    ModelUnavailable,
    PolicyDenied,
    PolicyInvalid,
    SandboxUnavailable,
    StateUnavailable,
    ToolFailed,
    UnknownTool,
    VerificationFailed,
)
from callward.core.protocols import AuditLog, PolicyEngine, ReceiptIssuer, ToolRunner
from callward.core.registry import ToolRegistry, tool
from callward.core.types import (
    AuditRecord,
    CallContext,
    CallId,
    Decision,
    Execution,
    Identity,
    Isolation,
    KeyId,
    ModelRef,
    Placement,
    Provenance,
    ProvenanceEdge,
    Receipt,
    ReceiptProof,
    ResourceLimits,
    RuleId,
    Runtime,
    ToolCall,
    ToolResult,
    ToolSpec,
    Usage,
)

__all__ = [
    "AuditLog",
    "AuditRecord",
    "AuditUnavailable",
    "CallContext",
    "CallId",
    "CallwardError",
    "ConfigurationError",
    "Decision",
    "Execution",
    "Identity",
    "InfrastructureError",
    "Isolation",
    "JSONValue",
    "KeyId",
    "MalformedCall",
    "ModelEndpointFailed",
    "ModelRef",
    "ModelUnavailable",
    "Placement",
    "PolicyDenied",
    "PolicyEngine",
    "PolicyInvalid",
    "Provenance",
    "ProvenanceEdge",
    "Receipt",
    "ReceiptIssuer",
    "ReceiptProof",
    "ResourceLimits",
    "RuleId",
    "Runtime",
    "SandboxUnavailable",
    "Sha256Hex",
    "StateUnavailable",
    "ToolCall",
    "ToolFailed",
    "ToolRegistry",
    "ToolResult",
    "ToolRunner",
    "ToolSpec",
    "UnknownTool",
    "Usage",
    "VerificationFailed",
    "canonical_bytes",
    "canonical_sha256",
    "sha256_hex",
    "strict_loads",
    "tool",
]


# Names this face exported before the kernel and the wiring were split: they keep
# working for one release, each with a DeprecationWarning that names the new place.
_MOVED: dict[str, str] = {
    "Agent": "callward.core.agent",
    "AgentLimits": "callward.core.agent",
    "AgentRun": "callward.core.agent",
    "AgentStep": "callward.core.agent",
    "ChatMessage": "callward.core.models",
    "ChatModel": "callward.core.models",
    "DEMO_MODEL_SHA256": "callward.core.models",
    "GenerationConfig": "callward.core.models",
    "LiveRegistry": "callward.core.registry",
    "ModelTurn": "callward.core.models",
    "Plan": "callward.core.plans",
    "PlanInvalid": "callward.core.plans",
    "PlanReport": "callward.core.plans",
    "RegistryStore": "callward.core.registry",
    "StepOutcome": "callward.core.plans",
    "TransformersChatModel": "callward.core.models",
    "load_demo_model": "callward.core.models",
    "load_plan": "callward.core.plans",
    "parse_plan": "callward.core.plans",
    "run_plan": "callward.core.plans",
}


def __getattr__(name: str) -> object:
    """A moved name, from its new module, with a warning; anything else is an AttributeError."""
    module_name = _MOVED.get(name)
    if module_name is None:
        raise AttributeError(f"module 'callward.core' has no attribute {name!r}")
    import importlib  # noqa: PLC0415 - only for a deprecated name
    import warnings  # noqa: PLC0415 - only for a deprecated name

    warnings.warn(
        f"callward.core.{name} moved to {module_name}.{name}; the old name goes in a later release",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(module_name), name)
