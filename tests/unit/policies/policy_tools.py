"""Tools the policy tests decide calls for: typed arguments, labels, paths."""

from __future__ import annotations

from callward.core import tool


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
