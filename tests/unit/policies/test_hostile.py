"""Hostile arguments never crash the engine: every call ends in a Decision, fail closed."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from policy_tools import http_post, read_file, refund

from callward.core import CallContext, ToolCall, ToolRegistry
from callward.policies import Policy

POLICY = Policy.from_text("""
version: 1
default: deny
principals: {ana: {roles: [agent]}}
rules: [{id: agents-all, effect: allow, roles: [agent], tools: ["*"]}]
cedar_inline: |
  @id("small-refunds") forbid (principal, action, resource == Tool::"refund")
    when { context.arguments has amount_cents && context.arguments.amount_cents > 100 };
tools:
  read_file: {confine: {root: /workspace, arguments: [path]}}
""")
REGISTRY = ToolRegistry()
for function in (refund, read_file, http_post):
    REGISTRY.register(function)

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(["refund", "read_file", "http_post", "refunds", "r\u0435fund"]),
       arguments=st.dictionaries(
           st.sampled_from(["order_id", "amount_cents", "rate", "path", "url", "body", "x"]),
           JSON, max_size=4))
def test_any_arguments_end_in_a_decision(name, arguments):
    """Whatever the arguments, decide() returns a Decision and never raises."""
    try:
        call = ToolCall.create(id="h", name=name, arguments=arguments, dialect="api")
    except ValueError:
        return  # not I-JSON: the parser refuses it before any policy sees it
    decision = POLICY.decide(call, REGISTRY.get(name), CallContext("ana"))

    assert decision.effect in {"allow", "deny"}
    if decision.effect == "allow":
        assert REGISTRY.get(name) is not None
        assert not (name == "refund" and arguments.get("amount_cents", 0) > 100)
