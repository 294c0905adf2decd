"""The coding agent's tools (stand-ins for a workspace, a test runner and the web)."""

from callward.core import JSONValue, tool

_PATH: JSONValue = {"type": "string", "minLength": 1, "maxLength": 4096}


@tool(
    version="1.0.0",
    parameters={"type": "object", "properties": {"path": _PATH}, "required": ["path"],
                "additionalProperties": False},
    labels=("filesystem",),
)
def read_file(path: str) -> str:
    """Read a file of the workspace."""
    return ""


@tool(
    version="1.0.0",
    parameters={"type": "object",
                "properties": {"path": _PATH, "text": {"type": "string", "maxLength": 1000000}},
                "required": ["path", "text"], "additionalProperties": False},
    labels=("filesystem", "write"),
)
def write_file(path: str, text: str) -> int:
    """Write a file of the workspace."""
    return len(text)


@tool(
    version="1.0.0",
    parameters={"type": "object", "properties": {"path": _PATH}, "required": ["path"],
                "additionalProperties": False},
)
def run_tests(path: str) -> dict[str, int]:
    """Run the test suite under a directory of the workspace."""
    return {"passed": 0, "failed": 0}


@tool(
    version="1.0.0",
    parameters={"type": "object", "properties": {"url": {"type": "string", "maxLength": 2048}},
                "required": ["url"], "additionalProperties": False},
    labels=("egress",),
)
def http_get(url: str) -> str:
    """Fetch a web page (documentation)."""
    return ""
