"""The evaluator: default deny, deny overrides allow, every decision explained."""

from __future__ import annotations

import pytest

from callward.core import CallContext, PolicyDenied, ToolCall, ToolRegistry, tool
from callward.core.errors import StateUnavailable
from callward.policies import Policy, PolicyState
from callward.policies._flows import labels_session_key

POLICY = """
version: 1
default: deny
principals:
  alice: {roles: [analyst]}
  mallory: {roles: [guest]}
  root: {roles: [admin, guest]}
rules:
  - {id: analysts-square, effect: allow, roles: [analyst], tools: [square]}
  - {id: admins-anything, effect: allow, roles: [admin], tools: ["*"]}
  - {id: guests-never-square, effect: deny, roles: [guest], tools: [square]}
  - {id: bob-by-name, effect: allow, principals: [bob], tools: [square]}
"""


@tool(
    version="1.0.0",
    parameters={
        "type": "object",
        "properties": {"x": {"type": "integer"}, "when": {"type": "string", "format": "date"}},
        "required": ["x"],
        "additionalProperties": False,
    },
)
def square(x: int, when: str = "") -> int:
    return x * x


@tool(
    version="1.0.0",
    parameters={
        "type": "object",
        "properties": {"x": {"$ref": "https://example.invalid/remote.json"}},
    },
)
def remote(x: int) -> int:
    return x


@pytest.fixture(name="registry")
def _registry():
    registry = ToolRegistry()
    registry.register(square)
    registry.register(remote)
    return registry


def decide(registry, principal, name, arguments):
    call = ToolCall.create(id="c1", name=name, arguments=arguments, dialect="api")
    return Policy.from_text(POLICY).decide(call, registry.get(name), CallContext(principal))


class TestDecide:
    def test_allowed_call_names_its_rules_and_limits(self, registry):
        """An allowed call names the schema rule and the allow rule, and carries limits."""
        decision = decide(registry, "alice", "square", {"x": 3})

        assert "allow" == decision.effect
        assert ("schema.square", "analysts-square") == decision.reasons
        assert decision.limits is not None

    def test_unknown_tool_is_denied(self, registry):
        """A name the registry does not know is denied as unknown_tool."""
        decision = decide(registry, "alice", "rm_rf", {})

        assert ("deny", "unknown_tool") == (decision.effect, decision.kind)
        assert ("registry.unknown-tool",) == decision.reasons

    def test_lookalike_name_is_unknown(self, registry):
        """A Unicode look-alike of a tool name is a different, unknown name."""
        lookalike = "squ\u0430re"  # a Cyrillic a in place of the Latin one
        decision = decide(registry, "alice", lookalike, {"x": 3})

        assert "unknown_tool" == decision.kind

    @pytest.mark.parametrize(
        ("arguments", "json_path"),
        [
            ({"x": "3"}, "$.x"),
            ({"x": 3, "y": 1}, "$"),
            ({}, "$"),
            ({"x": True}, "$.x"),
            ({"x": 3, "when": "not a date"}, "$.when"),
        ],
    )
    def test_schema_violations_are_denied_with_a_path(self, registry, arguments, json_path):
        """Type confusion, extra or missing properties and bad formats deny as schema."""
        decision = decide(registry, "alice", "square", arguments)

        assert ("deny", "schema", json_path) == (decision.effect, decision.kind,
                                                 decision.json_path)
        assert "3" not in decision.message or arguments == {"x": 3, "y": 1}

    def test_remote_ref_is_never_fetched(self, registry):
        """A schema with a remote $ref cannot be resolved, so the call is denied."""
        decision = decide(registry, "alice", "remote", {"x": 1})

        assert "schema" == decision.kind

    def test_unknown_principal_is_default_denied(self, registry):
        """No rule names the principal: default deny."""
        decision = decide(registry, "eve", "square", {"x": 3})

        assert ("permission", ("default-deny",)) == (decision.kind, decision.reasons)

    def test_deny_overrides_allow(self, registry):
        """A principal with an allowing and a denying role is denied."""
        decision = decide(registry, "root", "square", {"x": 3})

        assert ("permission", ("guests-never-square",)) == (decision.kind, decision.reasons)

    def test_principal_named_directly(self, registry):
        """A rule can name principals instead of roles."""
        assert "allow" == decide(registry, "bob", "square", {"x": 3}).effect

    def test_every_violation_is_listed(self, registry):
        """Bad arguments from a principal without permission list both failed rules."""
        decision = decide(registry, "eve", "square", {"x": "3"})

        assert "schema" == decision.kind
        assert ("schema.square", "default-deny") == decision.reasons

    def test_enforce_raises_with_kind_and_rule(self, registry):
        """enforce() raises PolicyDenied naming the kind, rule and path."""
        call = ToolCall.create(id="c", name="square", arguments={"x": "3"}, dialect="api")
        policy = Policy.from_text(POLICY)

        with pytest.raises(PolicyDenied) as caught:
            policy.enforce(call, registry.get("square"), CallContext("alice"))

        assert ("schema", "schema.square", "$.x") == (
            caught.value.kind, caught.value.rule, caught.value.json_path)


class CountingState(PolicyState):
    """The in-memory state, counting the reads of a session's labels."""

    def __init__(self) -> None:
        super().__init__()
        self.label_reads = 0

    def session_labels(self, session: str) -> frozenset[str]:
        self.label_reads += 1
        return super().session_labels(session)


class UnreadableLabels(PolicyState):
    """A state whose session labels cannot be read (a database that went away)."""

    def session_labels(self, session: str) -> frozenset[str]:
        raise StateUnavailable("policy state: unreachable")


SESSION_KEY = labels_session_key(CallContext("alice", "s1"))
LABELS_IN_CEDAR = """
version: 1
default: deny
principals:
  alice: {roles: [analyst]}
cedar_inline: |
  @id("clean-sessions-square")
  permit (principal in Role::"analyst", action, resource == Tool::"square")
    when { CONDITION };
"""


class TestSessionLabelsRead:
    """The session's labels are read only where a rule can use them."""

    def _square(self, registry, policy, session="s1"):
        call = ToolCall.create(id="c1", name="square", arguments={"x": 3}, dialect="api")
        return policy.decide(call, registry.get("square"), CallContext("alice", session))

    def test_a_policy_without_flows_or_labels_in_cedar_reads_none(self, registry):
        state = CountingState()
        policy = Policy.from_text(POLICY, state=state)

        assert "allow" == self._square(registry, policy).effect
        assert 0 == state.label_reads

    def test_explain_still_shows_the_session_labels(self, registry):
        state = CountingState()
        state.add_session_labels(SESSION_KEY, frozenset({"secret"}), "c0", 1.0)
        policy = Policy.from_text(POLICY, state=state)
        call = ToolCall.create(id="c1", name="square", arguments={"x": 3}, dialect="api")

        trace = policy.explain(call, registry.get("square"), CallContext("alice", "s1"))

        assert ("secret",) == trace.session_labels
        assert 1 == state.label_reads

    @pytest.mark.parametrize("condition", [
        'context.session_labels.isEmpty()',
        'context has session_labels && !context.session_labels.contains("secret")',
        # An escape Cedar resolves: the attribute is found in Cedar's own parse.
        '!context["session\\u{5f}labels"].contains("secret")',
    ])
    def test_cedar_that_names_the_labels_sees_them(self, registry, condition):
        """A Cedar policy reading context.session_labels, however spelled, gets them."""
        state = CountingState()
        policy = Policy.from_text(LABELS_IN_CEDAR.replace("CONDITION", condition),
                                  state=state)

        assert "allow" == self._square(registry, policy).effect
        state.add_session_labels(SESSION_KEY, frozenset({"secret"}), "c0", 1.0)
        denied = self._square(registry, policy)

        assert ("deny", "permission") == (denied.effect, denied.kind)
        assert 2 == state.label_reads

    def test_unreadable_labels_still_deny_where_cedar_reads_them(self, registry):
        policy = Policy.from_text(
            LABELS_IN_CEDAR.replace("CONDITION", "context.session_labels.isEmpty()"),
            state=UnreadableLabels())

        decision = self._square(registry, policy)

        assert ("deny", "flow") == (decision.effect, decision.kind)

    def test_unreadable_labels_decide_nothing_where_no_rule_reads_them(self, registry):
        """No flow rule and no Cedar policy can use them: the answer does not depend on them."""
        policy = Policy.from_text(POLICY, state=UnreadableLabels())

        assert "allow" == self._square(registry, policy).effect

    def test_explain_decides_as_decide_does_when_the_labels_are_unreadable(self, registry):
        """explain reads the labels for its trace; where no rule uses them, failing to
        read them changes no answer, as in decide."""
        policy = Policy.from_text(POLICY, state=UnreadableLabels())
        call = ToolCall.create(id="c1", name="square", arguments={"x": 3}, dialect="api")

        trace = policy.explain(call, registry.get("square"), CallContext("alice", "s1"))

        assert ("allow", ()) == (trace.decision.effect, trace.session_labels)
