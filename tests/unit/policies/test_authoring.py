"""Tools for policy authors: the three team examples, lint, test files, explain, replay."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from callward.audit import FileSigner, SQLiteAuditStore
from callward.core import (
    CallContext,
    Execution,
    ResourceLimits,
    Sha256Hex,
    ToolCall,
    ToolRegistry,
    ToolSpec,
    Usage,
    canonical_bytes,
)
from callward.core.gateway import Gateway
from callward.policies import Policy
from callward.policies._cases import load_cases, run_cases
from callward.policies._lint import lint
from callward.policies._replay import replay

EXAMPLES = Path(__file__).parents[3] / "policies" / "examples"
TEAMS = ["analyst", "support", "coding"]


class StubRunner:
    """Every tool returns "done", as a sandboxed tool would return its value."""

    @property
    def image_digest(self) -> Sha256Hex:
        return Sha256Hex("cd" * 32)

    def run(self, spec: ToolSpec, call: ToolCall, limits: ResourceLimits) -> Execution:
        return Execution("ok", canonical_bytes("done"), "", Usage(1.0, 0, 4))


def team_registry(team: str) -> ToolRegistry:
    registry = ToolRegistry()
    registry.load(EXAMPLES / team / "tools.py")
    return registry


class TestTeamExamples:
    @pytest.mark.parametrize("team", TEAMS)
    def test_every_case_passes(self, team, tmp_path):
        """Each team's cases file passes against its policy (approvals really signed)."""
        signer = FileSigner.load_or_create(tmp_path / "keys")
        results = run_cases(EXAMPLES / team / "policy.yaml", team_registry(team),
                            load_cases(EXAMPLES / team / "cases.yaml"),
                            signer=signer)

        assert [] == [(r.name, r.why) for r in results if not r.passed]
        assert len(results) >= 8

    @pytest.mark.parametrize("team", TEAMS)
    def test_lint_is_clean(self, team):
        """Each team's policy validates against its registry with no finding."""
        policy = Policy.from_file(EXAMPLES / team / "policy.yaml")

        findings = lint(policy, team_registry(team))

        # An "info" is lint saying it cannot tell (e.g. two label tests); never a fault.
        assert [] == [f for f in findings if f.severity != "info"]

    def test_the_command_exits_1_and_says_why(self, tmp_path):
        """`callward policy test` exits 1 on a failing case and names it and the reason."""
        cases = tmp_path / "cases.yaml"
        cases.write_text(
            f"policy: {EXAMPLES / 'support' / 'policy.yaml'}\ncases:\n"
            "  - name: wrongly expected\n    principal: support-agent\n"
            "    call: {name: lookup_order, arguments: {order_id: ORD-000001}}\n"
            "    expect: {effect: deny}\n")
        config = EXAMPLES / "support" / "callward.yaml"

        failing = subprocess.run(
            [sys.executable, "-m", "callward.core.cli", "--home", str(tmp_path), "policy",
             "test", str(cases), "--config", str(config)], capture_output=True, text=True,
            check=False)
        passing = subprocess.run(
            [sys.executable, "-m", "callward.core.cli", "--home", str(tmp_path), "policy",
             "test", str(EXAMPLES / "support" / "cases.yaml"), "--config", str(config)],
            capture_output=True, text=True, check=False)

        assert (1, 0) == (failing.returncode, passing.returncode)
        assert "FAIL wrongly expected: expected deny, got allow" in failing.stderr


class TestLint:
    def test_findings(self, registry):
        """Lint reports validation errors, unreachable and shadowed rules, unknown tools."""
        policy = Policy.from_text("""
version: 1
default: deny
principals: {ana: {roles: [agent]}}
rules:
  - {id: ghosts-refund, effect: allow, roles: [ghost], tools: [refund]}
  - {id: agents-read, effect: allow, roles: [agent], tools: [read_file]}
  - {id: nobody-reads, effect: deny, principals: ["*"], tools: [read_file, refund]}
  - {id: agents-fly, effect: allow, roles: [agent], tools: [fly]}
cedar_inline: |
  @id("typo") permit (principal, action, resource) when { context.arguments has pth };
  @id("wrong-type") forbid (principal, action, resource)
    when { context.arguments has path && context.arguments.path > 3 };
  permit (principal in Role::"nobody-has-this", action, resource);
  @id("ana-refunds") permit (principal == Principal::"ana", action, resource == Tool::"refund");
  @id("agents-never-refund")
  forbid (principal in Role::"agent", action, resource == Tool::"refund");
""")
        findings = {(f.severity, f.rule, f.message.split(":")[0])
                    for f in lint(policy, registry)}

        assert {
            ("warning", "ghosts-refund", "unreachable"),
            ("warning", "agents-read", "shadowed"),
            ("warning", "agents-fly", "unreachable"),
            ("error", "wrong-type", "fails validation against the registry (tool read_file)"),
            ("warning", "cedar.policy6", "has no @id; decisions will name it by position, "
                                         "which changes when policies are added"),
            ("warning", "cedar.policy6", "unreachable"),
            ("warning", "ana-refunds", "shadowed"),
        } <= findings
        assert not any(rule == "agents-read" and "forbid" in message
                       for _, rule, message in findings)


def lint_cedar(registry, cedar: str, rules: str = "") -> list[tuple[str, str, str]]:
    policy = Policy.from_text("version: 1\ndefault: deny\n"
                              "principals: {ana: {roles: [agent]}, bob: {roles: [lead]}}\n"
                              f"rules: [{rules}]\ncedar_inline: |\n"
                              + "".join(f"  {line}\n" for line in cedar.splitlines()))
    return [(f.severity, f.rule, f.message) for f in lint(policy, registry)]


class TestPerToolArgumentTypes:
    def test_a_scoped_policy_reading_a_missing_argument_names_it(self, registry):
        """Cedar accepts `has` on a missing argument (false); lint names it as an error."""
        findings = lint_cedar(registry, """
@id("typo-guarded") forbid (principal, action, resource == Tool::"refund")
  when { context.arguments has amout && context.arguments.amout > 5 };
@id("typo-bare") forbid (principal, action, resource == Tool::"refund")
  when { context.arguments.amout > 5 };
@id("nobody-has") permit (principal, action, resource) when { context.arguments has pth };
""")

        assert ("error", "typo-guarded", "reads argument 'amout', which tool refund does "
                "not have") in findings
        assert [("error", "typo-bare")] == [(s, r) for s, r, m in findings
                                            if r == "typo-bare" and "amout" in m]
        assert any(r == "typo-bare" and "(tool refund)" in m for _, r, m in findings)
        assert ("error", "nobody-has", "reads argument 'pth', which no registered tool "
                "has") in findings

    def test_each_tool_types_its_own_arguments(self, registry):
        """An argument read with another tool's type, or without `has` across tools, fails."""
        findings = lint_cedar(registry, """
@id("url-is-a-string") forbid (principal, action, resource == Tool::"http_post")
  when { context.arguments.url > 3 };
@id("required-needs-no-has") permit (principal, action, resource == Tool::"refund")
  when { context.arguments.amount_cents <= 500 && context.arguments.order_id like "A-*" };
@id("optional-needs-has") permit (principal, action, resource == Tool::"refund")
  when { context.arguments.rate < decimal("2.0") };
@id("unscoped-path") forbid (principal, action, resource)
  when { context.arguments.path like "/etc/*" };
@id("scoped-in-condition") forbid (principal, action, resource)
  when { resource == Tool::"read_file" && context.arguments.path like "/etc/*" };
""")
        errors = {(rule, message.split(":")[0]) for severity, rule, message in findings
                  if severity == "error"}

        assert {
            ("url-is-a-string", "fails validation against the registry (tool http_post)"),
            ("optional-needs-has", "fails validation against the registry (tool refund)"),
            ("unscoped-path", "fails validation against the registry (tool http_post, refund)"),
        } == errors

    @pytest.mark.parametrize("team", TEAMS)
    def test_team_policies_still_validate_per_tool(self, team):
        """The example teams' Cedar validates against each of their tools' own types."""
        findings = lint(Policy.from_file(EXAMPLES / team / "policy.yaml"), team_registry(team))

        assert [] == [f for f in findings if f.severity == "error"]


class TestConditionAwareShadowing:
    def test_conditions_decide_where_they_can_and_say_when_they_cannot(self, registry):
        """Implied and contradicted conditions are decided; others are reported as unknown."""
        findings = lint_cedar(registry, """
@id("no-big-refunds") forbid (principal, action, resource == Tool::"refund")
  when { context.arguments.amount_cents > 50000 };
@id("big-refunds-for-leads") permit (principal in Role::"lead", action, resource == Tool::"refund")
  when { context.arguments.amount_cents > 50000 && context.arguments.order_id like "B-*" };
@id("small-refunds") permit (principal in Role::"agent", action, resource == Tool::"refund")
  when { context.arguments.amount_cents <= 50000 };
@id("odd-refunds") permit (principal == Principal::"bob", action, resource == Tool::"refund")
  when { context.arguments.order_id like "X-*" };
@id("no-egress") forbid (principal, action, resource) when { resource.labels.contains("egress") };
@id("agents-post") permit (principal in Role::"agent", action, resource == Tool::"http_post");
@id("agents-read") permit (principal in Role::"agent", action, resource == Tool::"read_file");
@id("anything-labelled") permit (principal, action, resource)
  when { resource.labels.contains("x") };
""", rules="{id: agents-refund-yaml, effect: allow, roles: [agent], tools: [refund]}, "
            "{id: agents-no-refunds, effect: deny, roles: [agent], tools: [refund, read_file]}")
        by_rule = {rule: (severity, message) for severity, rule, message in findings
                   if "shadowed" in message}

        assert ("warning", "shadowed: forbid no-big-refunds always overrides it") == by_rule[
            "big-refunds-for-leads"]
        assert ("warning", "shadowed: deny rule agents-no-refunds always overrides it") == (
            by_rule["small-refunds"])
        assert ("warning", "shadowed: deny rule agents-no-refunds always overrides it") == (
            by_rule["agents-refund-yaml"])
        assert ("warning", "shadowed: forbid no-egress always overrides it") == by_rule[
            "agents-post"]
        assert "info" == by_rule["odd-refunds"][0]
        assert "cannot tell" in by_rule["odd-refunds"][1]
        assert "no-big-refunds" in by_rule["odd-refunds"][1]
        assert "info" == by_rule["anything-labelled"][0]
        assert "agents-read" in by_rule  # the YAML deny names read_file too
        assert ("warning", "shadowed: deny rule agents-no-refunds always overrides it") == (
            by_rule["agents-read"])

    def test_a_contradicted_condition_is_not_shadowed(self, registry):
        """`<= c` against `> c` on the same argument: never both, so nothing to report."""
        findings = lint_cedar(registry, """
@id("no-big-refunds") forbid (principal, action, resource == Tool::"refund")
  when { context.arguments.amount_cents > 50000 };
@id("small-refunds") permit (principal in Role::"agent", action, resource == Tool::"refund")
  when { context.arguments.amount_cents <= 50000 };
@id("unless-big") permit (principal in Role::"lead", action, resource == Tool::"refund")
  unless { context.arguments.amount_cents > 50000 };
""")

        assert [] == [f for f in findings if "shadowed" in f[2]]


class TestExplain:
    def test_explain_traces_every_check_and_changes_nothing(self, registry):
        """explain lists each check in order and takes no rate-limit token, no proposal."""
        policy = Policy.from_text("""
version: 1
default: deny
principals: {ana: {roles: [agent]}}
rules: [{id: agents-refund, effect: allow, roles: [agent], tools: [refund]}]
rate_limits: [{id: one-refund, tools: [refund], limit: 1, window_seconds: 60}]
""")
        call = ToolCall.create(id="c", name="refund",
                               arguments={"order_id": "A", "amount_cents": 1}, dialect="api")
        traces = [policy.explain(call, registry.get("refund"), CallContext("ana"))
                  for _ in range(3)]

        assert ["allow"] * 3 == [t.decision.effect for t in traces]
        assert ["schema", "permission", "rate_limit"] == [c.check for c in traces[0].checks]
        assert "allow" == policy.decide(call, registry.get("refund"), CallContext("ana")).effect
        assert "rate_limit" == policy.decide(call, registry.get("refund"),
                                             CallContext("ana")).kind


class TestReplay:
    def test_replay_reports_what_a_candidate_changes(self, tmp_path, registry):
        """A real log re-decided under a candidate: counts and examples of each change."""
        enforced = tmp_path / "enforced.yaml"
        enforced.write_text("""
version: 1
default: deny
principals: {ana: {roles: [agent]}, bob: {roles: [guest]}}
rules: [{id: agents-all, effect: allow, roles: [agent], tools: ["*"]}]
""")
        candidate = tmp_path / "candidate.yaml"
        candidate.write_text("""
version: 1
default: deny
principals: {ana: {roles: [agent]}, bob: {roles: [guest]}}
rules:
  - {id: agents-all, effect: allow, roles: [agent], tools: ["*"]}
  - {id: no-posts, effect: deny, roles: [agent], tools: [http_post]}
  - {id: guests-read, effect: allow, roles: [guest], tools: [read_file]}
""")
        store = SQLiteAuditStore(tmp_path / "audit.db",
                                 FileSigner.load_or_create(tmp_path / "keys"))
        store.open()
        gateway = Gateway(registry=registry, policy=Policy.from_file(enforced),
                          runner=StubRunner(), audit=store)
        for principal, name, arguments in [
            ("ana", "http_post", {"url": "u"}),
            ("ana", "read_file", {"path": "a"}),
            ("bob", "read_file", {"path": "a"}),
            ("ana", "http_post", {"url": "v"}),
        ]:
            gateway.handle(ToolCall.create(id=f"c{len(name)}", name=name, arguments=arguments,
                                           dialect="api"), principal=principal)
        records = [(r.kind, r.ts, r.body) for r in store.records()]
        store.close()

        report = replay(records, candidate, registry).to_json()

        assert (4, 1, 2, 1) == (report["calls"], report["unchanged"], report["allow_to_deny"],
                                report["deny_to_allow"])
        assert ["no-posts"] == report["examples"]["allow_to_deny"][0]["after"]["reasons"]
        assert "bob" == report["examples"]["deny_to_allow"][0]["principal"]


class TestStatus:
    def test_status_shows_the_policy_and_its_reloads(self, tmp_path):
        """`policy status` reports whether the file loads, its digest and the last reloads."""
        policy_path = tmp_path / "policy.yaml"
        policy_path.write_text((EXAMPLES / "coding" / "policy.yaml").read_text())
        for name in ("coding.cedar", "tools.py"):
            (tmp_path / name).write_text((EXAMPLES / "coding" / name).read_text())
        config = tmp_path / "callward.yaml"
        config.write_text("tools: [tools.py]\npolicy: policy.yaml\n"
                          "policy_shadow: policy.yaml\n")
        store = SQLiteAuditStore(tmp_path / "audit.db",
                                 FileSigner.load_or_create(tmp_path / "keys"))
        store.open()
        store.append("policy.reload_failed", {"ok": False, "digest": "a" * 64,
                                              "previous_digest": "a" * 64, "source": "x",
                                              "message": "invalid at $.default"})
        store.append("policy.shadow_diverged", {"call_id": "c1", "candidate_digest": "b" * 64})
        store.close()

        def status():
            return subprocess.run(
                [sys.executable, "-m", "callward.core.cli", "--home", str(tmp_path), "policy",
                 "status", "--config", str(config)], capture_output=True, text=True,
                check=False)

        good = status()
        policy_path.write_text("version: 1\ndefault: allow\nrules: []\n")
        bad = status()

        assert (0, 1) == (good.returncode, bad.returncode)
        assert '"last_reload_failed": true' in good.stdout
        shadow = json.loads(good.stdout)["shadow_differences"]
        assert (1, "c1") == (shadow["count"], shadow["recent"][0]["call_id"])
        assert '"loads": false' in bad.stdout


class TestExplainAndReplayCommands:
    def test_explain_prints_the_trace_and_replay_the_changes(self, tmp_path, registry):
        """`policy explain` traces a call without running it; `policy replay` reads a real log."""
        config = EXAMPLES / "coding" / "callward.yaml"

        def cli(*args):
            return subprocess.run(
                [sys.executable, "-m", "callward.core.cli", "--home", str(tmp_path), "policy",
                 *args, "--config", str(config)], capture_output=True, text=True, check=False)

        explained = cli("explain", '<tool_call>{"name": "read_file", "arguments": '
                        '{"path": "../x"}}</tool_call>', "--principal", "coding-agent")
        store = SQLiteAuditStore(tmp_path / "audit.db",
                                 FileSigner.load_or_create(tmp_path / "keys"))
        store.open()
        coding = ToolRegistry()
        coding.load(EXAMPLES / "coding" / "tools.py")
        gateway = Gateway(registry=coding,
                          policy=Policy.from_file(EXAMPLES / "coding" / "policy.yaml"),
                          runner=StubRunner(), audit=store)
        gateway.handle(ToolCall.create(id="r1", name="run_tests", arguments={"path": "src"},
                                       dialect="api"), principal="coding-agent")
        store.close()
        candidate = tmp_path / "candidate.yaml"
        candidate.write_text((EXAMPLES / "coding" / "policy.yaml").read_text().replace(
            "tools: [read_file, write_file, run_tests, http_get]",
            "tools: [read_file, write_file, http_get]").replace(
            "cedar: [coding.cedar]", f"cedar: [{EXAMPLES / 'coding' / 'coding.cedar'}]"))
        replayed = cli("replay", "--policy", str(candidate), "--fail-on-change")

        assert 0 == explained.returncode
        assert '"kind": "constraint"' in explained.stdout
        assert 1 == replayed.returncode
        assert '"allow_to_deny": 1' in replayed.stdout
