"""
The types every part of callward shares, the tool registry, parsing of model
output, the gateway pipeline and the CLI.

Example::

    >>> from callward.core import ToolCall
    >>> call = ToolCall.create(id="c1", name="square", arguments={"x": 3}, dialect="api")
    >>> call.arguments
    {'x': 3}
"""

from callward.core._agent import Agent, AgentLimits, AgentRun, AgentStep
from callward.core._canonical import (
    JSONValue,
    Sha256Hex,
    canonical_bytes,
    canonical_sha256,
    sha256_hex,
    strict_loads,
)
from callward.core._models import (
    ChatMessage,
    ChatModel,
    GenerationConfig,
    ModelTurn,
    TransformersChatModel,
)
from callward.core._models_gguf import DEMO_MODEL_SHA256, load_demo_model
from callward.core._plan import Plan, PlanInvalid, load_plan, parse_plan
from callward.core._plan_run import PlanReport, StepOutcome, run_plan
from callward.core._registry import ToolRegistry, tool
from callward.core._registry_live import LiveRegistry
from callward.core._registry_store import RegistryStore
from callward.core.errors import (
    AuditUnavailable,
    CallwardError,
    ConfigurationError,
    InfrastructureError,
    MalformedCall,
    ModelUnavailable,
    PolicyDenied,
    PolicyInvalid,
    SandboxUnavailable,
    ToolFailed,
    UnknownTool,
    VerificationFailed,
)
from callward.core.protocols import AuditLog, PolicyEngine, ReceiptIssuer, ToolRunner
from callward.core.types import (
    AuditRecord,
    CallContext,
    CallId,
    Decision,
    Execution,
    KeyId,
    ModelRef,
    Provenance,
    ProvenanceEdge,
    Receipt,
    ReceiptProof,
    ResourceLimits,
    RuleId,
    ToolCall,
    ToolResult,
    ToolSpec,
    Usage,
)

__all__ = [
    "DEMO_MODEL_SHA256",
    "Agent",
    "AgentLimits",
    "AgentRun",
    "AgentStep",
    "AuditLog",
    "AuditRecord",
    "AuditUnavailable",
    "CallContext",
    "CallId",
    "CallwardError",
    "ChatMessage",
    "ChatModel",
    "ConfigurationError",
    "Decision",
    "Execution",
    "GenerationConfig",
    "InfrastructureError",
    "JSONValue",
    "KeyId",
    "LiveRegistry",
    "MalformedCall",
    "ModelRef",
    "ModelTurn",
    "ModelUnavailable",
    "Plan",
    "PlanInvalid",
    "PlanReport",
    "PolicyDenied",
    "PolicyEngine",
    "PolicyInvalid",
    "Provenance",
    "ProvenanceEdge",
    "Receipt",
    "ReceiptIssuer",
    "ReceiptProof",
    "RegistryStore",
    "ResourceLimits",
    "RuleId",
    "SandboxUnavailable",
    "Sha256Hex",
    "StepOutcome",
    "ToolCall",
    "ToolFailed",
    "ToolRegistry",
    "ToolResult",
    "ToolRunner",
    "ToolSpec",
    "TransformersChatModel",
    "UnknownTool",
    "Usage",
    "VerificationFailed",
    "canonical_bytes",
    "canonical_sha256",
    "load_demo_model",
    "load_plan",
    "parse_plan",
    "run_plan",
    "sha256_hex",
    "strict_loads",
    "tool",
]
