"""The MCP server face, driven in-process by the SDK's own client."""

from __future__ import annotations

from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client, MCPError
from mcp.server.lowlevel import Server

from callward.core import (
    ConfigurationError,
    Execution,
    ResourceLimits,
    ToolCall,
    ToolSpec,
)
from callward.core.mcp._server import McpFace, http_app, require_loopback
from callward.core.testing import StubFailingAuditLog, kinds, ok_execution
from callward.policies import Policy


def run_client(face: McpFace, calls: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    async def go() -> list[Any]:
        async with Client(face.server()) as client:
            return [await client.call_tool(name, arguments) for name, arguments in calls]

    return anyio.run(go)


class TestMcpFace:
    @pytest.mark.parametrize(("principal", "expected"), [
        ("alice", ["add", "capital", "spin", "square"]),             # an analyst
        ("dana", ["add", "capital", "drop_table", "spin", "square"]),  # analyst and DBA
        ("mallory", ["square"]),                                      # a guest
        ("eve", []),                                                  # unknown to the policy
    ])
    def test_lists_what_the_principal_could_be_allowed(self, gateway, principal, expected):
        """tools/list gives each tool the caller could be allowed, with its input schema."""
        async def go() -> Any:
            async with Client(McpFace(gateway, principal=principal).server()) as client:
                return await client.list_tools()

        listed = anyio.run(go)

        assert expected == sorted(tool.name for tool in listed.tools)
        for tool in listed.tools:
            assert gateway.registry.require(tool.name).parameters == tool.input_schema

    def test_a_hidden_tool_is_still_decided_and_denied_by_name(self, gateway, runner):
        """drop_table is not listed to alice, and calling it by name is denied, not run."""
        (result,) = run_client(McpFace(gateway, principal="alice"),
                               [("drop_table", {"table": "users"})])

        expected = ("permission", [])
        assert expected == (result.structured_content["kind"], runner.calls)

    def test_allowed_call_returns_value_and_receipt(self, gateway, store):
        """An allowed call is the gateway's result: value as text, kind and receipt structured."""
        (result,) = run_client(McpFace(gateway, principal="alice"), [("square", {"x": 7})])

        assert (False, "49") == (result.is_error, result.content[0].text)
        assert store.last().seq == result.structured_content["receipt"]["seq"]
        authorized = [record for record in store.records() if record.kind == "call.authorized"]
        assert ["mcp"] == [record.body["call"]["dialect"] for record in authorized]

    def test_denials_are_tool_errors_with_their_kind(self, gateway):
        """Denied, unknown and schema-breaking calls come back as MCP tool errors with kinds."""
        face = McpFace(gateway, principal="mallory")
        results = run_client(face, [("drop_table", {"table": "users"}),
                                    ("no_such_tool", {}), ("square", {"x": "seven"})])

        assert [(True, "permission"), (True, "unknown_tool"), (True, "schema")] == [
            (result.is_error, result.structured_content["kind"]) for result in results]
        assert ["permission", "unknown_tool", "schema"] == [
            result.meta["callward/kind"] for result in results]
        assert [] == gateway.runner.calls

    def test_failed_audit_returns_no_result(self, make_gateway, store, runner):
        """When the audit log fails, the client gets audit_unavailable and no value."""
        broken = make_gateway(audit=StubFailingAuditLog(store, fail_from=1))

        (result,) = run_client(McpFace(broken, principal="alice"), [("square", {"x": 7})])

        assert (True, "audit_unavailable") == (result.is_error,
                                               result.structured_content["kind"])
        assert "49" not in result.content[0].text
        assert ([], []) == (runner.calls, list(store.records()))

    def test_no_resources_or_prompts_are_served(self, gateway):
        """Resources and prompts are not a side door: the face does not serve them."""
        async def go() -> list[str]:
            refused = []
            async with Client(McpFace(gateway, principal="alice").server()) as client:
                for request in (client.list_resources, client.list_prompts):
                    try:
                        await request()
                    except MCPError:
                        refused.append(request.__name__)
            return refused

        assert ["list_resources", "list_prompts"] == anyio.run(go)


class TestRequireLoopback:
    @pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
    def test_loopback_hosts_are_accepted(self, host):
        """Loopback addresses may be served on."""
        require_loopback(host)

    @pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.1", "::", "example.org"])  # noqa: S104
    def test_other_hosts_are_refused(self, host):
        """Any other address is a configuration error."""
        with pytest.raises(ConfigurationError):
            require_loopback(host)


class TestHttpBatch:
    def test_a_json_rpc_batch_runs_nothing(self, gateway, store):
        """
        Over Streamable HTTP a JSON-RPC batch of tools/call is refused whole (400):
        no call runs and none is recorded, so a batch cannot go around policy.
        """
        app = http_app(McpFace(gateway, principal="mallory"), host="127.0.0.1")
        headers = {"accept": "application/json, text/event-stream",
                   "content-type": "application/json"}
        initialize = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "test", "version": "1"}}}
        batch = [{"jsonrpc": "2.0", "id": index, "method": "tools/call",
                  "params": {"name": name, "arguments": arguments}}
                 for index, (name, arguments) in enumerate(
                     [("square", {"x": 3}), ("drop_table", {"table": "users"})], 1)]

        async def post_batch() -> int:
            async with app.router.lifespan_context(app), httpx2.AsyncClient(
                    transport=httpx2.ASGITransport(app=app),
                    base_url="http://127.0.0.1:8750") as client:
                opened = await client.post("/mcp", json=initialize, headers=headers)
                session = {"mcp-session-id": opened.headers["mcp-session-id"],
                           "mcp-protocol-version": "2025-06-18"}
                await client.post("/mcp", headers={**headers, **session},
                                  json={"jsonrpc": "2.0", "method": "notifications/initialized"})
                refused = await client.post("/mcp", json=batch, headers={**headers, **session})
                return refused.status_code

        assert 400 == anyio.run(post_batch)
        assert [] == gateway.runner.calls
        assert [] == list(store.records())


class TestHandleAwaiting:
    """``Gateway.handle_awaiting``: ``handle`` with the run awaited (upstream tools)."""

    @staticmethod
    def square(x: object = 5) -> ToolCall:
        return ToolCall.create(id="c1", name="square", arguments={"x": x}, dialect="mcp")

    def test_the_same_records_and_result_as_handle(self, gateway, store):
        """Decided, authorized before the run, completed after it, with a receipt."""
        order: list[str] = []

        async def run(spec: ToolSpec, call: ToolCall, limits: ResourceLimits) -> Execution:
            order.append(list(store.records())[-1].kind)  # what is durable when the run starts
            await anyio.sleep(0)
            return ok_execution(25)

        async def exercise() -> Any:
            return await gateway.handle_awaiting(self.square(), principal="alice", run=run)

        result = anyio.run(exercise)

        assert ["call.authorized"] == order
        assert ("ok", 25) == (result.kind, result.content)
        assert ["call.authorized", "call.completed"] == kinds(store)
        assert result.receipt.seq == 2

    def test_a_denied_call_never_runs(self, gateway, store):
        """A denial is audited and returned; ``run`` is never awaited."""
        async def run(spec: ToolSpec, call: ToolCall, limits: ResourceLimits) -> Execution:
            raise AssertionError("a denied call ran")

        async def exercise() -> Any:
            return await gateway.handle_awaiting(self.square("seven"), principal="alice",
                                                 run=run)

        result = anyio.run(exercise)

        assert "schema" == result.kind
        assert ["call.denied"] == kinds(store)

    def test_a_run_that_raises_is_sandbox_unavailable(self, gateway, store):
        """An unexpected failure of the run ends as sandbox_unavailable, audited."""
        async def run(spec: ToolSpec, call: ToolCall, limits: ResourceLimits) -> Execution:
            raise OSError("the pipe broke")

        async def exercise() -> Any:
            return await gateway.handle_awaiting(self.square(), principal="alice", run=run)

        result = anyio.run(exercise)

        assert "sandbox_unavailable" == result.kind
        assert ["call.authorized", "call.completed"] == kinds(store)

    def test_a_run_cancelled_midway_is_completed_in_the_log(self, gateway, store):
        """Cancelled while it ran: its call.completed is written before cancelling goes on."""
        started = anyio.Event()

        async def run(spec: ToolSpec, call: ToolCall, limits: ResourceLimits) -> Execution:
            started.set()
            await anyio.sleep(30)
            raise AssertionError("not cancelled")

        async def exercise() -> None:
            async with anyio.create_task_group() as group:
                async def call() -> None:
                    await gateway.handle_awaiting(self.square(), principal="alice", run=run)

                group.start_soon(call)
                await started.wait()
                group.cancel_scope.cancel()

        anyio.run(exercise)

        records = list(store.records())
        assert ["call.authorized", "call.completed"] == [r.kind for r in records]
        assert "sandbox_unavailable" == records[-1].body["outcome"]


def test_the_face_builds_no_tracing_span_per_request(gateway):
    """The SDK's per-request OTel middleware (by that name) is left out of the face."""
    names = [type(m).__name__ for m in McpFace(gateway, principal="alice").server().middleware]

    assert "OpenTelemetryMiddleware" in [type(m).__name__ for m in Server("x").middleware]
    assert "OpenTelemetryMiddleware" not in names


def test_a_placed_call_runs_as_handle_does(make_gateway, runner, tmp_path):
    """A decision that places the call (session isolation) runs the runner on a thread."""
    (tmp_path / "policy.yaml").write_text(
        "version: 1\ndefault: deny\nprincipals:\n  alice: {roles: [analyst]}\nrules:\n"
        "  - {id: squares, effect: allow, roles: [analyst], tools: [square]}\n"
        "tools:\n  square: {isolation: session}\n")
    gateway = make_gateway(policy=Policy.from_file(tmp_path / "policy.yaml"))

    async def run(spec: ToolSpec, call: ToolCall, limits: ResourceLimits) -> Execution:
        raise AssertionError("a placed call was awaited, not placed")

    async def exercise() -> Any:
        return await gateway.handle_awaiting(TestHandleAwaiting.square(), principal="alice",
                                             run=run)

    result = anyio.run(exercise)

    assert ("ok", 25) == (result.kind, result.content)
    assert 1 == len(runner.calls)
    assert "session" == result.decision.isolation
