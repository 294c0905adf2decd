"""
Upstream MCP servers behind the gateway: pinned, namespaced, policed and sandboxed.

Invariants:

- An upstream tool is callable only while its definition (name, description,
  input schema) hashes to the digest an operator pinned for it. A tool never
  approved, or whose definition changed since (a "rug pull"), is left out of the
  registry and every call to it is denied as ``approval_required``; each such
  finding is audited (``mcp.tool_pending``, ``mcp.tool_blocked``).
- Tool names are ``<server>__<tool>``, ASCII snake_case, so two servers (or a
  server and a native tool) cannot shadow each other; a name that does not map
  is refused (``mcp.tool_refused``), never rewritten into another tool's name.
- Calls reach an upstream only through ``UpstreamRunner.run``, which the gateway
  calls after policy (schema included) allowed the call and ``call.authorized``
  is durable; each call is bounded by the decision's ``wall_seconds`` and
  ``output_bytes``.
- Sampling, elicitation and roots requests from an upstream are refused and
  audited (``mcp.sampling_refused`` …). Its resources and prompts are off unless
  the policy's ``mcp_content`` enables them (``callward.core.mcp._content``).
- A stdio upstream runs in a hardened container (``callward.sandbox``'s
  ``StdioService``); an HTTP upstream must be on a loopback address.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ipaddress
import json
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, Protocol, TypeVar, runtime_checkable
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
import mcp_types as types
import structlog
from anyio.from_thread import BlockingPortal, start_blocking_portal
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from mcp import Client
from mcp.client.session import ClientRequestContext
from mcp.shared.exceptions import MCPError
from referencing import Registry

from callward.core._canonical import JSONValue, Sha256Hex, canonical_bytes, canonical_sha256
from callward.core.errors import ConfigurationError, SandboxUnavailable
from callward.core.mcp._container_stdio import container_stdio
from callward.core.protocols import (
    AuditLog,
    PolicyEngine,
    PolicyHooks,
    PolicyReload,
    ShadowingPolicy,
    ToolRunner,
    refuse_placement,
    run_as_placed,
)
from callward.core.types import (
    CallContext,
    Decision,
    Execution,
    Placement,
    ResourceLimits,
    ResultTreatment,
    RuleId,
    ToolCall,
    ToolSpec,
    Usage,
    is_egress_target,
    is_tool_name,
)

log = structlog.get_logger()

NAMESPACE_SEPARATOR: Final = "__"
PINS_FILE: Final = "mcp-pins.json"
UNAPPROVED_RULE: Final = RuleId("mcp.unapproved")
RUG_PULL_RULE: Final = RuleId("mcp.rug-pull")
_LIST_PAGES: Final = 20
_CONNECT_SECONDS: Final = 60.0
#: How long past its own bound the caller waits for a request before giving up on it.
_GRACE_SECONDS: Final = 5.0
_T = TypeVar("_T")
#: The tool re-checked by ``PinGate.rechecked`` in this context, and how its listing failed.
_RECHECKED: contextvars.ContextVar[tuple[str, Exception | None] | None] = contextvars.ContextVar(
    "callward_mcp_rechecked", default=None)
_SERVER_NAME = r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$"
#: An upstream tool's own name: snake_case without a leading, trailing or double underscore.
_TOOL_PART: Final = re.compile(r"\A[a-z0-9]+(_[a-z0-9]+)*\Z")
_LIMITS_SCHEMA: Final = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        name: {"type": "number" if name in ("wall_seconds", "cpus") else "integer",
               "exclusiveMinimum": 0}
        for name in ("wall_seconds", "memory_bytes", "pids", "cpus", "output_bytes",
                     "tmp_bytes", "open_files")
    },
}
MCP_SECTION_SCHEMA: Final = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "clients": {"type": "array"},  # validated by callward.core.mcp._auth
        "servers": {
            "type": "object",
            "propertyNames": {"pattern": _SERVER_NAME, "maxLength": 24},
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "oneOf": [{"required": ["command"]}, {"required": ["url"]}],
                "properties": {
                    "command": {"type": "array", "minItems": 1,
                                "items": {"type": "string", "minLength": 1}},
                    "files": {"type": "object",
                              "additionalProperties": {"type": "string", "minLength": 1}},
                    "python_distributions": {"type": "array",
                                             "items": {"type": "string", "minLength": 1}},
                    "limits": _LIMITS_SCHEMA,
                    "url": {"type": "string", "pattern": "^https?://"},
                    "recheck_seconds": {"type": "number", "minimum": 0, "maximum": 86400},
                    # host:port targets a stdio server may reach via the egress proxy.
                    "egress": {"type": "array", "uniqueItems": True, "maxItems": 64,
                               "items": {"type": "string", "minLength": 3}},
                },
            },
        },
    },
}
_SECTION_VALIDATOR: Final = Draft202012Validator(MCP_SECTION_SCHEMA, registry=Registry())


@runtime_checkable
class McpContentPolicy(Protocol):
    """What a policy says about upstream resources and prompts (``callward.policies.Policy``)."""

    @property
    def digest(self) -> Sha256Hex: ...

    def mcp_content_rule(self, server: str, kind: Literal["resource", "prompt"], name: str,
                         principal: str) -> RuleId | None: ...

    def treat_content(self, name: str, content_json: bytes) -> ResultTreatment: ...


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """
    One upstream MCP server as the operator listed it.

    Attributes:
        command: The server's argument list inside its container (stdio servers).
        files: Files copied into the container's image, by path under the service root.
        python_distributions: Installed distributions the server imports (``mcp``).
        url: A Streamable HTTP endpoint on this machine (HTTP servers).
        recheck_seconds: How old the last ``tools/list`` may be when a call is decided;
            an older one is fetched again, so a definition changed mid-session blocks
            its tool. 0 lists again before every call.
        egress: ``host:port`` targets a stdio server may reach through the egress
            proxy; without, its container has no network.
    """

    name: str
    command: tuple[str, ...] = ()
    files: tuple[tuple[str, Path], ...] = ()
    python_distributions: tuple[str, ...] = ()
    limits: ResourceLimits = field(default_factory=ResourceLimits)
    url: str = ""
    recheck_seconds: float = 30.0
    egress: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if bool(self.command) == bool(self.url):
            raise ValueError("an upstream has a command or a url, not both")
        if self.egress and not self.command:
            raise ValueError("egress is for a stdio server (command), which runs in a container")
        for target in self.egress:
            if not is_egress_target(target):
                raise ValueError(f"egress target {target!r} is not host:port")
        if self.url:
            require_loopback_url(self.url)


def require_loopback_url(url: str) -> None:
    """
    Raises:
        ConfigurationError: ``url`` is not on a loopback address of this machine.
    """
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigurationError(f"an upstream MCP url must be on loopback, not {host!r}")


def parse_mcp_section(section: object, *, base: Path) -> tuple[UpstreamConfig, ...]:
    """
    The upstreams of a configuration's ``mcp`` section; paths are relative to ``base``.

    Raises:
        ConfigurationError: The section is invalid.
    """
    if section is None:
        return ()
    error = best_match(_SECTION_VALIDATOR.iter_errors(section))
    if error is not None:
        raise ConfigurationError(f"mcp section invalid at {error.json_path}: {error.message}")
    if not isinstance(section, dict):
        raise ConfigurationError("mcp section is not a mapping")
    upstreams = []
    for name, raw in sorted((section.get("servers") or {}).items()):
        try:
            limits = _limits(raw.get("limits") or {})
            upstreams.append(UpstreamConfig(
                name=name,
                command=tuple(raw.get("command") or ()),
                files=tuple((target, (base / source).resolve())
                            for target, source in sorted((raw.get("files") or {}).items())),
                python_distributions=tuple(raw.get("python_distributions") or ()),
                limits=limits,
                url=raw.get("url", ""),
                recheck_seconds=float(raw.get("recheck_seconds", 30.0)),
                egress=tuple(raw.get("egress") or ()),
            ))
        except ValueError as exc:
            raise ConfigurationError(f"mcp server {name}: {exc}") from exc
    return tuple(upstreams)


def _limits(given: dict[str, Any]) -> ResourceLimits:
    """An upstream's container limits: the defaults, with what the operator set."""
    default = ResourceLimits()
    return ResourceLimits(
        wall_seconds=float(given.get("wall_seconds", default.wall_seconds)),
        memory_bytes=given.get("memory_bytes", default.memory_bytes),
        pids=given.get("pids", default.pids),
        cpus=float(given.get("cpus", default.cpus)),
        output_bytes=given.get("output_bytes", default.output_bytes),
        tmp_bytes=given.get("tmp_bytes", default.tmp_bytes),
        open_files=given.get("open_files", default.open_files),
    )


def upstream_tool_digest(server: str, tool: types.Tool) -> Sha256Hex:
    """SHA-256 of the canonical definition: server, name, description, input schema."""
    return canonical_sha256({"server": server, "name": tool.name,
                             "description": tool.description or "",
                             "input_schema": tool.input_schema})


def namespaced(server: str, tool_name: str) -> str | None:
    """``server__tool`` when that is a valid callward tool name, else None."""
    name = f"{server}{NAMESPACE_SEPARATOR}{tool_name}"
    return name if is_tool_name(name) and _TOOL_PART.match(tool_name) else None


class PinStore:
    """
    The operator's approvals: ``{server: {tool: digest}}`` in one JSON file.

    Written whole to a temporary file and renamed, so a crash leaves the old or
    the new approvals, never half of them.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, dict[str, str]]:
        """
        Raises:
            ConfigurationError: The file exists but is not a pin file.
        """
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"pin file {self.path} cannot be read") from exc
        servers = raw.get("servers") if isinstance(raw, dict) else None
        if not isinstance(servers, dict):
            raise ConfigurationError(f"pin file {self.path} is not a pin file")
        return {str(s): {str(t): str(d) for t, d in tools.items()}
                for s, tools in servers.items() if isinstance(tools, dict)}

    def get(self, server: str, tool: str) -> str | None:
        return self.load().get(server, {}).get(tool)

    def pin(self, server: str, tool: str, digest: str) -> None:
        pins = self.load()
        pins.setdefault(server, {})[tool] = digest
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"version": 1, "servers": pins}, indent=2,
                                        sort_keys=True), encoding="utf-8")
        temporary.chmod(0o600)
        os.replace(temporary, self.path)


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


class PinGate:
    """
    The policy, in front of which calls to unapproved or changed upstream tools are denied.

    Everything else (schema, permissions, result rules, reloads) is ``inner``'s.
    """

    def __init__(self, inner: PolicyEngine, blocked: Mapping[str, RuleId],
                 recheck: Callable[[str], None] | None = None,
                 recheck_awaited: Callable[[str], Awaitable[None]] | None = None) -> None:
        self._inner = inner
        self._hooks = inner if isinstance(inner, PolicyHooks) else None
        # A Protocol isinstance costs microseconds: once here, not per call.
        self._shadowing = inner if isinstance(inner, ShadowingPolicy) else None
        # Held, not copied: ``recheck`` may block a tool mid-session.
        self._blocked = blocked
        self._recheck = recheck
        self._recheck_awaited = recheck_awaited

    @contextlib.asynccontextmanager
    async def rechecked(self, name: str) -> AsyncIterator[None]:
        """
        Re-check ``name`` here, the listing awaited (on the upstream client's loop);
        within the block, deciding ``name`` uses that re-check instead of listing
        again, which would wait on this loop from its own thread. A failed listing
        fails the decision, as it does in ``decide``.
        """
        error: Exception | None = None
        if self._recheck_awaited is not None:
            try:
                await self._recheck_awaited(name)
            except Exception as exc:  # noqa: BLE001 - raised again by decide, which denies
                error = exc
        token = _RECHECKED.set((name, error))
        try:
            yield
        finally:
            _RECHECKED.reset(token)

    @property
    def digest(self) -> Sha256Hex:
        return self._inner.digest

    def may_discover(self, spec: ToolSpec, context: CallContext) -> bool:
        """A blocked upstream tool leaves listings too; anything else, as the policy says."""
        return spec.name not in self._blocked and self._inner.may_discover(spec, context)

    def decide(self, call: ToolCall, spec: ToolSpec | None, context: CallContext) -> Decision:
        """
        Deny a blocked upstream tool, else ask the policy.

        A failed re-check raises, which the gateway turns into a denial.
        """
        return self.decide_with_shadow(call, spec, context)[0]

    def decide_with_shadow(self, call: ToolCall, spec: ToolSpec | None, context: CallContext
                           ) -> tuple[Decision, Mapping[str, JSONValue] | None]:
        """``decide``, with the inner policy's shadow divergence for the gateway to audit."""
        if self._recheck is not None:
            rechecked = _RECHECKED.get()
            if rechecked is None or rechecked[0] != call.name:
                self._recheck(call.name)
            elif rechecked[1] is not None:
                raise rechecked[1]
        rule = self._blocked.get(call.name)
        if rule is not None:
            message = ("this upstream tool changed since an operator approved it"
                       if rule == RUG_PULL_RULE else
                       "this upstream tool has not been approved by an operator")
            return Decision("deny", (rule,), self._inner.digest, kind="approval_required",
                            message=message), None
        if self._shadowing is not None:
            return self._shadowing.decide_with_shadow(call, spec, context)
        return self._inner.decide(call, spec, context), None

    def mcp_content_rule(self, server: str, kind: Literal["resource", "prompt"], name: str,
                         principal: str) -> RuleId | None:
        """The inner policy's rule enabling an upstream resource or prompt (None: off)."""
        if not isinstance(self._inner, McpContentPolicy):
            return None
        return self._inner.mcp_content_rule(server, kind, name, principal)

    def treat_content(self, name: str, content_json: bytes) -> ResultTreatment:
        """
        Raises:
            TypeError: The inner policy has no result rules for content (never enabled then).
        """
        if not isinstance(self._inner, McpContentPolicy):
            raise TypeError("the policy has no result rules for upstream content")
        return self._inner.treat_content(name, content_json)

    def is_blocked(self, name: str) -> bool:
        """Whether calls to ``name`` are denied until an operator approves it."""
        return name in self._blocked

    def observe_result(self, call: ToolCall, spec: ToolSpec, context: CallContext,
                       content_json: bytes) -> ResultTreatment:
        if self._hooks is None:
            return ResultTreatment(content_json=content_json)
        return self._hooks.observe_result(call, spec, context, content_json)

    def poll_reload(self) -> PolicyReload | None:
        return None if self._hooks is None else self._hooks.poll_reload()


@dataclass(frozen=True, slots=True)
class ToolStatus:
    """What became of one upstream tool at connection."""

    server: str
    tool: str
    name: str | None
    digest: Sha256Hex
    status: str  # approved, pending, blocked or refused

    def to_json(self) -> dict[str, JSONValue]:
        return {"server": self.server, "tool": self.tool, "name": self.name,
                "digest": self.digest, "status": self.status}


def upstream_spec(connection: UpstreamConnection, tool: types.Tool, name: str,
                  digest: Sha256Hex) -> ToolSpec:
    """The registry entry of an approved upstream tool; its version names the server digest."""
    return ToolSpec(
        name=name,
        version=f"mcp+{connection.digest[:16]}",
        description=tool.description or "",
        source=f"# upstream MCP tool {tool.name!r} of server {connection.config.name!r}\n",
        entrypoint="upstream",
        parameters_json=canonical_bytes(tool.input_schema),
        digest=digest,
        limits=connection.config.limits,
    )


class Upstreams:
    """
    The connected upstreams of one gateway, their routes and their blocked tools.

    ``connect`` does the I/O; ``close`` ends every client and removes every container.
    """

    def __init__(self, audit: AuditLog, pins: PinStore) -> None:
        self._audit = audit
        self._pins = pins
        self._stack = contextlib.ExitStack()
        self._portal: BlockingPortal | None = None
        self.connections: dict[str, UpstreamConnection] = {}
        self.routes: dict[str, _Route] = {}
        self.blocked: dict[str, RuleId] = {}
        self.specs: list[ToolSpec] = []
        self.statuses: list[ToolStatus] = []
        self._listed_at: dict[str, float] = {}
        self._clock = time.monotonic

    @property
    def portal(self) -> BlockingPortal | None:
        """The portal whose loop every upstream client runs on (None: none connected)."""
        return self._portal

    def connect(self, config: UpstreamConfig) -> UpstreamConnection:
        """
        Start and connect one upstream and sort its tools into approved and blocked.

        Raises:
            SandboxUnavailable: Its container could not be started.
            ConfigurationError: It could not be reached or listed.
        """
        if self._portal is None:
            self._portal = self._stack.enter_context(start_blocking_portal())
        try:
            connection = UpstreamConnection(config, self._portal, self._audit, self._stack)
            tools = connection.list_tools()
        except (SandboxUnavailable, ConfigurationError):
            raise
        except Exception as exc:
            raise ConfigurationError(f"upstream MCP server {config.name} could not be reached "
                                     f"({type(exc).__name__})") from exc
        self.connections[config.name] = connection
        self._listed_at[config.name] = self._clock()
        self._audit.append("mcp.server_connected", {
            "server": config.name, "server_digest": connection.digest,
            "image_digest": connection.image_digest or None, "url": config.url or None,
            "command": list(config.command), "tools": len(tools)})
        for tool in tools:
            self._sort(connection, tool)
        return connection

    def _sort(self, connection: UpstreamConnection, tool: types.Tool) -> None:
        server = connection.config.name
        digest = upstream_tool_digest(server, tool)
        name = namespaced(server, tool.name)
        body: dict[str, JSONValue] = {"server": server, "server_digest": connection.digest,
                                      "tool": tool.name[:256], "name": name, "digest": digest}
        if name is None:
            status = "refused"
            self._audit.append("mcp.tool_refused", {**body, "reason": "name"})
        else:
            pinned = self._pins.get(server, tool.name)
            if pinned == digest:
                status = "approved"
                self.specs.append(upstream_spec(connection, tool, name, digest))
                self.routes[name] = _Route(connection, tool.name)
            elif pinned is None:
                status = "pending"
                self.blocked[name] = UNAPPROVED_RULE
                self._audit.append("mcp.tool_pending", body)
            else:
                status = "blocked"
                self.blocked[name] = RUG_PULL_RULE
                self._audit.append("mcp.tool_blocked", {**body, "pinned_digest": pinned,
                                                        "reason": "definition_changed"})
                log.warning("mcp_rug_pull_blocked", server=server, tool=name)
        self.statuses.append(ToolStatus(server, tool.name, name, digest, status))

    def recheck(self, name: str) -> None:
        """
        Before ``name`` is decided: list its server's tools again when the last listing
        is older than ``recheck_seconds``, and block every routed tool of that server
        whose definition changed or that is gone (``mcp.tool_blocked``).

        Raises:
            Exception: The server could not be listed (the gateway denies the call).
        """
        due = self._recheck_due(name)
        if due is not None:
            connection, now = due
            self._absorb_listing(connection, now, connection.list_tools())

    async def recheck_awaited(self, name: str) -> None:
        """
        ``recheck``, the listing awaited on the server's client loop (where this runs).

        Raises:
            Exception: The server could not be listed (the gateway denies the call).
        """
        due = self._recheck_due(name)
        if due is not None:
            connection, now = due
            self._absorb_listing(connection, now, await connection.list_tools_awaited())

    def _recheck_due(self, name: str) -> tuple[UpstreamConnection, float] | None:
        """The connection to list again before ``name`` is decided (its listing is old), and now."""
        route = self.routes.get(name)
        if route is None:
            return None
        connection = route.connection
        server = connection.config.name
        now = self._clock()
        if now - self._listed_at.get(server, now) < connection.config.recheck_seconds:
            return None
        return connection, now

    def _absorb_listing(self, connection: UpstreamConnection, now: float,
                        tools: list[types.Tool]) -> None:
        """Block every routed tool of ``connection`` whose listed definition left its pin."""
        server = connection.config.name
        current = {tool.name: upstream_tool_digest(server, tool) for tool in tools}
        self._listed_at[server] = now
        for routed, other in list(self.routes.items()):
            if other.connection is not connection:
                continue
            pinned = self._pins.get(server, other.tool)
            if current.get(other.tool) == pinned:
                continue
            del self.routes[routed]
            self.blocked[routed] = RUG_PULL_RULE
            self._audit.append("mcp.tool_blocked", {
                "server": server, "server_digest": connection.digest, "tool": other.tool,
                "name": routed, "digest": current.get(other.tool), "pinned_digest": pinned,
                "reason": "definition_changed" if other.tool in current else "tool_removed"})
            log.warning("mcp_rug_pull_blocked", server=server, tool=routed, in_session=True)

    def approve(self, server: str, tools: tuple[str, ...] = ()) -> list[ToolStatus]:
        """
        Pin the current definitions of ``tools`` (all when empty) of a connected server.

        Returns:
            The statuses of the tools now approved.
        """
        approved = []
        for status in self.statuses:
            if status.server != server or (tools and status.tool not in tools):
                continue
            if status.name is None or status.status == "approved":
                continue
            previous = self._pins.get(server, status.tool)
            self._pins.pin(server, status.tool, status.digest)
            kind = "mcp.tool_pinned" if previous is None else "mcp.tool_reapproved"
            self._audit.append(kind, {"server": server, "tool": status.tool,
                                      "name": status.name, "digest": status.digest,
                                      "previous_digest": previous})
            approved.append(ToolStatus(server, status.tool, status.name, status.digest,
                                       "approved"))
        return approved

    def close(self) -> None:
        """End every client and remove every container; safe to call twice."""
        stack, self._stack = self._stack, contextlib.ExitStack()
        stack.close()
        self._portal = None


@contextlib.contextmanager
def connected_upstreams(configs: tuple[UpstreamConfig, ...], *, audit: AuditLog,
                        pins: PinStore) -> Iterator[Upstreams]:
    """Connect each upstream in turn; every one is closed on exit, also after a failure."""
    upstreams = Upstreams(audit, pins)
    try:
        for config in configs:
            upstreams.connect(config)
        yield upstreams
    finally:
        upstreams.close()


def raw_mcp_section(config_path: Path) -> Any:
    """The configuration file's ``mcp`` section (validated by ``parse_mcp_section``)."""
    import yaml  # noqa: PLC0415 - as _config reads it

    raw = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    return raw.get("mcp") if isinstance(raw, dict) else None
