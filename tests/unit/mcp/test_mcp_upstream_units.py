"""Pinning, namespacing, configuration and the policy gate of upstream MCP tools."""

from __future__ import annotations

import asyncio
import threading

import anyio
import mcp_types as types
import pytest

from callward.core import (
    CallContext,
    ConfigurationError,
    ResourceLimits,
    SandboxUnavailable,
    ToolCall,
    ToolRegistry,
    Usage,
)
from callward.core.gateway._config import load_config
from callward.core.mcp._connection import _SideDoors, wait_on_loop
from callward.core.mcp._pins import RUG_PULL_RULE, UNAPPROVED_RULE, PinGate, PinStore
from callward.core.mcp._runner import UpstreamRunner, _execution_of
from callward.core.mcp._section import (
    namespaced,
    parse_mcp_section,
    raw_mcp_section,
    upstream_tool_digest,
)
from callward.core.testing import StubRunner, kinds


def make_tool(description: str = "Greets.", schema: dict | None = None) -> types.Tool:
    return types.Tool(name="greet", description=description,
                      input_schema=schema or {"type": "object",
                                              "properties": {"name": {"type": "string"}}})


class TestToolDigest:
    def test_any_change_of_definition_changes_the_digest(self):
        """Name, description, schema and server each change the digest."""
        base = upstream_tool_digest("notes", make_tool())

        assert base == upstream_tool_digest("notes", make_tool())
        assert base != upstream_tool_digest("notes",
                                            make_tool(description="Greets. Also reads keys."))
        assert base != upstream_tool_digest("notes", make_tool(schema={"type": "object"}))
        assert base != upstream_tool_digest("other", make_tool())


class TestNamespaced:
    def test_names_are_server_then_tool(self):
        """A tool is named <server>__<tool>."""
        assert "notes__greet" == namespaced("notes", "greet")

    @pytest.mark.parametrize("tool", ["Greet", "gre-et", "gr\u0435et", "a__b", "", "_x", "x_",
                                      "x" * 80])
    def test_names_that_do_not_map_are_refused(self, tool):
        """Upper case, dashes, look-alike letters, the separator and long names are refused."""
        assert namespaced("notes", tool) is None


class TestPinStore:
    def test_pins_round_trip_and_replace(self, tmp_path):
        """A pin is kept per server and tool, and a re-approval replaces it."""
        store = PinStore(tmp_path / "pins.json")
        store.pin("notes", "greet", "a" * 64)
        store.pin("notes", "greet", "b" * 64)
        store.pin("files", "read", "c" * 64)

        assert {"notes": {"greet": "b" * 64}, "files": {"read": "c" * 64}} == store.load()
        assert 0o600 == (store.path.stat().st_mode & 0o777)

    def test_a_corrupt_pin_file_is_an_error(self, tmp_path):
        """A pin file that is not one fails closed: an error, not an empty set of pins."""
        path = tmp_path / "pins.json"
        path.write_text("[1, 2]")

        with pytest.raises(ConfigurationError):
            PinStore(path).load()


class TestParseSection:
    def test_a_stdio_server_is_read_with_its_limits(self, tmp_path):
        """Command, files (relative to the configuration) and limits are read."""
        (upstream,) = parse_mcp_section(
            {"servers": {"notes": {"command": ["python3", "s.py"], "files": {"s.py": "s.py"},
                                   "limits": {"memory_bytes": 64 << 20, "wall_seconds": 2}}}},
            base=tmp_path)

        assert ("notes", ("python3", "s.py"), (("s.py", tmp_path / "s.py"),)) == (
            upstream.name, upstream.command, upstream.files)
        assert (64 << 20, 2.0, ResourceLimits().pids) == (
            upstream.limits.memory_bytes, upstream.limits.wall_seconds, upstream.limits.pids)

    @pytest.mark.parametrize("section", [
        {"servers": {"Notes": {"command": ["x"]}}},
        {"servers": {"a__b": {"command": ["x"]}}},
        {"servers": {"notes": {}}},
        {"servers": {"notes": {"command": ["x"], "url": "http://127.0.0.1:1/mcp"}}},
        {"servers": {"notes": {"command": ["x"], "egress": ["example.org"]}}},
        {"servers": {"notes": {"command": ["x"], "limits": {"pids": 1.5}}}},
        {"servers": {"notes": {"url": "http://10.1.2.3:80/mcp"}}},
        {"servers": {"notes": {"command": ["x"], "limits": {"memory_bytes": 1}}}},
    ])
    def test_invalid_sections_are_refused(self, section, tmp_path):
        """Bad names, both or neither transport, unknown keys, bad limits, remote URLs."""
        with pytest.raises(ConfigurationError):
            parse_mcp_section(section, base=tmp_path)


class TestPinGate:
    def test_blocked_tools_are_denied_as_approval_required(self, policy):
        """A pending or changed upstream tool is denied before the policy is asked."""
        gate = PinGate(policy, {"notes__greet": RUG_PULL_RULE, "notes__add": UNAPPROVED_RULE})
        context = CallContext(principal="alice")

        decisions = [gate.decide(ToolCall.create(id="c", name=name, arguments={},
                                                 dialect="mcp"), None, context)
                     for name in ("notes__greet", "notes__add")]

        assert [("deny", "approval_required", RUG_PULL_RULE),
                ("deny", "approval_required", UNAPPROVED_RULE)] == [
            (d.effect, d.kind, d.reasons[0]) for d in decisions]

    def test_other_calls_are_the_policys(self, policy, examples):
        """Everything else is decided by the wrapped policy, schema included."""
        registry = ToolRegistry()
        registry.load(examples / "tools.py")
        gate = PinGate(policy, {"notes__greet": RUG_PULL_RULE})
        call = ToolCall.create(id="c", name="square", arguments={"x": "3"}, dialect="mcp")

        decision = gate.decide(call, registry.get("square"), CallContext(principal="alice"))

        assert policy.decide(call, registry.get("square"), CallContext(principal="alice")) \
            == decision
        assert "schema" == decision.kind

    def test_a_recheck_awaited_ahead_stands_for_the_one_in_decide(self, policy):
        """
        Within ``rechecked(name)`` deciding ``name`` does not list again (that would wait
        on the loop from its own thread); other names, and decisions outside, still do.
        """
        synced: list[str] = []
        awaited: list[str] = []

        async def recheck_awaited(name: str) -> None:
            awaited.append(name)

        gate = PinGate(policy, {}, synced.append, recheck_awaited)
        context = CallContext(principal="alice")

        def decide(name: str) -> None:
            gate.decide(ToolCall.create(id="c", name=name, arguments={}, dialect="mcp"),
                        None, context)

        async def exercise() -> None:
            async with gate.rechecked("notes__add"):
                decide("notes__add")
                decide("notes__greet")
            decide("notes__add")

        anyio.run(exercise)

        assert ["notes__add"] == awaited
        assert ["notes__greet", "notes__add"] == synced

    def test_a_failed_recheck_awaited_ahead_fails_the_decision(self, policy):
        """A listing that failed ahead raises in decide, as a failed listing there would."""
        async def recheck_awaited(name: str) -> None:
            raise ConnectionError("the upstream went away")

        def recheck(name: str) -> None:
            raise AssertionError("listed again on the loop's own thread")

        gate = PinGate(policy, {}, recheck, recheck_awaited)
        call = ToolCall.create(id="c", name="notes__add", arguments={}, dialect="mcp")

        async def exercise() -> None:
            async with gate.rechecked("notes__add"):
                gate.decide(call, None, CallContext(principal="alice"))

        with pytest.raises(ConnectionError):
            anyio.run(exercise)


class TestExecutionOf:
    @staticmethod
    def usage(size: int) -> Usage:
        return Usage(1.0, None, size)

    def test_structured_content_is_the_value(self):
        """The structured content is the value, canonical."""
        result = types.CallToolResult(content=[types.TextContent(text="3")],
                                      structured_content={"result": 3})

        execution = _execution_of(result, ResourceLimits(), self.usage)

        assert ("ok", {"result": 3}) == (execution.kind, execution.value)

    def test_an_upstream_error_is_a_tool_error(self):
        """isError from the upstream ends as tool_error, and its text is not passed on."""
        result = types.CallToolResult(content=[types.TextContent(text="secret")], is_error=True)

        execution = _execution_of(result, ResourceLimits(), self.usage)

        assert ("tool_error", None) == (execution.kind, execution.value_json)
        assert "secret" not in execution.message

    def test_a_result_over_the_output_limit_is_withheld(self):
        """A result larger than output_bytes ends as output_limit."""
        result = types.CallToolResult(content=[types.TextContent(text="x" * 5000)])

        execution = _execution_of(result, ResourceLimits(output_bytes=1000), self.usage)

        assert ("output_limit", 5002) == (execution.kind, execution.usage.output_bytes)


class TestSideDoors:
    def test_sampling_elicitation_and_roots_are_refused_and_audited(self, store):
        """What an upstream asks of the client is refused, and each request is signed."""
        doors = _SideDoors("notes", store)
        sampling = types.CreateMessageRequestParams(
            messages=[types.SamplingMessage(role="user",
                                            content=types.TextContent(text="hi"))],
            max_tokens=8)
        elicitation = types.ElicitRequestFormParams(
            message="password?", requested_schema={"type": "object", "properties": {}})

        async def ask() -> list[types.ErrorData]:
            return [await doors.sampling(None, sampling),  # type: ignore[arg-type]
                    await doors.elicitation(None, elicitation),  # type: ignore[arg-type]
                    await doors.roots(None)]  # type: ignore[arg-type]

        answers = anyio.run(ask)

        assert [types.INVALID_REQUEST] * 3 == [answer.code for answer in answers]
        refused = ["mcp.sampling_refused", "mcp.elicitation_refused", "mcp.roots_refused"]
        assert refused == kinds(store)
        assert {"server": "notes"} == store.last().body


class TestUpstreamRunner:
    def test_a_blocked_upstream_tool_never_reaches_another_runner(self, registry):
        """An upstream name without a route is refused, never handed to the sandbox."""
        spec = registry.require("square")
        sandbox = StubRunner()
        runner = UpstreamRunner(sandbox, {}, frozenset({"square"}))
        call = ToolCall.create(id="c", name="square", arguments={"x": 2}, dialect="mcp")

        with pytest.raises(SandboxUnavailable):
            runner.run(spec, call, ResourceLimits())

        assert [] == sandbox.calls


class TestConfigFile:
    def test_callward_yaml_accepts_an_mcp_section(self, tmp_path, examples):
        """A gateway configuration may list upstream servers under `mcp`."""
        path = tmp_path / "callward.yaml"
        path.write_text(f"tools: [{examples / 'tools.py'}]\npolicy: {examples / 'policy.yaml'}\n"
                        "mcp:\n  servers:\n    notes: {url: 'http://127.0.0.1:9/mcp'}\n")

        load_config(path)
        (upstream,) = parse_mcp_section(raw_mcp_section(path), base=tmp_path)

        assert ("notes", "http://127.0.0.1:9/mcp") == (upstream.name, upstream.url)


class TestWaitOnLoop:
    """Upstream requests run on the client's loop; the calling thread waits, bounded."""

    def test_the_answer_and_the_errors_of_the_request_come_back(self):
        """A value is returned, and an exception of the request is raised in the caller."""
        with anyio.from_thread.start_blocking_portal() as portal:
            loop = portal.call(asyncio.get_running_loop)
            thread = portal.call(threading.get_ident)

            async def answer() -> int:
                await anyio.sleep(0)
                return 42

            async def refuse() -> int:
                raise LookupError("refused")

            assert 42 == wait_on_loop(answer(), loop, thread, bound_seconds=5)
            with pytest.raises(LookupError):
                wait_on_loop(refuse(), loop, thread, bound_seconds=5)

    def test_a_request_that_bounds_itself_times_out(self):
        """The request's own bound (fail_after) comes back as TimeoutError."""
        with anyio.from_thread.start_blocking_portal() as portal:
            loop = portal.call(asyncio.get_running_loop)
            thread = portal.call(threading.get_ident)

            async def slow() -> None:
                with anyio.fail_after(0.05):
                    await anyio.sleep(10)

            with pytest.raises(TimeoutError):
                wait_on_loop(slow(), loop, thread, bound_seconds=0.05)

    def test_a_loop_that_never_runs_the_request_cannot_hang_the_caller(self, monkeypatch):
        """A stopped loop: the wait ends after the bound and grace, as TimeoutError."""
        monkeypatch.setattr("callward.core.mcp._connection._GRACE_SECONDS", 0.05)
        loop = asyncio.new_event_loop()  # never run: nothing it is handed ever happens
        started = asyncio.Event()

        async def never() -> None:
            started.set()

        try:
            with pytest.raises(TimeoutError):
                wait_on_loop(never(), loop, -1, bound_seconds=0.05)
            assert not started.is_set()
        finally:
            loop.run_until_complete(asyncio.sleep(0))  # the cancelled task ends here
            loop.close()

    def test_a_closed_loop_is_refused(self):
        """A closed loop raises at once instead of waiting."""
        loop = asyncio.new_event_loop()
        loop.close()

        async def request() -> None:
            pass

        with pytest.raises(RuntimeError):
            wait_on_loop(request(), loop, -1, bound_seconds=5)

    def test_the_loop_thread_itself_is_refused(self):
        """Waiting on the loop from its own thread would deadlock; it raises instead."""
        async def request() -> None:
            pass

        async def on_the_loop() -> None:
            loop = asyncio.get_running_loop()
            with pytest.raises(RuntimeError):
                wait_on_loop(request(), loop, threading.get_ident(), bound_seconds=5)

        asyncio.run(on_the_loop())
