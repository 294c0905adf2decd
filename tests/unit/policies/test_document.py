"""Loading a policy document: valid ones load, anything else refuses to start."""

from __future__ import annotations

import pytest

from callward.core import PolicyInvalid, ResourceLimits
from callward.policies import load_policy, parse_policy

VALID = """
version: 1
default: deny
principals:
  alice: {roles: [analyst]}
rules:
  - {id: analysts-square, effect: allow, roles: [analyst], tools: [square]}
tools:
  square:
    limits: {wall_seconds: 1, memory_mebibytes: 64}
"""


class TestPolicyDocument:
    def test_valid_document_loads(self):
        """A valid document gives rules, roles and per-tool limits."""
        document = parse_policy(VALID)

        assert ("analysts-square",) == tuple(rule.id for rule in document.rules)
        assert frozenset({"analyst"}) == document.roles_of("alice")
        assert frozenset() == document.roles_of("nobody")

    def test_tool_limits_apply_over_the_tools_own(self):
        """The policy's limits for a tool replace the tool's defaults field by field."""
        limits = parse_policy(VALID).limits_for("square", ResourceLimits(pids=16))

        assert (1.0, 64 << 20, 16) == (limits.wall_seconds, limits.memory_bytes, limits.pids)

    def test_digest_changes_with_content(self):
        """The digest names exactly what was loaded."""
        first = parse_policy(VALID).digest
        second = parse_policy(VALID.replace("[square]", "[square, add]")).digest

        assert first != second
        assert first == parse_policy(VALID).digest

    @pytest.mark.parametrize(
        ("text", "fragment"),
        [
            ("", "mapping"),
            ("- just a list", "mapping"),
            ("version: 1\ndefault: allow\nrules: []", "$.default"),
            ("version: 2\ndefault: deny\nrules: []", "$.version"),
            ("version: 1\nrules: []", "default"),
            ("version: 1\ndefault: deny\nrules: []\nextra: 1", "extra"),
            ("version: 1\ndefault: deny\nrules:\n  - {id: a, effect: allow, tools: [x]}",
             "$.rules[0]"),
            ("version: 1\ndefault: deny\nrules:\n  - {id: a, effect: maybe, roles: [r], "
             "tools: [x]}", "$.rules[0].effect"),
            ("version: 1\ndefault: deny\ndefault: deny\nrules: []", "duplicate key"),
            ("version: 1\ndefault: deny\nrules: [\n", "not valid YAML"),
            ("version: 1\ndefault: deny\nrules: []\nx: &a [1, 2]\ny: [*a, *a]",
             "aliases are not allowed"),
            ("version: 1\ndefault: deny\nrules: []\n? [a, b]\n: 1", "must be a scalar"),
            ("version: 1\ndefault: deny\nrules:\n  - {id: a, effect: allow, roles: [r], "
             "tools: [x]}\n  - {id: a, effect: deny, roles: [r], tools: [x]}", "two rules"),
            ("version: 1\ndefault: deny\nrules: []\ntools:\n  x: {limits: {wall_seconds: 0}}",
             "wall_seconds"),
            ("version: 1\ndefault: deny\nrules: []\ntools:\n  x: {limits: {pids: 1}}", "pids"),
        ],
    )
    def test_invalid_documents_are_refused(self, text, fragment):
        """Every invalid document raises PolicyInvalid (kind policy_invalid) saying where."""
        with pytest.raises(PolicyInvalid) as caught:
            parse_policy(text)

        assert "policy_invalid" == caught.value.kind
        assert fragment in str(caught.value)

    def test_missing_file_is_refused(self, tmp_path):
        """A missing policy file is an error, never an allow-all."""
        with pytest.raises(PolicyInvalid, match="cannot be read"):
            load_policy(tmp_path / "absent.yaml")

    def test_yaml_tags_cannot_run_code(self, tmp_path):
        """The loader is safe: a Python object tag is refused, not constructed."""
        path = tmp_path / "policy.yaml"
        path.write_text("version: !!python/object/apply:os.system ['true']\n"
                        "default: deny\nrules: []\n")

        with pytest.raises(PolicyInvalid, match="not valid YAML"):
            load_policy(path)


class TestToolSections:
    def test_sandbox_settings_and_labels_are_kept(self):
        """isolation and runtime are kept for the sandbox stage; labels join the tool's own."""
        document = parse_policy(
            "version: 1\ndefault: deny\nrules: []\ntools:\n"
            "  square: {isolation: session, runtime: runsc, labels: [math],"
            " output_labels: [secret]}\n")

        assert {"isolation": "session", "runtime": "runsc"} == document.tool_settings["square"]
        assert ("session", "runsc") == (document.isolation_of("square"),
                                        document.runtime_of("square"))
        assert ("call", None) == (document.isolation_of("add"), document.runtime_of("add"))
        assert frozenset({"math", "own"}) == document.labels_of("square", ("own",))
        assert frozenset({"secret"}) == document.output_labels["square"]

    @pytest.mark.parametrize("entry", [
        "{isolation: shared}", "{runtime: docker}", "{confine: {root: relative, arguments: [p]}}",
        "{labels: [Not A Label]}",
    ])
    def test_bad_tool_settings_refuse_to_start(self, entry):
        """Unknown isolation or runtime, a relative confinement root, a bad label: invalid."""
        with pytest.raises(PolicyInvalid):
            parse_policy(f"version: 1\ndefault: deny\nrules: []\ntools:\n  square: {entry}\n")

    @pytest.mark.parametrize(("section", "fragment"), [
        ("rate_limits: [{id: r, limit: 0, window_seconds: 1}]", "$.rate_limits[0].limit"),
        ("approvals: [{id: a, tools: [x], approvers: {}}]", "$.approvals[0].approvers"),
        ("results: [{id: r, redact: ['(unclosed']}]", "not a valid regular expression"),
        ("flows: [{id: f, from: [], to: [egress]}]", "$.flows[0].from"),
        ("rate_limits: [{id: r, limit: 1, window_seconds: 1}]\n"
         "flows: [{id: r, from: [a], to: [b]}]", "two rules"),
    ])
    def test_bad_stateful_sections_refuse_to_start(self, section, fragment):
        """Each stateful section is validated; rule ids are unique across all sections."""
        with pytest.raises(PolicyInvalid) as caught:
            parse_policy(f"version: 1\ndefault: deny\nrules: []\n{section}\n")

        assert fragment in str(caught.value)
