"""
Isolation and runtime chosen per tool by the policy, through the whole gateway.

``tools.<name>.isolation: session`` runs a tool's calls of one agent session in
one container (a fresh process per call); ``runtime: runsc`` runs it on gVisor.
Both are written into the audited decision.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from callward.core import (
    Execution,
    ResourceLimits,
    Sha256Hex,
    ToolCall,
    ToolSpec,
    Usage,
)
from callward.core.gateway import Gateway
from callward.core.gateway._config import example_config_path

pytestmark = pytest.mark.docker


@pytest.fixture(name="make_gateway")
def _make_gateway(tmp_path: Path) -> Iterator[Callable[[str], Gateway]]:
    """A gateway on the example configuration, with extra YAML for the policy's tools."""
    gateways: list[Gateway] = []

    def make_gateway(tool_settings: str) -> Gateway:
        folder = tmp_path / f"config{len(gateways)}"
        shutil.copytree(example_config_path().parent, folder)
        policy = folder / "policy.yaml"
        text = policy.read_text(encoding="utf-8")
        policy.write_text(text.replace("tools:\n  spin:", f"tools:\n{tool_settings}\n  spin:"),
                          encoding="utf-8")
        gateway = Gateway.from_config(folder / "callward.yaml", home=tmp_path / "home")
        gateways.append(gateway)
        return gateway

    yield make_gateway
    for gateway in gateways:
        gateway.close()


def record_of(gateway: Gateway, seq: int) -> dict[str, object]:
    return gateway.audit.get(seq).body  # type: ignore[attr-defined, no-any-return]


class TestPlacementByPolicy:
    def test_session_isolation_shares_a_container_within_a_session_only(
        self, make_gateway: Callable[[str], Gateway]
    ) -> None:
        """
        With isolation session, two calls of one session run in one container and a
        call of another session in another; the decision records the isolation.
        """
        gateway = make_gateway("  square:\n    isolation: session")

        def container_of(session_id: str) -> str:
            (result,) = gateway.handle_text('call function("square", [3])', principal="alice",
                                            session_id=session_id)
            assert "ok" == result.kind
            return str(record_of(gateway, result.receipt.seq)["usage"]["container_id"])  # type: ignore[index]

        first, second, other = container_of("s1"), container_of("s1"), container_of("s2")
        authorized = record_of(gateway, 2)  # seq 1 is gateway.started

        expected = (True, False, "session")
        assert expected == (first == second, first == other,
                            authorized["decision"]["isolation"])  # type: ignore[index]

    def test_call_isolation_is_the_default(self, make_gateway: Callable[[str], Gateway]) -> None:
        """Without a setting, two calls of one session run in two containers."""
        gateway = make_gateway("  add:\n    limits: {wall_seconds: 2}")

        ids = set()
        for _ in range(2):
            (result,) = gateway.handle_text('call function("square", [3])', principal="alice",
                                            session_id="s1")
            ids.add(record_of(gateway, result.receipt.seq)["usage"]["container_id"])  # type: ignore[index]

        expected = 2
        assert expected == len(ids)

    def test_runtime_runsc_runs_the_tool_on_gvisor(
        self, make_gateway: Callable[[str], Gateway]
    ) -> None:
        """runtime runsc in the policy runs the call on gVisor; the decision records it."""
        gateway = make_gateway("  square:\n    runtime: runsc")

        (result,) = gateway.handle_text('call function("square", [5])', principal="alice")
        authorized = record_of(gateway, result.receipt.seq - 1)

        expected = ("ok", b"25", "runsc")
        assert expected == (result.kind, result.content_json,
                            authorized["decision"]["runtime"])  # type: ignore[index]


class StubPlainRunner:
    """A ToolRunner that cannot choose a runtime or a session; records what it ran."""

    image_digest = Sha256Hex("0" * 64)

    def __init__(self) -> None:
        self.ran: list[str] = []

    def run(self, spec: ToolSpec, call: ToolCall, limits: ResourceLimits) -> Execution:
        self.ran.append(call.name)
        return Execution(kind="ok", value_json=b"0", message="",
                         usage=Usage(wall_ms=0.0, exit_code=0, output_bytes=1))


class TestPlacementFailsClosed:
    def test_a_runtime_the_runner_cannot_choose_never_runs(
        self, make_gateway: Callable[[str], Gateway]
    ) -> None:
        """A policy asking for gVisor on a runner that cannot choose: sandbox_unavailable."""
        gateway = make_gateway("  square:\n    runtime: runsc")
        stub = StubPlainRunner()
        gateway.runner = stub

        (result,) = gateway.handle_text('call function("square", [5])', principal="alice")

        expected = ("sandbox_unavailable", [])
        assert expected == (result.kind, stub.ran)

    def test_session_on_a_plain_runner_runs_in_a_fresh_container(
        self, make_gateway: Callable[[str], Gateway]
    ) -> None:
        """A session placement on a runner without sessions runs like call: the stricter."""
        gateway = make_gateway("  square:\n    isolation: session")
        stub = StubPlainRunner()
        gateway.runner = stub

        (result,) = gateway.handle_text('call function("square", [5])', principal="alice",
                                        session_id="s1")

        expected = ("ok", ["square"])
        assert expected == (result.kind, stub.ran)
