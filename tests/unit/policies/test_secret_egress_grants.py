"""Secrets and egress per tool in the policy: the tool declares, the policy grants."""

from __future__ import annotations

import pytest

from callward.core import PolicyInvalid, ToolCall, ToolSpec, canonical_bytes, sha256_hex
from callward.core.types import CallContext, Decision, RuleId
from callward.policies import Policy, parse_policy

POLICY = """
version: 1
default: deny
rules:
  - {id: anyone, effect: allow, principals: ["*"], tools: ["*"]}
tools:
  fetch:
    secrets: [API_TOKEN]
    egress: ["127.0.0.1:8080", "internal.example:443"]
"""


def spec(name: str, secrets: tuple[str, ...] = ()) -> ToolSpec:
    return ToolSpec(name=name, version="1", description="", source=f"def {name}():\n    pass\n",
                    entrypoint=name, parameters_json=canonical_bytes({"type": "object"}),
                    digest=sha256_hex(name.encode()), secrets=secrets)


def decide(tool: ToolSpec) -> Decision:
    call = ToolCall.create(id="c1", name=tool.name, arguments={}, dialect="api")
    return Policy.from_text(POLICY).decide(call, tool, CallContext(principal="alice"))


class TestGrants:
    def test_a_granted_secret_and_the_egress_reach_the_decision(self) -> None:
        """Allowed: the decision carries the secret names and the egress targets."""
        decision = decide(spec("fetch", ("API_TOKEN",)))

        expected = ("allow", ("API_TOKEN",), ("127.0.0.1:8080", "internal.example:443"))
        assert expected == (decision.effect, decision.secrets, decision.egress)

    def test_the_audited_decision_names_them(self) -> None:
        """to_json names secrets (never values) and egress, and only when there are some."""
        granted = decide(spec("fetch", ("API_TOKEN",))).to_json()
        plain = decide(spec("other")).to_json()

        expected = (["API_TOKEN"], ["127.0.0.1:8080", "internal.example:443"], False, False)
        assert expected == (granted["secrets"], granted["egress"], "secrets" in plain,
                            "egress" in plain)

    def test_a_secret_not_granted_is_denied_as_permission(self) -> None:
        """A tool that declares a secret its policy entry does not grant is denied."""
        decision = decide(spec("other", ("API_TOKEN",)))

        expected = ("deny", "permission", RuleId("secrets.other"))
        assert expected == (decision.effect, decision.kind, decision.reasons[0])

    def test_a_tool_without_a_grant_gets_no_egress(self) -> None:
        """Network stays off by default."""
        assert () == decide(spec("other")).egress

    @pytest.mark.parametrize("target", ["127.0.0.1", "Example.com:443", "h:0", "h:65536",
                                        "http://h:80", "[::1]:80"])
    def test_an_egress_entry_that_is_not_host_port_is_invalid(self, target: str) -> None:
        """Targets are lower-case host:port; anything else refuses the policy."""
        text = POLICY.replace('"internal.example:443"', f'"{target}"')

        with pytest.raises(PolicyInvalid):
            parse_policy(text)

    def test_a_lower_case_secret_name_is_invalid(self) -> None:
        """Secret names are upper-case identifiers."""
        with pytest.raises(PolicyInvalid):
            parse_policy(POLICY.replace("[API_TOKEN]", "[api_token]"))

    def test_a_denial_cannot_carry_grants(self) -> None:
        """A Decision that denies and grants is refused at construction."""
        with pytest.raises(ValueError, match="grants"):
            Decision("deny", (RuleId("r"),), sha256_hex(b"p"), kind="permission",
                     secrets=("A",))
