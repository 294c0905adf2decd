"""
A caller's token identity: its roles and groups join the document's for that principal,
in Cedar (Principal with Role and Group parents), in simple rules, rate limits,
approvals, argument constraints and discovery; a caller without one is unchanged.
"""

from __future__ import annotations

import pytest

from callward.core import CallContext, Identity, ToolCall
from callward.policies import Policy
from callward.policies._replay import replay

ISSUER = "https://login.example.com/"

POLICY = """
version: 1
default: deny
principals:
  alice: {roles: [analyst]}
rules:
  - {id: analysts-read, effect: allow, roles: [analyst], tools: [read_file]}
  - {id: clerks-refund, effect: allow, roles: [clerk], tools: [refund]}
  - {id: contractors-never-post, effect: deny, groups: [contractors], tools: [http_post]}
tools:
  refund:
    constraints:
      - {id: clerk-refund-cap, argument: amount_cents, roles: [clerk],
         number: {minimum: 1, maximum: 50000, integer: true}}
rate_limits:
  - {id: clerks-twice, tools: [refund], roles: [clerk], per: [principal], limit: 2,
     window_seconds: 3600}
approvals:
  - {id: night-refunds, tools: [refund], groups: [night-shift],
     approvers: {roles: [lead]}, expires_seconds: 900}
cedar_inline: |
  @id("emea-posts")
  permit (principal in Group::"emea", action, resource == Tool::"http_post");
"""


def identity(*, roles: tuple[str, ...] = (), groups: tuple[str, ...] = ()) -> Identity:
    return Identity(ISSUER, frozenset(roles), frozenset(groups), "a" * 64)


@pytest.fixture(name="policy")
def _policy() -> Policy:
    return Policy.from_text(POLICY)


@pytest.fixture(name="ask")
def _ask(policy, registry):
    """ask(principal, tool, arguments, identity=None) -> Decision."""

    def ask(principal, name, arguments, who=None, call_id="c1"):
        call = ToolCall.create(id=call_id, name=name, arguments=arguments, dialect="api")
        return policy.decide(call, registry.get(name), CallContext(principal, identity=who))

    return ask


REFUND = {"order_id": "A-1", "amount_cents": 100}


class TestTokenRoles:
    def test_an_unlisted_principal_gets_its_token_roles(self, ask):
        """erin is in no principals list; her token's clerk role allows refund."""
        allowed = ask("erin", "refund", REFUND, identity(roles=("clerk",)))
        without = ask("erin", "refund", REFUND)

        assert ("allow", True) == (allowed.effect, "clerks-refund" in allowed.reasons)
        assert ("deny", "permission") == (without.effect, without.kind)

    def test_token_roles_join_the_documents(self, ask):
        """alice keeps analyst from the document and gains clerk from her token."""
        who = identity(roles=("clerk",))

        assert ("allow", "allow") == (
            ask("alice", "read_file", {"path": "/a"}, who).effect,
            ask("alice", "refund", REFUND, who, call_id="c2").effect)
        assert "deny" == ask("alice", "refund", REFUND, call_id="c3").effect

    def test_token_groups_reach_cedar_and_simple_rules(self, ask):
        """Group emea (a Cedar permit) may post; in contractors too, the deny rule wins."""
        emea = ask("erin", "http_post", {"url": "https://x.example/", "body": ""},
                   identity(groups=("emea",)))
        both = ask("erin", "http_post", {"url": "https://x.example/", "body": ""},
                   identity(groups=("emea", "contractors")), call_id="c2")

        assert ("allow", True) == (emea.effect, "emea-posts" in emea.reasons)
        assert ("deny", "contractors-never-post") == (both.effect, both.reasons[0])

    def test_constraints_and_rate_limits_see_token_roles(self, ask):
        """The clerk cap applies to a clerk by token; the per-clerk limit counts her calls."""
        clerk = identity(roles=("clerk",))
        over = ask("erin", "refund", {"order_id": "A-1", "amount_cents": 60000}, clerk)
        kinds = [ask("erin", "refund", REFUND, clerk, call_id=f"r{n}").kind for n in range(3)]

        assert ("deny", "constraint") == (over.effect, over.kind)
        assert [None, None, "rate_limit"] == kinds

    def test_approvals_see_token_groups(self, ask):
        """A clerk in night-shift (by token) needs an approval to refund."""
        decision = ask("erin", "refund", REFUND, identity(roles=("clerk",),
                                                          groups=("night-shift",)))

        assert ("deny", "approval_required") == (decision.effect, decision.kind)

    def test_discovery_sees_token_roles(self, policy, registry):
        """tools/list shows erin what her token's roles could be allowed."""
        def listed(who):
            return sorted(spec.name for spec in registry
                          if policy.may_discover(spec, CallContext("erin", identity=who)))

        assert [] == listed(None)
        assert ["refund"] == listed(identity(roles=("clerk",)))
        assert ["http_post", "read_file"] == listed(identity(roles=("analyst",),
                                                             groups=("emea",)))

    def test_an_identity_without_roles_changes_nothing(self, ask):
        """A token with no roles or groups decides as the principal alone."""
        assert ("allow", "deny") == (
            ask("alice", "read_file", {"path": "/a"}, identity()).effect,
            ask("erin", "read_file", {"path": "/a"}, identity(), call_id="c2").effect)

    def test_many_identities_stay_within_the_entity_cache(self, ask):
        """Past the cache's size, old entries are dropped and decisions stay right."""
        decisions = {ask(f"user{n}", "refund", REFUND, identity(roles=("clerk", f"r{n}")),
                         call_id=f"c{n}").effect for n in range(1100)}

        assert {"allow"} == decisions


class TestIdentityValue:
    def test_round_trip_through_a_record(self):
        """to_json holds no token; from_json gives the same identity back."""
        value = identity(roles=("b", "a"), groups=("g",))

        assert {"issuer": ISSUER, "roles": ["a", "b"], "groups": ["g"],
                "token_id_sha256": "a" * 64} == value.to_json()
        assert value == Identity.from_json(value.to_json())

    @pytest.mark.parametrize(("kwargs", "message"), [
        ({"issuer": ""}, "issuer"), ({"issuer": "x", "roles": frozenset({""})}, "name"),
        ({"issuer": "x", "groups": frozenset({"g" * 257})}, "name"),
        ({"issuer": "x", "token_id_sha256": "not-hex"}, "hex"),
        ({"issuer": "x", "roles": frozenset(f"r{n}" for n in range(257))}, "at most"),
    ])
    def test_invalid_identities_cannot_exist(self, kwargs, message):
        """An empty issuer, a bad role or group name, too many, a jti hash not hex."""
        with pytest.raises(ValueError, match=message):
            Identity(**kwargs)


class TestReplay:
    def test_a_recorded_identity_replays_with_its_roles(self, tmp_path, registry):
        """A call allowed by a token role is still allowed when its record is replayed."""
        path = tmp_path / "policy.yaml"
        path.write_text(POLICY, encoding="utf-8")
        body = {"call": {"id": "c1", "name": "refund", "arguments": REFUND},
                "principal": "erin", "session_id": "",
                "identity": identity(roles=("clerk",)).to_json(),
                "decision": {"effect": "allow", "kind": None, "reasons": ["clerks-refund"]}}
        without = {**body, "call": {**body["call"], "id": "c2"}}
        del without["identity"]

        report = replay([("call.authorized", "2026-12-06T10:00:00Z", body),
                         ("call.authorized", "2026-12-06T10:00:01Z", without)], path, registry)

        assert (2, 1, 1) == (report.calls, report.unchanged, report.changes["allow_to_deny"])


class TestMcpContent:
    def test_upstream_content_rules_see_token_roles(self):
        """An upstream resource enabled for Role analyst: erin's token role enables it."""
        policy = Policy.from_text("""
version: 1
default: deny
rules: []
mcp_content:
  - {id: public-notes, server: notes, resources: ["note://public/*"], roles: [analyst]}
""")

        assert ("public-notes", None) == (
            policy.mcp_content_rule("notes", "resource", "note://public/a", "erin",
                                    identity(roles=("analyst",))),
            policy.mcp_content_rule("notes", "resource", "note://public/a", "erin"))
