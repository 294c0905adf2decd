"""Tools the policy tests decide calls for: typed arguments, labels, paths."""

from __future__ import annotations

import pytest

from callward.core import CallContext, ToolCall, ToolRegistry, tool


@tool(
    version="1.0.0",
    parameters={
        "type": "object",
        "properties": {
            "order_id": {"type": "string", "pattern": "^[A-Z0-9-]{1,32}$"},
            "amount_cents": {"type": "integer", "minimum": 1, "maximum": 10_000_000},
            "rate": {"type": "number"},
        },
        "required": ["order_id", "amount_cents"],
        "additionalProperties": False,
    },
    labels=("payments",),
)
def refund(order_id: str, amount_cents: int, rate: float = 1.0) -> str:
    return f"refunded {amount_cents} on {order_id}"


@tool(
    version="1.0.0",
    parameters={
        "type": "object",
        "properties": {"path": {"type": "string", "maxLength": 4096}},
        "required": ["path"],
        "additionalProperties": False,
    },
)
def read_file(path: str) -> str:
    return path


@tool(
    version="1.0.0",
    parameters={
        "type": "object",
        "properties": {"url": {"type": "string"}, "body": {"type": "string"}},
        "required": ["url"],
        "additionalProperties": False,
    },
    labels=("egress",),
)
def http_post(url: str, body: str = "") -> str:
    return url


@pytest.fixture(name="registry")
def _registry() -> ToolRegistry:
    registry = ToolRegistry()
    for function in (refund, read_file, http_post):
        registry.register(function)
    return registry


@pytest.fixture(name="decide")
def _decide(registry):
    """decide(policy, principal, tool, arguments, session="") -> Decision."""

    def decide(policy, principal, name, arguments, session="", call_id="c1"):
        call = ToolCall.create(id=call_id, name=name, arguments=arguments, dialect="api")
        return policy.decide(call, registry.get(name), CallContext(principal, session))

    return decide
