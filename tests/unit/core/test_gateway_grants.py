"""
The gateway hands a policy's secrets and egress grants to a runner that can take them,
and fails closed (audited) with one that cannot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest

from callward.audit import FileSigner, SQLiteAuditStore
from callward.core import (
    Execution,
    ResourceLimits,
    Sha256Hex,
    ToolCall,
    ToolRegistry,
    ToolSpec,
    Usage,
    canonical_bytes,
    tool,
)
from callward.core.gateway import Gateway
from callward.policies import Policy

IMAGE = Sha256Hex("cd" * 32)
POLICY = """
version: 1
default: deny
rules:
  - {id: anyone, effect: allow, principals: ["*"], tools: ["*"]}
tools:
  fetch:
    secrets: [API_TOKEN]
    egress: ["127.0.0.1:8080"]
"""


@tool(version="1.0.0", parameters={"type": "object"}, secrets=("API_TOKEN",))
def fetch():
    return 1


@tool(version="1.0.0", parameters={"type": "object"})
def plain():
    return 1


class StubPlainRunner:
    """A runner that can only run: no placement, no secrets, no egress."""

    @property
    def image_digest(self) -> Sha256Hex:
        return IMAGE

    def run(self, spec: ToolSpec, call: ToolCall, limits: ResourceLimits) -> Execution:
        return Execution("ok", canonical_bytes(1), "", Usage(1.0, 0, 1))


class StubPlacingRunner(StubPlainRunner):
    """Records what run_placed was handed."""

    def __init__(self) -> None:
        self.placed: list[dict[str, object]] = []

    def run_placed(
        self, spec: ToolSpec, call: ToolCall, limits: ResourceLimits, *,
        isolation: Literal["call", "session"], runtime: Literal["runc", "runsc"] | None,
        principal: str, session_id: str, secrets: tuple[str, ...] = (),
        egress: tuple[str, ...] = (),
    ) -> Execution:
        self.placed.append({"tool": spec.name, "secrets": secrets, "egress": egress})
        return self.run(spec, call, limits)


def make_gateway(tmp_path: Path, runner: StubPlainRunner) -> Gateway:
    registry = ToolRegistry()
    registry.register(fetch)
    registry.register(plain)
    audit = SQLiteAuditStore(tmp_path / "audit.db", FileSigner.load_or_create(tmp_path / "k"))
    audit.open()
    return Gateway(registry=registry, policy=Policy.from_text(POLICY), runner=runner,
                   audit=audit, closers=(audit.close,))


def call(name: str) -> ToolCall:
    return ToolCall.create(id="c1", name=name, arguments={}, dialect="api")


class TestGrants:
    def test_grants_reach_a_placing_runner(self, tmp_path: Path) -> None:
        """The decision's secret names and egress targets are handed to run_placed."""
        runner = StubPlacingRunner()
        with make_gateway(tmp_path, runner) as gateway:
            result = gateway.handle(call("fetch"), principal="alice")

        expected = ("ok", [{"tool": "fetch", "secrets": ("API_TOKEN",),
                            "egress": ("127.0.0.1:8080",)}])
        assert expected == (result.kind, runner.placed)

    def test_a_call_without_grants_runs_as_before(self, tmp_path: Path) -> None:
        """No grant, default placement: plain run(), run_placed is not even asked."""
        runner = StubPlacingRunner()
        with make_gateway(tmp_path, runner) as gateway:
            result = gateway.handle(call("plain"), principal="alice")

        expected = ("ok", [])
        assert expected == (result.kind, runner.placed)

    @pytest.mark.parametrize("name", ["fetch"])
    def test_a_runner_that_cannot_take_grants_fails_closed(self, tmp_path: Path,
                                                           name: str) -> None:
        """A plain runner never runs a granted call: sandbox_unavailable, audited."""
        with make_gateway(tmp_path, StubPlainRunner()) as gateway:
            result = gateway.handle(call(name), principal="alice")
            completed = gateway.audit.get(result.receipt.seq)  # type: ignore[attr-defined]

        expected = ("sandbox_unavailable", "call.completed")
        assert expected == (result.kind, completed.kind)
