"""
The demo's tools. Each runs inside a hardened, single-use container: its
source (without the decorator) is all that is sent there, so a tool imports
what it needs inside its own body.
"""

from callward.core import JSONValue, ResourceLimits, tool

_NUMBER: JSONValue = {"type": "number", "minimum": -1e12, "maximum": 1e12}


@tool(
    version="1.0.0",
    parameters={
        "type": "object",
        "properties": {"x": {"type": "integer", "minimum": -1000000, "maximum": 1000000}},
        "required": ["x"],
        "additionalProperties": False,
    },
)
def square(x: int) -> int:
    """Return x squared."""
    return x * x


@tool(
    version="1.0.0",
    parameters={
        "type": "object",
        "properties": {"a": _NUMBER, "b": _NUMBER},
        "required": ["a", "b"],
        "additionalProperties": False,
    },
)
def add(a: float, b: float) -> float:
    """Return the sum a + b."""
    return a + b


@tool(
    version="1.0.0",
    parameters={
        "type": "object",
        "properties": {"country": {"type": "string", "minLength": 1, "maxLength": 64}},
        "required": ["country"],
        "additionalProperties": False,
    },
)
def capital(country: str) -> str:
    """Return the capital city of a country, from a small built-in table."""
    capitals = {
        "france": "Paris",
        "germany": "Berlin",
        "japan": "Tokyo",
        "kenya": "Nairobi",
        "peru": "Lima",
    }
    found = capitals.get(country.strip().lower())
    if found is None:
        raise LookupError("no capital known for that country")
    return found


@tool(
    version="1.0.0",
    parameters={
        "type": "object",
        "properties": {"table": {"type": "string", "pattern": "^[a-z_]{1,32}$"}},
        "required": ["table"],
        "additionalProperties": False,
    },
    labels=("destructive",),
)
def drop_table(table: str) -> str:
    """Drop a database table (it only says it would: the demo has no database)."""
    return f"would drop {table}"


@tool(
    version="1.0.0",
    parameters={
        "type": "object",
        "properties": {"seconds": {"type": "number", "minimum": 0, "maximum": 3600}},
        "required": ["seconds"],
        "additionalProperties": False,
    },
    limits=ResourceLimits(wall_seconds=2.0),
)
def spin(seconds: float) -> str:
    """Busy-wait for some seconds: a tool that overruns its time limit."""
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pass
    return "done"
