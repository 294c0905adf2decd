"""
One connected upstream MCP server: its SDK client on an event loop, and its container.

Requests cross to the client's loop and back in one hop each way (``wait_on_loop``),
bounded; what the server asks of the client (sampling, elicitation, roots) is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final, TypeVar

import anyio
import mcp_types as types
import structlog
from anyio.from_thread import BlockingPortal
from mcp import Client
from mcp.client.session import ClientRequestContext

from callward.core._canonical import JSONValue, canonical_sha256
from callward.core.mcp._container_stdio import container_stdio
from callward.core.mcp._section import UpstreamConfig
from callward.core.protocols import AuditLog

log = structlog.get_logger()

_LIST_PAGES: Final = 20
_CONNECT_SECONDS: Final = 60.0
#: How long past its own bound the caller waits for a request before giving up on it.
_GRACE_SECONDS: Final = 5.0
_T = TypeVar("_T")


class _SideDoors:
    """Client callbacks that refuse what an upstream asks of the client, and audit it."""

    def __init__(self, server: str, audit: AuditLog) -> None:
        self._server = server
        self._audit = audit

    def _refuse(self, what: str) -> types.ErrorData:
        self._audit.append(f"mcp.{what}_refused", {"server": self._server})
        log.warning("mcp_side_door_refused", server=self._server, request=what)
        return types.ErrorData(code=types.INVALID_REQUEST,
                               message=f"callward does not allow {what} for upstream servers")

    async def sampling(self, context: ClientRequestContext,
                       params: types.CreateMessageRequestParams) -> types.ErrorData:
        return self._refuse("sampling")

    async def elicitation(self, context: ClientRequestContext,
                          params: types.ElicitRequestParams) -> types.ErrorData:
        return self._refuse("elicitation")

    async def roots(self, context: ClientRequestContext) -> types.ErrorData:
        return self._refuse("roots")


class UpstreamConnection:
    """One connected upstream: its SDK client on the portal's event loop, and its container."""

    def __init__(self, config: UpstreamConfig, portal: BlockingPortal, audit: AuditLog,
                 stack: contextlib.ExitStack) -> None:
        self.config = config
        self.image_digest = ""
        self.container_id = ""
        target: contextlib.AbstractAsyncContextManager[Any] | str
        if config.command:
            # The edge that wires stages may import them; sandbox never imports core's MCP.
            from callward.sandbox import (  # noqa: PLC0415
                ServiceImageSpec,
                StdioService,
                ensure_service_image,
            )

            image = ensure_service_image(ServiceImageSpec(
                files=dict(config.files), distributions=config.python_distributions))
            # Egress only where configured (empty: the server keeps network none).
            service = stack.enter_context(StdioService(image_id=image, command=config.command,
                                                       limits=config.limits,
                                                       egress=config.egress))
            self.image_digest = image
            self.container_id = service.container_id
            # Its stdio over the Engine's attach socket, on the client's loop.
            target = container_stdio(service, server=config.name)
        else:
            target = config.url
        doors = _SideDoors(config.name, audit)
        # No response cache: every listing is the server's answer now (pins compare it).
        client = Client(target, read_timeout_seconds=_CONNECT_SECONDS, cache=None,
                        sampling_callback=doors.sampling,
                        elicitation_callback=doors.elicitation,
                        list_roots_callback=doors.roots)
        self._client: Client = stack.enter_context(portal.wrap_async_context_manager(client))
        # Requests go straight onto the portal's loop (``_on_loop``): one thread hop each
        # way, where ``BlockingPortal.call`` first waits for the loop to spawn its task.
        self._loop: asyncio.AbstractEventLoop = portal.call(asyncio.get_running_loop)
        self._loop_thread: int = portal.call(threading.get_ident)
        self.digest = canonical_sha256({
            "name": config.name, "command": list(config.command), "url": config.url,
            "image": self.image_digest,
            **({"egress": list(config.egress)} if config.egress else {}),
        })

    def list_tools(self) -> list[types.Tool]:
        """Every tool the server lists now (pages followed, at most 20)."""
        tools: list[types.Tool] = self._every_page(self._client.list_tools, "tools")
        return tools

    def list_resources(self) -> list[types.Resource]:
        """Every resource the server lists now (pages followed, at most 20)."""
        resources: list[types.Resource] = self._every_page(self._client.list_resources,
                                                           "resources")
        return resources

    def list_prompts(self) -> list[types.Prompt]:
        """Every prompt the server lists now (pages followed, at most 20)."""
        prompts: list[types.Prompt] = self._every_page(self._client.list_prompts, "prompts")
        return prompts

    def _every_page(self, list_page: Callable[..., Awaitable[Any]], field: str) -> list[Any]:
        """The ``field`` items of every page ``list_page`` gives, each page bounded in time."""
        return self._on_loop(self._every_page_awaited(list_page, field),
                             _CONNECT_SECONDS * _LIST_PAGES)

    @staticmethod
    async def _every_page_awaited(list_page: Callable[..., Awaitable[Any]],
                                  field: str) -> list[Any]:
        items: list[Any] = []
        cursor: str | None = None
        for _ in range(_LIST_PAGES):
            with anyio.fail_after(_CONNECT_SECONDS):
                page = await list_page(cursor=cursor, cache_mode="bypass")
            items.extend(getattr(page, field))
            cursor = page.next_cursor
            if not cursor:
                break
        return items

    def read_resource(self, uri: str, wall_seconds: float) -> types.ReadResourceResult:
        """
        Raises:
            TimeoutError: No answer within ``wall_seconds``.
            MCPError: The server answered with a protocol error.
        """
        async def read() -> types.ReadResourceResult:
            with anyio.fail_after(wall_seconds):
                return await self._client.read_resource(uri, cache_mode="bypass")

        return self._on_loop(read(), wall_seconds)

    def get_prompt(self, name: str, arguments: dict[str, str],
                   wall_seconds: float) -> types.GetPromptResult:
        """
        Raises:
            TimeoutError: No answer within ``wall_seconds``.
            MCPError: The server answered with a protocol error.
        """
        async def get() -> types.GetPromptResult:
            with anyio.fail_after(wall_seconds):
                return await self._client.get_prompt(name, arguments)

        return self._on_loop(get(), wall_seconds)

    def call_tool(self, name: str, arguments: dict[str, JSONValue],
                  wall_seconds: float) -> types.CallToolResult:
        """
        Raises:
            TimeoutError: No answer within ``wall_seconds``.
            MCPError: The server answered with a protocol error.
        """
        return self._on_loop(self.call_tool_awaited(name, arguments, wall_seconds), wall_seconds)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the client runs on; ``*_awaited`` methods are awaited there."""
        return self._loop

    async def call_tool_awaited(self, name: str, arguments: dict[str, JSONValue],
                                wall_seconds: float) -> types.CallToolResult:
        """
        ``call_tool``, awaited on ``loop`` (no thread waits).

        Raises:
            TimeoutError: No answer within ``wall_seconds``.
            MCPError: The server answered with a protocol error.
        """
        with anyio.fail_after(wall_seconds):
            return await self._client.call_tool(name, arguments)

    async def list_tools_awaited(self) -> list[types.Tool]:
        """``list_tools``, awaited on ``loop``."""
        tools: list[types.Tool] = await self._every_page_awaited(self._client.list_tools,
                                                                 "tools")
        return tools

    def _on_loop(self, request: Coroutine[Any, Any, _T], bound_seconds: float) -> _T:
        return wait_on_loop(request, self._loop, self._loop_thread, bound_seconds=bound_seconds)


def wait_on_loop(request: Coroutine[Any, Any, _T], loop: asyncio.AbstractEventLoop,
                 loop_thread: int, *, bound_seconds: float) -> _T:
    """
    Run ``request`` on ``loop`` (whose thread is ``loop_thread``) and wait for it, from
    another thread: one hop each way.

    ``request`` bounds itself (``anyio.fail_after``); the wait is bounded too, a grace
    period later, so a loop that stopped can never hang the caller.

    Raises:
        TimeoutError: No answer within ``bound_seconds`` and the grace period.
        RuntimeError: Called on the loop's own thread, or the loop is closed.
        Exception: Whatever ``request`` raised (``MCPError``, ``TimeoutError`` …).
    """
    if threading.get_ident() == loop_thread:
        request.close()
        raise RuntimeError("an upstream request cannot wait on its own event loop")
    try:
        future = asyncio.run_coroutine_threadsafe(request, loop)
    except RuntimeError:
        request.close()
        raise
    try:
        return future.result(timeout=bound_seconds + _GRACE_SECONDS)
    except TimeoutError:
        future.cancel()
        raise
