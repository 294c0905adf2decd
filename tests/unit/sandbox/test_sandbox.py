"""Sandbox, the public class: placement, the wall clock and the output cap around a backend."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from callward.core import (
    Execution,
    Placement,
    ResourceLimits,
    SandboxUnavailable,
    Sha256Hex,
    ToolCall,
    ToolSpec,
    canonical_bytes,
    sha256_hex,
)
from callward.core._canonical import canonical_loads
from callward.sandbox import EnvironmentSecretSource, Sandbox, SecretUnavailable
from callward.sandbox._sandbox import exchange
from callward.sandbox.base import Ending, Observation, session_container_key

LIMITS = ResourceLimits(wall_seconds=2.0, output_bytes=1000)
TOKEN = "cwsecret-0123456789abcdef"  # noqa: S105 - a test value


class FakeClock:
    """Monotonic seconds that move only when a stub waits."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Output:
    """One read of the runner's output, ``after`` seconds after the one before."""

    stdout: bytes = b""
    stderr_bytes: int = 0
    after: float = 0.0


@dataclass
class StubChannel:
    """Replays canned output on the fake clock; keeps the request and how it was finished."""

    backend: StubBackend
    outputs: list[Output]
    observation: Observation
    warm: bool = False
    head_start_seconds: float = 0.0
    lost: bool = False
    egress_proxy: str = ""

    def send(self, request: bytes, timeout_seconds: float) -> None:
        self.backend.requests.append(request)

    def receive(self, timeout_seconds: float) -> tuple[bytes, int] | None:
        if not self.outputs:
            return None
        output = self.outputs[0]
        if output.after > timeout_seconds:
            self.backend.clock.now += timeout_seconds
            output.after -= timeout_seconds
            raise TimeoutError
        self.backend.clock.now += output.after
        self.outputs.pop(0)
        return output.stdout, len(output.stdout) + output.stderr_bytes

    def finish(self, ending: Ending) -> Observation:
        self.backend.endings.append(ending)
        if self.lost:
            raise SandboxUnavailable("the container is gone")
        return self.observation


@dataclass
class StubBackend:
    """A backend whose runners replay ``outputs``; records what it was asked."""

    outputs: Sequence[Output] = ()
    observation: Observation = field(default_factory=lambda: Observation("c" * 64, exit_code=0))
    clock: FakeClock = field(default_factory=FakeClock)
    head_start_seconds: float = 0.0
    warm_lost: bool = False
    requests: list[bytes] = field(default_factory=list)
    endings: list[Ending] = field(default_factory=list)
    opened: list[tuple[str, tuple[str, ...], bool]] = field(default_factory=list)
    ended_sessions: list[str] = field(default_factory=list)
    closed: int = 0

    @property
    def image_digest(self) -> Sha256Hex:
        return sha256_hex(b"stub image")

    def open(self, limits: ResourceLimits, *, session: str = "", egress: tuple[str, ...] = (),
             warm: bool = True) -> StubChannel:
        self.opened.append((session, egress, warm))
        lost = self.warm_lost and warm
        return StubChannel(self, [Output(o.stdout, o.stderr_bytes, o.after) for o in self.outputs],
                           self.observation, warm=lost, lost=lost,
                           head_start_seconds=self.head_start_seconds,
                           egress_proxy="http://proxy:3128" if egress else "")

    def end_session(self, session: str) -> None:
        self.ended_sessions.append(session)

    def close(self) -> None:
        self.closed += 1


def make_spec() -> ToolSpec:
    return ToolSpec(
        name="square",
        version="1.0.0",
        description="",
        source="def square(x):\n    return x * x\n",
        entrypoint="square",
        parameters_json=canonical_bytes({"type": "object"}),
        digest=sha256_hex(b"square"),
    )


def make_call() -> ToolCall:
    return ToolCall.create(id="c1", name="square", arguments={"x": 3}, dialect="api")


def runner_line(result: dict[str, object]) -> bytes:
    return json.dumps(result).encode() + b"\n"


OK = runner_line({"ok": True, "value": 9})


def sandbox_on(backend: StubBackend, **options: object) -> Sandbox:
    return Sandbox(backend, clock=backend.clock, **options)  # type: ignore[arg-type]


def run(backend: StubBackend, placement: Placement | None = None,
        limits: ResourceLimits = LIMITS) -> Execution:
    return sandbox_on(backend).run_placed(make_spec(), make_call(), limits,
                                          placement or Placement())


class TestSandboxRequest:
    def test_request_is_canonical_json_of_source_entrypoint_and_arguments(self) -> None:
        """The runner gets RFC 8785 bytes of {source, entrypoint, arguments} on stdin."""
        backend = StubBackend([Output(OK)])

        run(backend)

        expected = canonical_bytes(
            {"source": make_spec().source, "entrypoint": "square", "arguments": {"x": 3}}
        )
        assert [expected] == backend.requests

    def test_image_digest_is_the_backends(self) -> None:
        """The digest a gateway records is the one the backend runs."""
        assert sha256_hex(b"stub image") == Sandbox(StubBackend()).image_digest

    def test_a_result_ends_the_exchange_as_result(self) -> None:
        """The runner's result line is read and the runner is finished as result."""
        backend = StubBackend([Output(OK), Output(b"never read\n", after=60.0)])

        execution = run(backend)

        expected = ("ok", 9, ["result"])
        assert expected == (execution.kind, execution.value, backend.endings)

    def test_output_that_ends_without_a_result_is_silent(self) -> None:
        """Output that ends with no result line: tool_error, the runner finished as silent."""
        backend = StubBackend([Output(b"half a line")],
                              observation=Observation("c" * 64, exit_code=1))

        execution = run(backend)

        expected = ("tool_error", ["silent"])
        assert expected == (execution.kind, backend.endings)


class TestSandboxWallClock:
    def test_a_runner_silent_past_the_deadline_is_stopped_there(self) -> None:
        """Sandbox stops reading at wall_seconds and has the runner killed: timeout."""
        backend = StubBackend([Output(OK, after=5.0)])

        execution = run(backend)

        expected = ("timeout", ["limit"], 2000.0)
        assert expected == (execution.kind, backend.endings, execution.usage.wall_ms)

    def test_a_cold_containers_start_counts_against_the_tool(self) -> None:
        """The time a container started for the call took before open returned is the tool's."""
        backend = StubBackend([Output(OK, after=1.0)], head_start_seconds=1.5)

        execution = run(backend)

        expected = ("timeout", ["limit"])
        assert expected == (execution.kind, backend.endings)

    def test_a_session_call_past_wall_seconds_is_timeout_even_with_a_result(self) -> None:
        """A session's runner gets a grace to report; the host still says timeout."""
        backend = StubBackend([Output(OK, after=2.2)])

        execution = run(backend, Placement(isolation="session", principal="alice"))

        expected = ("timeout", ["result"])
        assert expected == (execution.kind, backend.endings)

    def test_an_error_while_reading_finishes_the_runner_and_propagates(self) -> None:
        """Whatever raises during the exchange, the runner is finished (killed) first."""
        backend = StubBackend([Output(OK)])
        backend.requests = None  # type: ignore[assignment] - send() now raises

        with pytest.raises(AttributeError):
            run(backend)

        expected = ["limit"]
        assert expected == backend.endings


class TestSandboxOutputCap:
    def test_a_flood_is_stopped_past_the_cap(self) -> None:
        """More than output_bytes ends the exchange at once: output_limit, runner killed."""
        backend = StubBackend([Output(b"x" * 600), Output(b"y" * 600), Output(OK)])

        execution = run(backend)

        expected = ("output_limit", ["limit"], 1200)
        assert expected == (execution.kind, backend.endings, execution.usage.output_bytes)

    def test_stderr_counts_toward_the_cap(self) -> None:
        """Output is stdout and stderr together: a flood on stderr is output_limit."""
        backend = StubBackend([Output(b"", stderr_bytes=2000), Output(OK)])

        expected = "output_limit"
        assert expected == run(backend).kind


class TestExchange:
    def test_stdout_is_cut_at_the_cap_but_counted_past_it(self) -> None:
        """No more than the cap is held, while the count shows how far past it the tool went."""
        backend = StubBackend()
        channel = StubChannel(backend, [Output(b"0123456789")], backend.observation)

        exchanged = exchange(channel, b"{}", deadline=200.0, output_cap=4, clock=backend.clock)

        expected = (b"0123", 10, True)
        assert expected == (exchanged.stdout, exchanged.output_bytes, exchanged.output_cap_hit)

    def test_reading_stops_at_the_first_line(self) -> None:
        """The runner's one line is its result: nothing after it is waited for."""
        backend = StubBackend()
        channel = StubChannel(backend, [Output(b'{"ok"'), Output(b":true}\nlater"),
                                        Output(b"more", after=60.0)], backend.observation)

        exchanged = exchange(channel, b"{}", deadline=200.0, output_cap=100, clock=backend.clock)

        expected = (b'{"ok":true}\nlater', False, 100.0)
        assert expected == (exchanged.stdout, exchanged.deadline_hit, backend.clock.now)


class TestSandboxPlacement:
    def test_session_isolation_runs_in_the_sessions_container(self) -> None:
        """A session call opens the runner of exactly its (principal, session id)."""
        backend = StubBackend([Output(OK)])

        run(backend, Placement(isolation="session", principal="alice", session_id="s1"))

        request = canonical_loads(backend.requests[0])
        expected = ([(session_container_key("alice", "s1"), (), True)], 2.0)
        assert expected == (backend.opened, request["wall_seconds"])  # type: ignore[index, call-overload]

    def test_session_isolation_needs_a_principal(self) -> None:
        """A session without a principal cannot be placed."""
        with pytest.raises(ValueError, match="principal"):
            Sandbox(StubBackend()).run(make_spec(), make_call(), LIMITS, isolation="session")

    def test_another_runtime_runs_on_a_backend_of_its_own(self) -> None:
        """A call placed on gVisor runs on the backend made for it, once; close closes both."""
        own, gvisor = StubBackend([Output(OK)]), StubBackend([Output(OK)])
        made: list[str] = []

        def backend_for(runtime: str) -> StubBackend:
            made.append(runtime)
            return gvisor

        sandbox = Sandbox(own, runtime="runc", backend_for=backend_for,  # type: ignore[arg-type]
                          clock=own.clock)
        for _ in range(2):
            sandbox.run_placed(make_spec(), make_call(), LIMITS, Placement(runtime="runsc"))
        sandbox.run_placed(make_spec(), make_call(), LIMITS, Placement(runtime="runc"))
        sandbox.close()

        expected = (["runsc"], 2, 1, (1, 1))
        assert expected == (made, len(gvisor.opened), len(own.opened),
                            (own.closed, gvisor.closed))

    def test_another_runtime_without_a_backend_for_it_fails_closed(self) -> None:
        """A sandbox that cannot make a backend for the runtime runs nothing."""
        backend = StubBackend([Output(OK)])

        with pytest.raises(SandboxUnavailable, match="runsc"):
            run(backend, Placement(runtime="runsc"))

        assert [] == backend.opened

    def test_egress_reaches_the_backend_and_its_proxy_the_request(self) -> None:
        """The egress targets are the backend's to enforce; the tool is told the proxy."""
        backend = StubBackend([Output(OK)])

        run(backend, Placement(egress=("example.org:443",)))

        request = canonical_loads(backend.requests[0])
        expected = ([("", ("example.org:443",), True)], "http://proxy:3128")
        assert expected == (backend.opened, request["egress_proxy"])  # type: ignore[index, call-overload]

    def test_secrets_travel_in_the_request_and_are_cut_from_the_result(self) -> None:
        """A granted secret reaches the runner only in its request, and never comes back."""
        backend = StubBackend([Output(runner_line({"ok": True, "value": TOKEN}))])
        source = EnvironmentSecretSource({"CALLWARD_SECRET_API_TOKEN": TOKEN})
        sandbox = sandbox_on(backend, secrets=source)

        execution = sandbox.run_placed(make_spec(), make_call(), LIMITS,
                                       Placement(secrets=("API_TOKEN",)))

        expected = (True, "[REDACTED:API_TOKEN]", ("API_TOKEN",))
        assert expected == (TOKEN.encode() in backend.requests[0], execution.value,
                            execution.usage.secrets_provided)

    def test_a_secret_that_cannot_be_read_runs_nothing(self) -> None:
        """Secrets are read before a runner is asked for: a missing one opens none."""
        backend = StubBackend([Output(OK)])

        with pytest.raises(SecretUnavailable):
            sandbox_on(backend, secrets=EnvironmentSecretSource({})).run_placed(
                make_spec(), make_call(), LIMITS, Placement(secrets=("API_TOKEN",)))

        assert [] == backend.opened

    def test_end_session_reaches_every_runtimes_backend(self) -> None:
        """Ending a session ends its containers on every runtime the sandbox used."""
        own, gvisor = StubBackend([Output(OK)]), StubBackend([Output(OK)])
        sandbox = Sandbox(own, backend_for=lambda runtime: gvisor, clock=own.clock)
        sandbox.run_placed(make_spec(), make_call(), LIMITS, Placement(runtime="runsc"))

        sandbox.end_session("alice", "s1")

        expected = [session_container_key("alice", "s1")]
        assert (expected, expected) == (own.ended_sessions, gvisor.ended_sessions)


class TestWarmRunnerLost:
    def test_a_lost_warm_runner_is_replaced_once_by_a_cold_one(self) -> None:
        """The engine lost the warm container: the call runs again in one started for it."""
        backend = StubBackend([Output(OK)], warm_lost=True)

        execution = run(backend)

        expected = ("ok", [True, False], ["result", "result"])
        assert expected == (execution.kind, [warm for _, _, warm in backend.opened],
                            backend.endings)

    def test_a_lost_cold_runner_is_the_engines_failure(self) -> None:
        """A container started for the call that the engine loses is sandbox_unavailable."""
        backend = StubBackend([Output(OK)], warm_lost=True)
        channel = backend.open(LIMITS, warm=False)
        channel.lost = True
        backend.open = lambda *args, **kwargs: channel  # type: ignore[method-assign]

        with pytest.raises(SandboxUnavailable):
            run(backend)

        expected = ["result"]
        assert expected == backend.endings
