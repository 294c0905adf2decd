"""
callward's MCP server face: the registry's tools, served over stdio or Streamable HTTP.

Invariants:

- Every ``tools/call`` becomes a ``ToolCall`` (dialect ``mcp``) and goes through
  ``Gateway.handle``: the same policy, sandbox and signed audit log as a parsed
  model call. Nothing else on this face runs a tool.
- ``tools/list`` and ``tools/call`` are served; resources and prompts only when the
  face is given upstream content (``callward.core.mcp._content``), where the policy
  enables each one and every read, get and refusal is audited. Completion is not
  offered, so a client cannot reach a tool or data through it.
- The principal of a call is the face's (stdio), or the one the HTTP request's
  bearer token maps to (``callward.core.mcp._auth``); a request without one is
  refused before it reaches this face. A verified OIDC access token also gives
  the call its ``Identity`` (issuer, roles, groups), which the policy and every
  record of the call see; ``tools/list`` shows what that identity could be allowed.
- Every outcome but ``ok`` comes back as an MCP tool error (``isError``) whose
  structured content carries callward's stable ``kind`` and the receipt of the
  record that was signed for it; a failed audit write returns no result at all,
  only ``audit_unavailable``.
- Streamable HTTP listens on a loopback address only, with the SDK's DNS-rebinding
  protection on.
- With tracing on (the gateway's ``Tracing``), each ``tools/call`` is a ``SERVER``
  span that continues the client's W3C trace (``traceparent`` in the request's
  ``_meta``, else in its HTTP headers); the call's spans are its children.

Calls are handed to the gateway one at a time. A call of an upstream tool runs on
the upstream clients' event loop (``Gateway.handle_awaiting``: its request to the
server awaited there, the decision and the fsynced records on that loop's
thread); every other call runs on a worker thread. Over HTTP the face serves on
its own loop, which therefore never blocks on a decision or an fsync; over stdio
(``run_stdio``, one client) it serves on the upstream clients' loop, so an
upstream call makes no thread hop, and holds that loop for a decision and its
records but never while an upstream works.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import ipaddress
from collections.abc import Coroutine, Iterable
from typing import TYPE_CHECKING, Any, Final, cast

import anyio
import anyio.to_thread
import mcp_types as types
import structlog
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server

from callward.core._canonical import JSONValue, canonical_bytes
from callward.core.errors import AuditUnavailable, ConfigurationError, SandboxUnavailable
from callward.core.mcp._auth import (
    IDENTITY_SCOPE_KEY,
    PRINCIPAL_SCOPE_KEY,
    BearerPrincipals,
    ClientTokens,
)
from callward.core.mcp._content import UpstreamContent
from callward.core.mcp._pins import PinGate
from callward.core.mcp._runner import UpstreamRunner
from callward.core.mcp._stdio import loop_stdio
from callward.core.observe._tracing import (
    annotate_outcome,
    asgi_trace_headers,
    continued_context,
)
from callward.core.types import Identity, ToolCall, ToolResult, ToolSpec

if TYPE_CHECKING:
    from anyio.from_thread import BlockingPortal
    from opentelemetry.context import Context
    from starlette.applications import Starlette
    from starlette.types import ASGIApp

    from callward.core.gateway import Gateway
    from callward.core.mcp._oidc import OidcVerifier
    from callward.core.protocols import AuditLog

log = structlog.get_logger()

SERVER_NAME: Final = "callward"
KIND_META_KEY: Final = "callward/kind"
#: The SDK's per-request tracing middleware, left out of the face's servers.
_SDK_OTEL_MIDDLEWARE: Final = "OpenTelemetryMiddleware"
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


def principal_of(ctx: ServerRequestContext[Any], default: str) -> str:
    """The principal the HTTP request was authenticated as, else ``default`` (stdio)."""
    scope = getattr(ctx.request, "scope", None)
    principal = scope.get(PRINCIPAL_SCOPE_KEY) if isinstance(scope, dict) else None
    return principal if isinstance(principal, str) else default


def trace_parent(ctx: ServerRequestContext[Any], params: types.RequestParams
                 ) -> Context | None:
    """
    The client's trace to continue: a W3C ``traceparent`` (and ``tracestate``) in the
    request's ``_meta``, else in its HTTP headers; None when neither has a valid one.
    """
    scope = getattr(ctx.request, "scope", None)
    headers = scope.get("headers") if isinstance(scope, dict) else None
    return continued_context(params.meta,
                             asgi_trace_headers(headers) if headers is not None else None)


def identity_of(ctx: ServerRequestContext[Any]) -> Identity | None:
    """The identity of the HTTP request's verified OIDC token, else None."""
    scope = getattr(ctx.request, "scope", None)
    identity = scope.get(IDENTITY_SCOPE_KEY) if isinstance(scope, dict) else None
    return identity if isinstance(identity, Identity) else None


class McpFace:
    """
    Serves one gateway's registry to MCP clients.

    Args:
        gateway: The gateway every call goes through; the face does not own it.
        principal: Who the calls are made as (the policy decides on it), unless the
            HTTP request was authenticated as another principal.
        session_id: The policy session the calls belong to.
        content: Upstream resources and prompts; without it neither is served.
    """

    def __init__(self, gateway: Gateway, *, principal: str, session_id: str = "",
                 content: UpstreamContent | None = None) -> None:
        self._gateway = gateway
        self._principal = principal
        self._session_id = session_id
        self._content = content
        self._limiter = anyio.CapacityLimiter(1)

    def server(self) -> Server[Any]:
        """A low-level SDK server: tools, and resources and prompts when given content."""
        served = self._content is not None
        server: Server[Any] = Server(
            SERVER_NAME,
            version="0.1.0",
            instructions="Every tool call is decided by policy, sandboxed and signed.",
            on_list_tools=self._list_tools,
            on_call_tool=self._call_tool,
            on_list_resources=self._list_resources if served else None,
            on_read_resource=self._read_resource if served else None,
            on_list_prompts=self._list_prompts if served else None,
            on_get_prompt=self._get_prompt if served else None,
        )
        # The SDK wraps every request in an OpenTelemetry span of the global provider;
        # callward makes its own, with the gateway's Tracing (off unless configured),
        # and leaves the SDK's out so that tracing off costs nothing.
        server.middleware = [middleware for middleware in server.middleware
                             if type(middleware).__name__ != _SDK_OTEL_MIDDLEWARE]
        return server

    # -- resources and prompts (upstream content, by policy) -------------------

    async def _list_resources(
        self, ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListResourcesResult:
        content, principal = self._content_for(ctx)
        resources = await anyio.to_thread.run_sync(content.list_resources, principal,
                                                    identity_of(ctx), limiter=self._limiter)
        return types.ListResourcesResult(resources=resources)

    async def _read_resource(
        self, ctx: ServerRequestContext[Any], params: types.ReadResourceRequestParams
    ) -> types.ReadResourceResult:
        content, principal = self._content_for(ctx)
        return await anyio.to_thread.run_sync(
            functools.partial(content.read_resource, str(params.uri), principal=principal,
                              session_id=self._session_id, identity=identity_of(ctx)),
            limiter=self._limiter)

    async def _list_prompts(
        self, ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListPromptsResult:
        content, principal = self._content_for(ctx)
        prompts = await anyio.to_thread.run_sync(content.list_prompts, principal,
                                                 identity_of(ctx), limiter=self._limiter)
        return types.ListPromptsResult(prompts=prompts)

    async def _get_prompt(
        self, ctx: ServerRequestContext[Any], params: types.GetPromptRequestParams
    ) -> types.GetPromptResult:
        content, principal = self._content_for(ctx)
        return await anyio.to_thread.run_sync(
            functools.partial(content.get_prompt, params.name, params.arguments,
                              principal=principal, session_id=self._session_id,
                              identity=identity_of(ctx)),
            limiter=self._limiter)

    def _content_for(self, ctx: ServerRequestContext[Any]) -> tuple[UpstreamContent, str]:
        if self._content is None:  # pragma: no cover - the handlers exist only with content
            raise ConfigurationError("this face serves no upstream content")
        return self._content, principal_of(ctx, self._principal)

    # -- tools ----------------------------------------------------------------

    async def _list_tools(
        self, ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        # Only what this caller could be allowed; an upstream tool blocked mid-session
        # leaves the listing too (the policy in front of it says so), not only the calls.
        principal = principal_of(ctx, self._principal)
        self._gateway.registry.refresh()  # versions loaded or unloaded while serving
        return types.ListToolsResult(tools=tool_definitions(
            self._gateway.tools_for(principal, session_id=self._session_id,
                                    identity=identity_of(ctx))))

    async def _call_tool(
        self, ctx: ServerRequestContext[Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        tracing = self._gateway.tracing
        if not tracing.enabled:
            return await self._serve_call(ctx, params)
        with tracing.server_span("tools/call", params.name,
                                 parent=trace_parent(ctx, params)) as span:
            result = await self._serve_call(ctx, params)
            kind = (result.meta or {}).get(KIND_META_KEY)
            annotate_outcome(span, kind if isinstance(kind, str) else "ok")
            return result

    async def _serve_call(
        self, ctx: ServerRequestContext[Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        principal, identity = principal_of(ctx, self._principal), identity_of(ctx)
        upstream_loop = self._upstream_loop(params.name)
        if upstream_loop is None:
            return await anyio.to_thread.run_sync(
                functools.partial(self.call, params.name, params.arguments, principal=principal,
                                  identity=identity),
                limiter=self._limiter,
            )
        # An upstream tool: the whole call runs on its client's loop (one hop each way,
        # none for the request to the server), never blocking this one.
        async with self._limiter:
            return await _result_from(upstream_loop, self._call_upstream(
                params.name, params.arguments, principal=principal, identity=identity))

    def _upstream_loop(self, name: str) -> asyncio.AbstractEventLoop | None:
        """The loop of the upstream client ``name`` is routed to (None: not an upstream tool)."""
        runner = self._gateway.runner
        if not isinstance(runner, UpstreamRunner) or not isinstance(self._gateway.policy,
                                                                    PinGate):
            return None
        try:
            asyncio.get_running_loop()  # the hand-back below is asyncio's
        except RuntimeError:
            return None
        return runner.loop_of(name)

    async def _call_upstream(self, name: str, arguments: dict[str, Any] | None, *,
                             principal: str, identity: Identity | None = None
                             ) -> types.CallToolResult:
        """``call`` of an upstream tool, awaited on its client's loop (where this runs)."""
        call = self._tool_call(name, arguments)
        if isinstance(call, types.CallToolResult):
            return call
        gateway, runner, gate = self._gateway, self._gateway.runner, self._gateway.policy
        if not isinstance(runner, UpstreamRunner) or not isinstance(gate, PinGate):
            raise TypeError("an upstream call needs the upstream runner and pin gate")
        try:
            async with gate.rechecked(call.name):
                result = await gateway.handle_awaiting(
                    call, principal=principal, session_id=self._session_id,
                    run=runner.run_awaited, identity=identity)
        except AuditUnavailable as exc:
            log.exception("mcp_call_unaudited", call_id=call.id)
            return _error_result(exc.kind, exc.message, {"call_id": call.id})
        return to_call_tool_result(result)

    def _tool_call(self, name: str, arguments: dict[str, Any] | None
                   ) -> ToolCall | types.CallToolResult:
        """The call to decide, or the ``malformed`` refusal of arguments that cannot be one."""
        try:
            call = ToolCall.create(id=self._gateway.new_id(), name=name,
                                   arguments=arguments or {}, dialect="mcp")
        except (TypeError, ValueError):
            log.info("mcp_call_malformed", tool_name_bytes=len(name))
            return _error_result("malformed", "the arguments are not an I-JSON object")
        if len(call.arguments_json) > MAX_ARGUMENTS_BYTES:
            return _error_result("malformed", "the arguments are larger than 1 MiB")
        return call

    def call(self, name: str, arguments: dict[str, Any] | None, *,
             principal: str | None = None,
             identity: Identity | None = None) -> types.CallToolResult:
        """
        Run one ``tools/call`` through the gateway (blocking), as ``principal``
        (default: the face's) with its token's ``identity`` (if any).

        Arguments that are not I-JSON, or too large, are refused before any
        decision, as ``malformed``; everything else is decided and audited.
        """
        call = self._tool_call(name, arguments)
        if isinstance(call, types.CallToolResult):
            return call
        try:
            result = self._gateway.handle(
                call, principal=self._principal if principal is None else principal,
                session_id=self._session_id, identity=identity)
        except AuditUnavailable as exc:
            log.exception("mcp_call_unaudited", call_id=call.id)
            return _error_result(exc.kind, exc.message, {"call_id": call.id})
        return to_call_tool_result(result)


async def _result_from(loop: asyncio.AbstractEventLoop,
                       request: Coroutine[Any, Any, types.CallToolResult]
                       ) -> types.CallToolResult:
    """
    Run ``request`` on ``loop`` and await its result on this one.

    Like a call on a worker thread, a call once started is never cancelled from
    here: it runs to its ``call.completed``; only this wait for it ends early.
    """
    here = asyncio.get_running_loop()
    if loop is here:  # the face serves on the upstream client's loop: no hop at all
        with anyio.CancelScope(shield=True):
            result = await request
        return result  # noqa: RET504 - mypy reads a return inside the scope as maybe missing
    answer: asyncio.Future[types.CallToolResult] = here.create_future()

    def hand_back(done: concurrent.futures.Future[types.CallToolResult]) -> None:
        here.call_soon_threadsafe(_settle, answer, done)

    asyncio.run_coroutine_threadsafe(request, loop).add_done_callback(hand_back)
    with anyio.CancelScope(shield=True):
        await asyncio.wait((answer,))
    return answer.result()


def _settle(answer: asyncio.Future[types.CallToolResult],
            done: concurrent.futures.Future[types.CallToolResult]) -> None:
    if answer.done():
        return
    if done.cancelled():
        answer.set_exception(SandboxUnavailable("the upstream call was cancelled"))
    elif (error := done.exception()) is not None:
        answer.set_exception(error)
    else:
        answer.set_result(done.result())


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


def http_app(face: McpFace, *, host: str, tokens: ClientTokens | None = None,
             audit: AuditLog | None = None, oidc: OidcVerifier | None = None) -> ASGIApp:
    """
    The Streamable HTTP app at ``/mcp``, guarded against DNS rebinding; with
    ``tokens`` or ``oidc``, each request is its bearer token's principal or a 401
    (audited).

    Raises:
        ConfigurationError: ``host`` is not loopback, or tokens come without an audit log.
    """
    require_loopback(host)
    app: Starlette = face.server().streamable_http_app(host=host)
    if tokens is None and oidc is None:
        return app
    if audit is None:
        raise ConfigurationError("bearer tokens need an audit log for the refusals")
    return BearerPrincipals(app, tokens, audit, oidc=oidc)


async def serve_stdio(face: McpFace) -> None:
    """
    Serve MCP on this process's stdin and stdout until the client closes it: the
    SDK's ``stdio_server``, over pipes this loop reads and writes itself
    (``callward.core.mcp._stdio``).
    """
    from mcp.server.stdio import stdio_server  # noqa: PLC0415 - claims fds 0 and 1 on use

    server = face.server()
    async with loop_stdio() as wire:
        # Pipes are read and written by this loop; anything else by the SDK's threads.
        # stdio_server uses of its two files only ``async for``, ``write`` and ``flush``.
        streams = stdio_server() if wire is None else stdio_server(
            cast("anyio.AsyncFile[str]", wire[0]), cast("anyio.AsyncFile[str]", wire[1]))
        async with streams as (read_stream, write_stream):
            await server.run(read_stream, write_stream, server.create_initialization_options())


def run_stdio(face: McpFace, *, portal: BlockingPortal | None = None) -> None:
    """
    Serve MCP on stdin and stdout until the client closes it (blocking).

    With ``portal`` (the upstream clients', ``Upstreams.portal``) the face serves on
    that loop, so a call of an upstream tool makes no thread hop at all: its
    decision and records run on the loop's thread, then its request is awaited
    there. Over stdio there is one client, whose calls are decided one at a time
    anyway; the loop is held only for a decision and its fsynced records, never
    while an upstream works, so the client's other requests are still answered.

    Raises:
        KeyboardInterrupt: Ctrl-C, after serving stopped.
    """
    if portal is None:
        anyio.run(serve_stdio, face)  # Ctrl-C cancels it, then raises KeyboardInterrupt
        return
    served = portal.start_task_soon(serve_stdio, face)
    try:
        served.result()
    except BaseException:
        # Ctrl-C here (the main thread): stop serving now, not when the client closes
        # stdin, so the upstreams and the log close in order behind it.
        served.cancel()
        raise


def serve_http(face: McpFace, *, host: str, port: int, tokens: ClientTokens | None = None,
               audit: AuditLog | None = None, oidc: OidcVerifier | None = None) -> None:
    """Serve Streamable HTTP on ``host:port`` (loopback only) until interrupted."""
    import uvicorn  # noqa: PLC0415 - only the HTTP transport needs it

    app = http_app(face, host=host, tokens=tokens, audit=audit, oidc=oidc)
    log.info("mcp_http_listening", host=host, port=port)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
