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

Its parts: the ``mcp`` section (``_section``), pins and the gate (``_pins``), one
connection (``_connection``) and the runner (``_runner``); this module connects them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import mcp_types as types
import structlog
from anyio.from_thread import BlockingPortal, start_blocking_portal

from callward.core._canonical import JSONValue, Sha256Hex, canonical_bytes
from callward.core.errors import ConfigurationError, SandboxUnavailable
from callward.core.mcp._connection import UpstreamConnection
from callward.core.mcp._pins import RUG_PULL_RULE, UNAPPROVED_RULE, Pins
from callward.core.mcp._runner import _Route
from callward.core.mcp._section import UpstreamConfig, namespaced, upstream_tool_digest
from callward.core.protocols import AuditLog
from callward.core.types import RuleId, ToolSpec

log = structlog.get_logger()


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

    def __init__(self, audit: AuditLog, pins: Pins) -> None:
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
                        pins: Pins) -> Iterator[Upstreams]:
    """Connect each upstream in turn; every one is closed on exit, also after a failure."""
    upstreams = Upstreams(audit, pins)
    try:
        for config in configs:
            upstreams.connect(config)
        yield upstreams
    finally:
        upstreams.close()
