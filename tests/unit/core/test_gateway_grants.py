"""
The gateway hands a policy's secrets and egress grants to a runner that can take them,
and fails closed (audited) with one that cannot.
"""

from __future__ import annotations

import pytest

from callward.core import ToolCall, ToolRegistry, tool
from callward.core.testing import StubPlacingRunner, StubRunner, ok_execution
from callward.policies import Policy

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


@pytest.fixture(name="registry")
def _registry() -> ToolRegistry:
    registry = ToolRegistry()
    registry.register(fetch)
    registry.register(plain)
    return registry


@pytest.fixture(name="policy")
def _policy() -> Policy:
    return Policy.from_text(POLICY)


def call(name: str) -> ToolCall:
    return ToolCall.create(id="c1", name=name, arguments={}, dialect="api")


class TestGrants:
    def test_grants_reach_a_placing_runner(self, make_gateway) -> None:
        """The decision's secret names and egress targets are handed to run_placed."""
        runner = StubPlacingRunner(ok_execution(1))
        result = make_gateway(runner).handle(call("fetch"), principal="alice")

        expected = ("ok", [("fetch", ("API_TOKEN",), ("127.0.0.1:8080",))])
        assert expected == (result.kind, [(run.spec.name, run.placement.secrets,
                                           run.placement.egress) for run in runner.placed])

    def test_a_call_without_grants_runs_as_before(self, make_gateway) -> None:
        """No grant, default placement: plain run(), run_placed is not even asked."""
        runner = StubPlacingRunner(ok_execution(1))
        result = make_gateway(runner).handle(call("plain"), principal="alice")

        expected = ("ok", [], ["plain"])
        assert expected == (result.kind, runner.placed, [c.name for c in runner.calls])

    @pytest.mark.parametrize("name", ["fetch"])
    def test_a_runner_that_cannot_take_grants_fails_closed(self, make_gateway, store,
                                                           name: str) -> None:
        """A plain runner never runs a granted call: sandbox_unavailable, audited."""
        runner = StubRunner(ok_execution(1))
        result = make_gateway(runner).handle(call(name), principal="alice")
        completed = store.get(result.receipt.seq)

        expected = ("sandbox_unavailable", "call.completed", [])
        assert expected == (result.kind, completed.kind, runner.calls)
