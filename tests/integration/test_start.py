"""
A gateway proves its sandbox live before it serves, on every runtime in force, and
says so in a signed gateway.started record; the offline verifier accepts the log.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from callward.audit import read_records, verify
from callward.core.gateway import Gateway

pytestmark = pytest.mark.docker

POLICY = """
version: 1
default: deny
principals:
  alice: {roles: [analyst]}
rules:
  - {id: analysts-square, effect: allow, roles: [analyst], tools: [square, add]}
tools:
  add:
    runtime: runsc
"""


class TestGatewayStart:
    def test_every_runtime_in_force_is_probed_and_recorded(self, engine, tmp_path: Path,
                                                          home: Path, examples: Path):
        """The policy names gVisor for one tool: runc and runsc are both proven, then serve."""
        (tmp_path / "policy.yaml").write_text(POLICY)
        config = tmp_path / "callward.yaml"
        config.write_text(f"tools: [{examples / 'tools.py'}]\npolicy: policy.yaml\n")

        with Gateway.from_config(config, home=home) as gateway:
            (result,) = gateway.handle_text('call function("add", [2, 3])', principal="alice")

        records = list(read_records(home / "audit.db"))
        started = json.loads(records[0].body_json)
        expected = ("gateway.started", ["runc", "runsc"], [True, True], [[], []], "ok", 5)
        assert expected == (records[0].kind, started["runtimes"],
                            [probe["ok"] for probe in started["probes"]],
                            [probe["failures"] for probe in started["probes"]],
                            result.kind, result.content)
        verify(home / "audit.db", home / "keys" / "audit-ed25519.pub")
