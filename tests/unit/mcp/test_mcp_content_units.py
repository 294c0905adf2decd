"""The pieces of upstream content that need no upstream: names, and what the policy enables."""

from __future__ import annotations

import pytest

from callward.core import CallContext, PolicyInvalid, RuleId, ToolCall, ToolRegistry, tool
from callward.core.mcp._content import resource_uri, split_resource_uri
from callward.core.mcp._pins import McpContentPolicy, PinGate
from callward.policies import Policy

POLICY = """
version: 1
default: deny
principals: {alice: {roles: [analyst]}, bob: {roles: [guest]}}
rules: []
mcp_content:
  - {id: public-notes, server: notes, resources: ["note://public/*"], prompts: [summarize],
     roles: [analyst]}
  - {id: everyone-greets, server: notes, prompts: ["greet_*"]}
results:
  - {id: redact-credentials, tools: ["*"], redact: [credentials]}
"""


class TestResourceUris:
    @pytest.mark.parametrize("uri", ["note://public/hello", "file:///etc/passwd?x=1#y",
                                     "a b/c%2Fd", "urn:x:y"])
    def test_round_trip(self, uri):
        """Any upstream URI is namespaced under its server and maps back exactly."""
        assert ("notes", uri) == split_resource_uri(resource_uri("notes", uri))

    @pytest.mark.parametrize("uri", ["note://public/hello", "callward://notes/",
                                     "callward://notes/a/b", "callward://notes/a?q=1",
                                     "http://notes/note%3A%2F%2Fx"])
    def test_anything_else_maps_to_nothing(self, uri):
        """An upstream's own URI, or a malformed one, is never taken as namespaced."""
        assert split_resource_uri(uri) is None


class TestPolicyEnables:
    def test_per_server_pattern_and_principal(self):
        """Off unless a rule names the server, the URI or prompt pattern and the principal."""
        policy = Policy.from_text(POLICY)

        assert isinstance(policy, McpContentPolicy)
        assert ("public-notes", None, None, None, "everyone-greets", None) == (
            policy.mcp_content_rule("notes", "resource", "note://public/a", "alice"),
            policy.mcp_content_rule("notes", "resource", "note://public/a", "bob"),
            policy.mcp_content_rule("notes", "resource", "note://private/a", "alice"),
            policy.mcp_content_rule("other", "resource", "note://public/a", "alice"),
            policy.mcp_content_rule("notes", "prompt", "greet_all", "bob"),
            policy.mcp_content_rule("notes", "prompt", "note://public/a", "alice"))

    def test_the_pin_gate_passes_it_through(self):
        """The upstream gateway's policy wrapper asks the same policy."""
        gate = PinGate(Policy.from_text(POLICY), {})

        assert "public-notes" == gate.mcp_content_rule("notes", "prompt", "summarize", "alice")
        assert 1 == gate.treat_content("notes__resources",
                                       b'{"text":"AKIAABCDEFGHIJKLMNOP"}').redactions

    def test_a_rule_needs_resources_or_prompts(self):
        """A rule enabling nothing is a mistake, refused at load."""
        with pytest.raises(PolicyInvalid, match="mcp_content"):
            Policy.from_text(POLICY.replace("prompts: [\"greet_*\"]", "roles: [guest]"))


class TestPinGateShadow:
    def test_the_shadow_divergence_passes_through_unless_blocked(self):
        """Behind the upstream gate the candidate is still compared; a blocked tool is not."""
        @tool(version="1.0.0", parameters={"type": "object", "properties": {}})
        def ping() -> str:
            return "pong"

        registry = ToolRegistry()
        registry.register(ping)
        enforced = ("version: 1\ndefault: deny\nprincipals: {ana: {roles: [agent]}}\n"
                    "rules: [{id: agents-ping, effect: allow, roles: [agent], tools: [ping]}]\n")
        candidate = enforced.replace("effect: allow", "effect: deny")
        gate = PinGate(Policy.from_text(enforced, shadow=Policy.from_text(candidate)),
                       {"notes__greet": RuleId("mcp.unapproved")})
        call = ToolCall.create(id="c1", name="ping", arguments={}, dialect="mcp")
        blocked = ToolCall.create(id="c2", name="notes__greet", arguments={}, dialect="mcp")

        decision, diverged = gate.decide_with_shadow(call, registry.get("ping"),
                                                     CallContext("ana"))
        denied, none = gate.decide_with_shadow(blocked, None, CallContext("ana"))

        assert ("allow", "deny") == (decision.effect, diverged["candidate"]["effect"])
        assert ("approval_required", None) == (denied.kind, none)
