"""
Data-flow labels per value: a call whose provenance is known is checked by the
labels of the results its arguments came from; without provenance, by the
session's. The real evaluator, a real policy document and a real SQLite state.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from callward.core import (
    CallContext,
    CallId,
    Provenance,
    ProvenanceEdge,
    ToolCall,
    canonical_bytes,
)
from callward.policies import Policy, PolicyState
from callward.policies._flows import pointer_to_json_path

POLICY = """
version: 1
default: deny
principals:
  ana: {roles: [agent]}
rules:
  - {id: agents-use-everything, effect: allow, roles: [agent], tools: ["*"]}
tools:
  read_file:
    output_labels: [secret]
  refund:
    declassifies: [secret]
flows:
  - {id: no-secret-egress, from: [secret], to: [egress]}
  - {id: no-untrusted-payments, from: [untrusted], to: [payments]}
"""


@pytest.fixture(name="policy")
def _policy(tmp_path: Path) -> Policy:
    return Policy.from_text(POLICY, state=PolicyState(tmp_path / "policy-state.db"))


def make_call(call_id: str, name: str, **arguments: object) -> ToolCall:
    return ToolCall.create(id=call_id, name=name, arguments=arguments, dialect="api")


def edge(argument: str, source: str, step: str = "src") -> ProvenanceEdge:
    return ProvenanceEdge(argument, step, CallId(source), "output", 1)


def observe(policy: Policy, registry, call: ToolCall, context: CallContext,
            value: object = "x") -> tuple[str, ...]:
    """Decide and record a call's result as the gateway would; its result labels."""
    spec = registry.get(call.name)
    assert "allow" == policy.decide(call, spec, context).effect
    return policy.observe_result(call, spec, context, canonical_bytes(value)).labels


def post(policy: Policy, registry, context: CallContext):
    call = make_call("post", "http_post", url="https://example.org", body="b")
    return policy.decide(call, registry.get("http_post"), context)


class TestPerValue:
    def test_argument_from_a_secret_result_is_denied_with_its_path(self, policy, registry):
        """An egress call fed by a secret result is denied as flow, naming the argument."""
        observe(policy, registry, make_call("r1", "read_file", path="a"),
                CallContext("ana", "s", Provenance()))

        decision = post(policy, registry, CallContext("ana", "s", Provenance(
            (edge("/body", "r1", "read"),))))

        assert ("deny", "flow", ("no-secret-egress",), "$.body") == (
            decision.effect, decision.kind, decision.reasons, decision.json_path)
        assert ("the value from step 'read' carries secret, which may not reach this tool"
                == decision.message)

    def test_argument_from_a_clean_result_passes_in_a_tainted_session(self, policy, registry):
        """The same session holds a secret, but this call's values did not come from it."""
        session = CallContext("ana", "s", Provenance())
        observe(policy, registry, make_call("r1", "read_file", path="a"), session)
        observe(policy, registry, make_call("p1", "http_post", url="u"), session)

        decision = post(policy, registry, CallContext("ana", "s", Provenance(
            (edge("/body", "p1"),))))

        assert "allow" == decision.effect

    def test_without_provenance_the_session_rule_holds(self, policy, registry):
        """A call whose sources are unknown (a model's call) is judged by the whole session."""
        observe(policy, registry, make_call("r1", "read_file", path="a"),
                CallContext("ana", "s", Provenance()))

        decision = post(policy, registry, CallContext("ana", "s"))

        assert ("deny", "flow", None) == (decision.effect, decision.kind, decision.json_path)

    def test_unrecorded_source_is_judged_by_the_session(self, policy, registry):
        """An edge to a call the policy never recorded here falls back to the session's labels."""
        observe(policy, registry, make_call("r1", "read_file", path="a"),
                CallContext("ana", "s", Provenance()))
        unknown = CallContext("ana", "s", Provenance((edge("/body", "never-seen"),)))
        clean_session = CallContext("ana", "other", Provenance((edge("/body", "never-seen"),)))

        assert ("deny", "allow") == (post(policy, registry, unknown).effect,
                                     post(policy, registry, clean_session).effect)

    def test_a_call_id_from_another_session_launders_nothing(self, policy, registry):
        """A clean result recorded in another session does not vouch for a value here."""
        observe(policy, registry, make_call("c1", "http_post", url="u"),
                CallContext("ana", "clean", Provenance()))
        observe(policy, registry, make_call("r1", "read_file", path="a"),
                CallContext("ana", "s", Provenance()))

        decision = post(policy, registry, CallContext("ana", "s", Provenance(
            (edge("/body", "c1"),))))

        assert ("deny", "flow") == (decision.effect, decision.kind)

    def test_labels_propagate_and_a_declassifying_tool_ends_them(self, policy, registry):
        """A result inherits its inputs' labels, except those its tool declassifies."""
        session = CallContext("ana", "s", Provenance())
        observe(policy, registry, make_call("r1", "read_file", path="a"), session)
        fed = CallContext("ana", "s", Provenance((edge("/path", "r1"),)))
        carried = observe(policy, registry, make_call("r2", "read_file", path="b"), fed)
        relayed = observe(policy, registry, make_call("p2", "http_post", url="u"),
                          CallContext("ana", "s2", Provenance()))
        refund = make_call("f1", "refund", order_id="A-1", amount_cents=5)
        declassified = observe(policy, registry, refund,
                               CallContext("ana", "s", Provenance((edge("/order_id", "r2"),))))

        assert (("secret",), (), ()) == (carried, relayed, declassified)
        assert "allow" == post(policy, registry, CallContext("ana", "s", Provenance(
            (edge("/body", "f1"),)))).effect

    def test_literal_labels_are_checked_like_an_edge(self, policy, registry):
        """Literals a caller says carry untrusted cannot reach a payments tool."""
        refund = make_call("f1", "refund", order_id="A-1", amount_cents=5)
        context = CallContext("ana", "s", Provenance((), frozenset({"untrusted"})))

        decision = policy.decide(refund, registry.get("refund"), context)

        assert ("deny", ("no-untrusted-payments",), "$") == (
            decision.effect, decision.reasons, decision.json_path)

    def test_literals_carry_what_a_model_in_the_session_saw(self, policy, registry):
        """
        After a call without provenance read a secret, a plan step's literals in that
        session carry secret (the model may have written them); in a fresh session not.
        """
        observe(policy, registry, make_call("m1", "read_file", path="a"), CallContext("ana", "s"))

        tainted = post(policy, registry, CallContext("ana", "s", Provenance()))
        fresh = post(policy, registry, CallContext("ana", "fresh", Provenance()))

        assert (("deny", "$"), "allow") == ((tainted.effect, tainted.json_path), fresh.effect)
        assert "a literal value carries secret, which may not reach this tool" == tainted.message

    def test_explain_records_nothing(self, policy, registry):
        """explain() with provenance decides the same and writes no label."""
        context = CallContext("ana", "s", Provenance((edge("/body", "r1"),)))

        trace = policy.explain(make_call("p", "http_post", url="u"),
                               registry.get("http_post"), context)

        assert "allow" == trace.decision.effect
        assert {} == policy.state.call_labels('["ana","s"]', ["p"])


class TestPointerToJsonPath:
    @pytest.mark.parametrize(("pointer", "path"), [
        ("", "$"), ("/a", "$.a"), ("/a/0/b", "$.a[0].b"), ("/a~1b/c~0d", '$["a/b"]["c~d"]'),
        ("/with space", '$["with space"]'),
    ])
    def test_pointer_becomes_the_path_other_checks_report(self, pointer, path):
        """A JSON pointer is reported in the $.a[0] form the schema check uses."""
        assert path == pointer_to_json_path(pointer)
