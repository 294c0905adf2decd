"""Pipeline values cannot exist in an invalid state."""

from __future__ import annotations

import dataclasses

import pytest

from callward.core import (
    Decision,
    Execution,
    Receipt,
    ResourceLimits,
    RuleId,
    ToolCall,
    Usage,
    sha256_hex,
)

DIGEST = sha256_hex(b"policy")


class TestValues:
    def test_values_are_frozen(self):
        """A ToolCall cannot be changed after it is made."""
        call = ToolCall.create(id="c", name="square", arguments={"x": 1}, dialect="api")

        with pytest.raises(dataclasses.FrozenInstanceError):
            call.name = "other"  # type: ignore[misc]

    def test_arguments_are_a_fresh_copy(self):
        """Mutating the decoded arguments does not change the call."""
        call = ToolCall.create(id="c", name="t", arguments={"x": [1]}, dialect="api")
        call.arguments["x"].append(2)

        assert {"x": [1]} == call.arguments

    def test_denial_needs_a_rule_and_kind(self):
        """A denial must name the rule that denied it and the failed check."""
        with pytest.raises(ValueError, match="name the rule"):
            Decision("deny", (), DIGEST, kind="schema")
        with pytest.raises(ValueError, match="which check"):
            Decision("deny", (RuleId("r"),), DIGEST)

    def test_allow_needs_limits(self):
        """An allow always says what limits it runs under."""
        with pytest.raises(ValueError, match="limits"):
            Decision("allow", (RuleId("r"),), DIGEST)

    @pytest.mark.parametrize(
        "fields",
        [
            {"wall_seconds": 0},
            {"wall_seconds": float("inf")},
            {"memory_bytes": 1},
            {"pids": True},
            {"cpus": float("nan")},
        ],
    )
    def test_limits_are_finite(self, fields):
        """Every limit is finite and positive."""
        with pytest.raises(ValueError, match="must be"):
            ResourceLimits(**fields)

    def test_execution_value_matches_kind(self):
        """An ok execution has a value; a failed one has none."""
        usage = Usage(wall_ms=1.0, exit_code=0, output_bytes=1)

        with pytest.raises(ValueError, match="has a value"):
            Execution("ok", None, "", usage)
        with pytest.raises(ValueError, match="has no value"):
            Execution("timeout", b"1", "", usage)
        with pytest.raises(ValueError, match="ends ok or"):
            Execution("denied", None, "", usage)  # type: ignore[arg-type]

    def test_receipt_checks_its_hash(self):
        """A receipt holds a real SHA-256 hex digest."""
        with pytest.raises(ValueError, match="hex"):
            Receipt(1, "abc", "k")  # type: ignore[arg-type]
