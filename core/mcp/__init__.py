"""
The MCP gateway: ``callward mcp serve`` offers the registry's tools to MCP clients, and
upstream MCP servers run as sandboxed tools behind the same policy and log.

Example::

    >>> from callward.core.mcp import token_sha256
    >>> len(token_sha256("a token"))
    64
"""

from callward.core.mcp._auth import token_sha256
from callward.core.mcp._gateway import open_upstreams
from callward.core.mcp._server import McpFace

__all__ = ["McpFace", "open_upstreams", "token_sha256"]
