"""The support team's tools (stand-ins: no real shop behind them)."""

from callward.core import tool


@tool(
    version="1.0.0",
    parameters={
        "type": "object",
        "properties": {"order_id": {"type": "string", "pattern": "^ORD-[0-9]{6}$"}},
        "required": ["order_id"],
        "additionalProperties": False,
    },
    labels=("read",),
)
def lookup_order(order_id: str) -> dict[str, object]:
    """Look up an order."""
    return {"order_id": order_id, "status": "delivered", "total_cents": 4999}


@tool(
    version="1.0.0",
    parameters={
        "type": "object",
        "properties": {
            "order_id": {"type": "string", "pattern": "^ORD-[0-9]{6}$"},
            "amount_cents": {"type": "integer", "minimum": 1},
            "reason": {"type": "string", "maxLength": 500},
        },
        "required": ["order_id", "amount_cents", "reason"],
        "additionalProperties": False,
    },
    labels=("payments",),
)
def refund(order_id: str, amount_cents: int, reason: str) -> str:
    """Refund part or all of an order."""
    return f"refunded {amount_cents} cents on {order_id}"
