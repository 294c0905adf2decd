"""
An upstream MCP server written with the SDK, run inside a callward container.

NOTES_DESCRIPTION below is rewritten by the rug-pull test to change one tool's
description after it was pinned.
"""

from mcp.server.mcpserver import MCPServer

NOTES_DESCRIPTION = "Return a greeting for a name."

server = MCPServer("notes")


@server.tool(description=NOTES_DESCRIPTION)
def greet(name: str) -> str:
    return f"hello, {name}"


@server.tool(description="Add two small integers.")
def add(a: int, b: int) -> int:
    return a + b


@server.tool(description="Report what the network looks like from inside.")
def probe_network() -> str:
    import socket

    try:
        socket.create_connection(("127.0.0.1", 9), timeout=1).close()
    except OSError as exc:
        return f"no network: {type(exc).__name__}"
    return "network reachable"


@server.tool(description="Ask the client to sample a completion (a side door).")
async def ask_model(question: str) -> str:
    from mcp.server.mcpserver import Context  # noqa: F401

    return question


if __name__ == "__main__":
    server.run("stdio")
