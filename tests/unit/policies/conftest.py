"""Fixtures of the policy tests: a registry of the tools in policy_tools.py, decide()."""

from __future__ import annotations

import pytest
from policy_tools import http_post, read_file, refund

from callward.core import CallContext, ToolCall, ToolRegistry


@pytest.fixture(name="registry")
def _registry() -> ToolRegistry:
    registry = ToolRegistry()
    for function in (refund, read_file, http_post):
        registry.register(function)
    return registry


@pytest.fixture(name="decide")
def _decide(registry):
    """decide(policy, principal, tool, arguments, session="") -> Decision."""

    def decide(policy, principal, name, arguments, session="", call_id="c1"):
        call = ToolCall.create(id=call_id, name=name, arguments=arguments, dialect="api")
        return policy.decide(call, registry.get(name), CallContext(principal, session))

    return decide
