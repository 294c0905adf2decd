"""
The runner in front of the sandbox: upstream tools go to their server, the rest to ``inner``.

An upstream's answer becomes an ``Execution`` like a sandboxed tool's, bounded by the
decision's ``wall_seconds`` and ``output_bytes``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import anyio
import anyio.to_thread
import mcp_types as types
from mcp.shared.exceptions import MCPError

from callward.core._canonical import JSONValue, Sha256Hex, canonical_bytes
from callward.core.errors import SandboxUnavailable
from callward.core.mcp._connection import UpstreamConnection
from callward.core.protocols import ToolRunner, refuse_placement, run_as_placed
from callward.core.types import (
    Execution,
    Placement,
    ResourceLimits,
    ToolCall,
    ToolSpec,
    Usage,
)


@dataclass(frozen=True, slots=True)
class _Route:
    connection: UpstreamConnection
    tool: str


def _value_of(result: types.CallToolResult) -> JSONValue:
    if result.structured_content is not None:
        value: JSONValue = result.structured_content
        return value
    texts = [block.text for block in result.content if isinstance(block, types.TextContent)]
    if len(texts) == len(result.content) == 1:
        return texts[0]
    return [block.model_dump(mode="json", by_alias=True, exclude_none=True)
            for block in result.content]


class UpstreamRunner:
    """
    A ``PlacingToolRunner`` that sends upstream tools to their server and the rest to ``inner``.
    """

    def __init__(self, inner: ToolRunner, routes: Mapping[str, _Route],
                 upstream_names: frozenset[str] = frozenset()) -> None:
        self._inner = inner
        # Held, not copied: a tool blocked mid-session loses its route at once.
        self._routes = routes
        self._upstream_names = upstream_names

    @property
    def image_digest(self) -> Sha256Hex:
        return self._inner.image_digest

    def run(self, spec: ToolSpec, call: ToolCall, limits: ResourceLimits) -> Execution:
        route = self._routes.get(spec.name)
        if route is None:
            if spec.name in self._upstream_names:
                raise SandboxUnavailable(f"upstream tool {spec.name} is blocked")
            return self._inner.run(spec, call, limits)
        started = time.perf_counter()
        try:
            result = route.connection.call_tool(route.tool, call.arguments, limits.wall_seconds)
        except Exception as exc:  # noqa: BLE001 - _failed_call maps or re-raises each kind
            return _failed_call(route, exc, started)
        return _execution_of(result, limits, _usage_since(route, started))

    def run_placed(self, spec: ToolSpec, call: ToolCall, limits: ResourceLimits,
                   placement: Placement) -> Execution:
        """
        Another tool runs on ``inner`` as placed (``run_as_placed``). An upstream tool
        runs on its server, which serves every session alike and cannot be handed
        secrets, egress or a runtime: those are refused, never dropped.

        Raises:
            SandboxUnavailable: As ``run``, or the placement cannot be given.
        """
        if spec.name not in self._routes and spec.name not in self._upstream_names:
            return run_as_placed(self._inner, spec, call, limits, placement)
        refuse_placement(spec, placement)
        return self.run(spec, call, limits)

    def loop_of(self, name: str) -> asyncio.AbstractEventLoop | None:
        """The loop of the client that ``name`` (a tool, or ``tool@version``) is routed to."""
        route = self._routes.get(name.partition("@")[0])
        return None if route is None else route.connection.loop

    async def run_awaited(self, spec: ToolSpec, call: ToolCall,
                          limits: ResourceLimits) -> Execution:
        """
        ``run``, awaited: on the routed client's own loop the request is awaited there;
        anything else runs as ``run`` does, on a worker thread.

        Raises:
            SandboxUnavailable: As ``run``.
        """
        route = self._routes.get(spec.name)
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if route is None or route.connection.loop is not running:
            return await anyio.to_thread.run_sync(self.run, spec, call, limits)
        started = time.perf_counter()
        try:
            result = await route.connection.call_tool_awaited(route.tool, call.arguments,
                                                              limits.wall_seconds)
        except Exception as exc:  # noqa: BLE001 - _failed_call maps or re-raises each kind
            return _failed_call(route, exc, started)
        return _execution_of(result, limits, _usage_since(route, started))


def _usage_since(route: _Route, started: float) -> Callable[[int], Usage]:
    def usage(size: int) -> Usage:
        return Usage(wall_ms=(time.perf_counter() - started) * 1000, exit_code=None,
                     output_bytes=size, container_id=route.connection.container_id)

    return usage


def _failed_call(route: _Route, exc: Exception, started: float) -> Execution:
    """
    A request to the upstream that raised, as the kind it ended in.

    Raises:
        SandboxUnavailable: The upstream could not be reached at all.
    """
    usage = _usage_since(route, started)
    if isinstance(exc, TimeoutError):
        return Execution("timeout", None, "the upstream did not answer in time", usage(0))
    if isinstance(exc, MCPError):
        return Execution("tool_error", None, f"the upstream refused the call ({exc.code})",
                         usage(0))
    raise SandboxUnavailable(
        f"the upstream MCP server {route.connection.config.name} is unreachable "
        f"({type(exc).__name__})") from exc


def _execution_of(result: types.CallToolResult, limits: ResourceLimits,
                  usage: Callable[[int], Usage]) -> Execution:
    """An upstream's answer as an execution: its value, or the kind it ended in."""
    if result.is_error:
        return Execution("tool_error", None, "the upstream tool reported an error", usage(0))
    try:
        value_json = canonical_bytes(_value_of(result))
    except ValueError:
        return Execution("tool_error", None, "the upstream result is not I-JSON", usage(0))
    if len(value_json) > limits.output_bytes:
        return Execution("output_limit", None, "the upstream result is over the output limit",
                         usage(len(value_json)))
    return Execution("ok", value_json, "", usage(len(value_json)))
