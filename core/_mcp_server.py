"""
callward's MCP server face: the registry's tools, served over stdio or Streamable HTTP.

Invariants:

- Every ``tools/call`` becomes a ``ToolCall`` (dialect ``mcp``) and goes through
  ``Gateway.handle``: the same policy, sandbox and signed audit log as a parsed
  model call. Nothing else on this face runs a tool.
- Only ``tools/list`` and ``tools/call`` are served. Resources, prompts and
  completion are not offered, so a client cannot reach a tool or data through them.
- Every outcome but ``ok`` comes back as an MCP tool error (``isError``) whose
  structured content carries callward's stable ``kind`` and the receipt of the
  record that was signed for it; a failed audit write returns no result at all,
  only ``audit_unavailable``.
- Streamable HTTP listens on a loopback address only, with the SDK's DNS-rebinding
  protection on.

Calls are handed to the (blocking) gateway one at a time, on a worker thread.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.to_thread
import mcp_types as types
import structlog
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server

from callward.core._canonical import JSONValue, canonical_bytes
from callward.core._mcp_upstream import PinGate
from callward.core.errors import AuditUnavailable, ConfigurationError
from callward.core.types import ToolCall, ToolResult, ToolSpec

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from callward.core.gateway import Gateway

log = structlog.get_logger()

SERVER_NAME: Final = "callward"
KIND_META_KEY: Final = "callward/kind"
#: The largest arguments object accepted from a client, in canonical bytes.
MAX_ARGUMENTS_BYTES: Final = 1 << 20


def tool_definitions(specs: Iterable[ToolSpec]) -> list[types.Tool]:
    """The MCP definition of each registered tool: name, description, input schema."""
    return [
        types.Tool(name=spec.name, description=spec.description, input_schema=spec.parameters)
        for spec in specs
    ]


def _error_result(kind: str, message: str, extra: dict[str, JSONValue] | None = None
                  ) -> types.CallToolResult:
    body: dict[str, JSONValue] = {"kind": kind, "content": {"error": kind, "message": message}}
    body.update(extra or {})
    return types.CallToolResult(
        content=[types.TextContent(text=canonical_bytes(body["content"]).decode())],
        structured_content=body,
        is_error=True,
        _meta={KIND_META_KEY: kind},
    )


def to_call_tool_result(result: ToolResult) -> types.CallToolResult:
    """
    The MCP form of a gateway result.

    The text content is the canonical JSON the model would see; the structured
    content is the whole result (kind, content, decision, receipt).
    """
    return types.CallToolResult(
        content=[types.TextContent(text=result.content_json.decode())],
        structured_content=result.to_json(),
        is_error=not result.ok,
        _meta={KIND_META_KEY: result.kind},
    )


class McpFace:
    """
    Serves one gateway's registry to MCP clients, all calls as one principal.

    Args:
        gateway: The gateway every call goes through; the face does not own it.
        principal: Who the calls are made as (the policy decides on it).
        session_id: The policy session the calls belong to.
    """

    def __init__(self, gateway: Gateway, *, principal: str, session_id: str = "") -> None:
        self._gateway = gateway
        self._principal = principal
        self._session_id = session_id
        self._limiter = anyio.CapacityLimiter(1)

    def server(self) -> Server[Any]:
        """A low-level SDK server with exactly two handlers: tools/list and tools/call."""
        return Server(
            SERVER_NAME,
            version="0.1.0",
            instructions="Every tool call is decided by policy, sandboxed and signed.",
            on_list_tools=self._list_tools,
            on_call_tool=self._call_tool,
        )

    async def _list_tools(
        self, ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        # An upstream tool blocked mid-session leaves the listing too, not only the calls.
        policy = self._gateway.policy
        blocked = policy.is_blocked if isinstance(policy, PinGate) else (lambda _name: False)
        return types.ListToolsResult(tools=tool_definitions(
            spec for spec in self._gateway.registry if not blocked(spec.name)))

    async def _call_tool(
        self, ctx: ServerRequestContext[Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        return await anyio.to_thread.run_sync(
            self.call, params.name, params.arguments, limiter=self._limiter
        )

    def call(self, name: str, arguments: dict[str, Any] | None) -> types.CallToolResult:
        """
        Run one ``tools/call`` through the gateway (blocking).

        Arguments that are not I-JSON, or too large, are refused before any
        decision, as ``malformed``; everything else is decided and audited.
        """
        try:
            call = ToolCall.create(id=self._gateway.new_id(), name=name,
                                   arguments=arguments or {}, dialect="mcp")
        except (TypeError, ValueError):
            log.info("mcp_call_malformed", tool_name_bytes=len(name))
            return _error_result("malformed", "the arguments are not an I-JSON object")
        if len(call.arguments_json) > MAX_ARGUMENTS_BYTES:
            return _error_result("malformed", "the arguments are larger than 1 MiB")
        try:
            result = self._gateway.handle(call, principal=self._principal,
                                          session_id=self._session_id)
        except AuditUnavailable as exc:
            log.exception("mcp_call_unaudited", call_id=call.id)
            return _error_result(exc.kind, exc.message, {"call_id": call.id})
        return to_call_tool_result(result)


def require_loopback(host: str) -> None:
    """
    Raises:
        ConfigurationError: ``host`` is not a loopback address.
    """
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigurationError(f"callward mcp serve listens on loopback only, not {host}")


def http_app(face: McpFace, *, host: str) -> Starlette:
    """The Streamable HTTP app at ``/mcp``, guarded against DNS rebinding."""
    require_loopback(host)
    return face.server().streamable_http_app(host=host)


async def serve_stdio(face: McpFace) -> None:
    """Serve MCP on this process's stdin and stdout until the client closes it."""
    from mcp.server.stdio import stdio_server  # noqa: PLC0415 - claims fds 0 and 1 on use

    server = face.server()
    async with stdio_server() as (read_stream, write_stream):
        await server.run(read_stream, write_stream, server.create_initialization_options())


def serve_http(face: McpFace, *, host: str, port: int) -> None:
    """Serve Streamable HTTP on ``host:port`` (loopback only) until interrupted."""
    import uvicorn  # noqa: PLC0415 - only the HTTP transport needs it

    app = http_app(face, host=host)
    log.info("mcp_http_listening", host=host, port=port)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
