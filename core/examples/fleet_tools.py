"""
The fleet demo's tools (``callward demo --fleet``, policy ``policy-fleet.yaml``): a
quick one for the bulk of the calls, one under a rate limit the whole fleet shares,
a slow one to have a call in flight when a replica is killed, and one that needs an
approval. Each runs in a hardened container; its source (without the decorator) is
all that is sent there, so a tool imports what it needs inside its own body.
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
    """Return the sum a + b (the fleet shares one rate limit on it)."""
    return a + b


@tool(
    version="1.0.0",
    parameters={
        "type": "object",
        "properties": {"seconds": {"type": "number", "minimum": 0, "maximum": 8}},
        "required": ["seconds"],
        "additionalProperties": False,
    },
    limits=ResourceLimits(wall_seconds=10.0),
)
def pause(seconds: float) -> str:
    """Sleep some seconds, then say so: a call that is still running when asked."""
    import time

    time.sleep(seconds)
    return f"paused {seconds} s"


@tool(
    version="1.0.0",
    parameters={
        "type": "object",
        "properties": {
            "service": {"type": "string", "pattern": "^[a-z][a-z0-9-]{0,31}$"},
            "version": {"type": "string", "pattern": "^[0-9]{1,4}(\\.[0-9]{1,4}){2}$"},
        },
        "required": ["service", "version"],
        "additionalProperties": False,
    },
    labels=("production",),
)
def deploy(service: str, version: str) -> str:
    """Deploy a service version (it only says it would: the demo has no services)."""
    return f"would deploy {service} {version}"
