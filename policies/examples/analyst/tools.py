"""The analyst team's tools (stand-ins: they answer from small built-in tables)."""

from callward.core import tool


@tool(
    version="1.0.0",
    parameters={
        "type": "object",
        "properties": {
            "table": {"type": "string", "enum": ["sales", "regions", "customers"]},
            "sql": {"type": "string", "maxLength": 2000},
            "limit": {"type": "integer", "minimum": 1, "maximum": 10000},
        },
        "required": ["table", "sql"],
        "additionalProperties": False,
    },
    labels=("read",),
)
def run_query(table: str, sql: str, limit: int = 100) -> list[dict[str, object]]:
    """Run a read-only query on one table."""
    return [{"table": table, "rows": 0, "limit": limit}]


@tool(
    version="1.0.0",
    parameters={
        "type": "object",
        "properties": {"table": {"type": "string"}, "rows": {"type": "array"}},
        "required": ["table", "rows"],
        "additionalProperties": False,
    },
    labels=("write",),
)
def insert_rows(table: str, rows: list[object]) -> int:
    """Insert rows into a table."""
    return len(rows)


@tool(
    version="1.0.0",
    parameters={
        "type": "object",
        "properties": {"to": {"type": "string"}, "text": {"type": "string", "maxLength": 20000}},
        "required": ["to", "text"],
        "additionalProperties": False,
    },
    labels=("egress",),
)
def send_report(to: str, text: str) -> str:
    """Send a report by e-mail."""
    return f"sent to {to}"
