"""Which tools a listing shows a caller: permission rules evaluated without arguments."""

from __future__ import annotations

import pytest

from callward.core import CallContext, ToolCall, ToolRegistry, tool
from callward.policies import Policy


@tool(version="1.0.0", parameters={"type": "object", "properties": {"x": {"type": "integer"}}})
def square(x: int = 0) -> int:
    return x * x


@tool(version="1.0.0", parameters={"type": "object",
                                   "properties": {"amount_cents": {"type": "integer"}}})
def refund(amount_cents: int = 0) -> int:
    return amount_cents


@tool(version="1.0.0", parameters={"type": "object"})
def admin_reset() -> str:
    return "reset"


POLICY = """
version: 1
default: deny
principals:
  alice: {roles: [analyst]}
  bob: {roles: [analyst, clerk]}
  mallory: {roles: [analyst]}
rules:
  - {id: analysts-square, effect: allow, roles: [analyst], tools: [square]}
  - {id: admins-reset, effect: allow, roles: [admin], tools: [admin_reset]}
  - {id: no-mallory, effect: deny, principals: [mallory], tools: [square]}
cedar_inline: |
  @id("small-refunds")
  permit (principal in Role::"clerk", action, resource == Tool::"refund")
    when { context.arguments.amount_cents < 500 };
"""


@pytest.fixture(name="registry")
def _registry() -> ToolRegistry:
    registry = ToolRegistry()
    for function in (square, refund, admin_reset):
        registry.register(function)
    return registry


def listed(policy: Policy, registry: ToolRegistry, principal: str) -> list[str]:
    return sorted(spec.name for spec in registry
                  if policy.may_discover(spec, CallContext(principal)))


class TestMayDiscover:
    @pytest.mark.parametrize(("principal", "expected"), [
        ("alice", ["square"]),
        ("bob", ["refund", "square"]),   # a permit that needs the arguments to decide
        ("mallory", []),                 # a deny that needs no argument hides it
        ("nobody-known", []),
    ])
    def test_each_caller_sees_only_what_could_be_allowed(self, registry, principal, expected):
        """The listing is per principal; nothing is shown that no call could be allowed."""
        assert expected == listed(Policy.from_text(POLICY), registry, principal)

    def test_a_hidden_tool_is_still_decided_and_denied_by_name(self, registry):
        """Hiding is not deciding: a call of a hidden tool is denied as permission."""
        policy = Policy.from_text(POLICY)
        call = ToolCall.create(id="c1", name="admin_reset", arguments={}, dialect="api")

        decision = policy.decide(call, registry.get("admin_reset"), CallContext("alice"))

        expected = ("deny", "permission", False)
        assert expected == (decision.effect, decision.kind,
                            policy.may_discover(registry.get("admin_reset"),  # type: ignore[arg-type]
                                                CallContext("alice")))
