"""Permissions in Cedar: request built from the call, forbid over permit, fail closed."""

from __future__ import annotations

import pytest

from callward.core import PolicyInvalid
from callward.policies import Policy

CEDAR = """
version: 1
default: deny
principals:
  sam: {roles: [support], groups: [emea]}
  lee: {roles: [support]}
  max: {roles: [manager]}
cedar_inline: |
  @id("support-refunds")
  permit (principal in Role::"support", action == Action::"Call", resource == Tool::"refund")
    when { context.arguments.amount_cents <= 5000 };

  @id("emea-never-over-rate")
  forbid (principal in Group::"emea", action, resource == Tool::"refund")
    when { context.arguments has rate && context.arguments.rate.greaterThan(decimal("1.5")) };

  @id("labelled-tools-for-managers")
  permit (principal in Role::"manager", action, resource)
    when { resource.labels.contains("payments") };
"""


@pytest.fixture(name="policy")
def _policy():
    return Policy.from_text(CEDAR)


class TestCedarPermissions:
    def test_permit_with_an_argument_condition(self, policy, decide):
        """A permit whose condition reads the validated arguments allows within it."""
        decision = decide(policy, "lee", "refund", {"order_id": "A-1", "amount_cents": 5000})

        assert "allow" == decision.effect
        assert ("schema.refund", "support-refunds") == decision.reasons

    def test_argument_values_outside_the_condition_are_denied(self, policy, decide):
        """Past the permit's condition nothing permits: implicit deny, named default-deny."""
        decision = decide(policy, "lee", "refund", {"order_id": "A-1", "amount_cents": 5001})

        assert ("deny", "permission", ("default-deny",)) == (
            decision.effect, decision.kind, decision.reasons)

    def test_forbid_overrides_permit_with_decimals(self, policy, decide):
        """A forbid on a group wins over a role's permit; JSON numbers compare as decimals."""
        allowed = decide(policy, "sam", "refund",
                         {"order_id": "A-1", "amount_cents": 10, "rate": 1.25})
        denied = decide(policy, "sam", "refund",
                        {"order_id": "A-1", "amount_cents": 10, "rate": 1.75})

        assert "allow" == allowed.effect
        assert ("permission", ("emea-never-over-rate",)) == (denied.kind, denied.reasons)

    def test_tool_labels_reach_cedar(self, policy, decide):
        """resource.labels holds the tool's labels."""
        decision = decide(policy, "max", "refund", {"order_id": "A-1", "amount_cents": 99999})

        assert ("allow", ("schema.refund", "labelled-tools-for-managers")) == (
            decision.effect, decision.reasons)

    def test_a_policy_that_errors_denies(self, decide):
        """Cedar skips a forbid that errors; callward denies instead and keeps the diagnostic."""
        policy = Policy.from_text("""
version: 1
default: deny
cedar_inline: |
  @id("anyone") permit (principal, action, resource);
  @id("broken-forbid") forbid (principal, action, resource)
    when { context.arguments.path > 3 };
""")
        decision = decide(policy, "eve", "read_file", {"path": "a"})

        assert ("deny", "permission", ("cedar.evaluation-error",)) == (
            decision.effect, decision.kind, decision.reasons)
        assert "broken-forbid" in decision.diagnostics[0] or "policy1" in decision.diagnostics[0]

    def test_a_number_cedar_cannot_hold_is_a_constraint_denial(self, policy, decide):
        """A number outside Cedar's decimal range is refused, never rounded."""
        decision = decide(policy, "lee", "refund",
                          {"order_id": "A-1", "amount_cents": 10, "rate": 1e300})

        assert ("constraint", "$.rate") == (decision.kind, decision.json_path)

    def test_simple_rules_and_cedar_files_combine(self, tmp_path, decide):
        """Cedar files are read relative to the document and sit beside compiled rules."""
        (tmp_path / "team.cedar").write_text(
            '@id("no-posts") forbid (principal, action, resource == Tool::"http_post");\n')
        path = tmp_path / "policy.yaml"
        path.write_text("version: 1\ndefault: deny\ncedar: [team.cedar]\nrules:\n"
                        "  - {id: all, effect: allow, principals: ['*'], tools: ['*']}\n")
        policy = Policy.from_file(path)

        assert "allow" == decide(policy, "x", "read_file", {"path": "a"}).effect
        assert ("no-posts",) == decide(policy, "x", "http_post", {"url": "u"}).reasons

    def test_the_digest_covers_cedar_files(self, tmp_path):
        """Changing a Cedar file changes the policy digest."""
        (tmp_path / "a.cedar").write_text("permit (principal, action, resource);\n")
        path = tmp_path / "policy.yaml"
        path.write_text("version: 1\ndefault: deny\ncedar: [a.cedar]\n")
        first = Policy.from_file(path).digest
        (tmp_path / "a.cedar").write_text("forbid (principal, action, resource);\n")

        assert first != Policy.from_file(path).digest

    @pytest.mark.parametrize(
        ("cedar", "fragment"),
        [
            ("permit (principal, action, resource", "do not parse"),
            ('@id("x") permit (principal, action, resource);\n'
             '@id("x") forbid (principal, action, resource);', "two Cedar policies"),
        ],
    )
    def test_invalid_cedar_refuses_to_start(self, cedar, fragment):
        """Cedar that does not parse, or two policies with one @id, is PolicyInvalid."""
        text = "version: 1\ndefault: deny\ncedar_inline: |\n  " + cedar.replace("\n", "\n  ")

        with pytest.raises(PolicyInvalid, match=fragment):
            Policy.from_text(text)

    def test_missing_cedar_file_refuses_to_start(self, tmp_path):
        """A Cedar file named but absent is an error at start."""
        path = tmp_path / "policy.yaml"
        path.write_text("version: 1\ndefault: deny\ncedar: [absent.cedar]\n")

        with pytest.raises(PolicyInvalid, match="cannot be read"):
            Policy.from_file(path)


class TestPlacement:
    def test_an_allow_carries_the_tools_isolation_and_runtime(self, decide):
        """The document's isolation and runtime for a tool reach the Decision."""
        policy = Policy.from_text(
            "version: 1\ndefault: deny\nrules:\n"
            "  - {id: all, effect: allow, principals: ['*'], tools: ['*']}\n"
            "tools:\n  read_file: {isolation: session, runtime: runsc}\n")

        placed = decide(policy, "x", "read_file", {"path": "a"})
        default = decide(policy, "x", "http_post", {"url": "u"})

        assert ("session", "runsc") == (placed.isolation, placed.runtime)
        assert ("call", None) == (default.isolation, default.runtime)
