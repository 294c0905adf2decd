"""
`callward tools load / activate / rollback / unload / list` while a gateway runs: the
real CLI in another process, a real gateway object kept alive, the real Docker
sandbox, real SQLite and real keys.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from mcp import Client, StdioServerParameters

from callward.audit import read_records
from callward.core import ToolCall
from callward.core.gateway import Gateway
from callward.core.testing import kinds
from tests.unit.core.test_registry_versions import tool_file

POLICY = """
version: 1
default: deny
principals:
  alice: {roles: [analyst]}
rules:
  - {id: analysts-double, effect: allow, roles: [analyst], tools: [double, square]}
"""
PIN = """
tools:
  double:
    versions: ["1.0.0"]
"""


def call(name: str = "double", x: int = 3) -> ToolCall:
    return ToolCall.create(id="c1", name=name, arguments={"x": x}, dialect="api")


@pytest.fixture(name="config")
def _config(tmp_path: Path, examples: Path) -> Path:
    """A configuration whose base set is the demo's tools (no `double`)."""
    (tmp_path / "policy.yaml").write_text(POLICY)
    (tmp_path / "pinned-policy.yaml").write_text(POLICY + PIN)
    for name, policy in (("callward.yaml", "policy.yaml"), ("pinned.yaml", "pinned-policy.yaml")):
        (tmp_path / name).write_text(
            f"tools: [{examples / 'tools.py'}]\npolicy: {policy}\nsandbox: {{runtime: runc}}\n")
    return tmp_path / "callward.yaml"


@pytest.fixture(name="gateway")
def _gateway(engine, config: Path, home: Path) -> Iterator[Gateway]:
    with Gateway.from_config(config, home=home) as gateway:
        yield gateway


@pytest.fixture(name="tools")
def _tools(cli, config: Path):
    """`callward tools ...` on the same home and configuration: JSON, a table, or stderr."""

    def run(*args: str, expect: int = 0):
        done = cli("tools", *args, "--config", str(config))
        assert expect == done.returncode, done.stderr
        if expect != 0:
            return done.stderr
        return json.loads(done.stdout) if done.stdout.startswith(("[", "{")) else done.stdout

    return run


class TestLiveChanges:
    def test_load_then_load_again_then_rollback_while_the_gateway_runs(
            self, gateway, tools, tmp_path):
        """v1 runs; v2 loaded from another process runs next; rollback runs v1 again."""
        v1 = tool_file(tmp_path, "1.0.0", "x * 2")
        tools("load", str(v1))
        first = gateway.handle(call(), principal="alice")
        v1.write_text(v1.read_text().replace("x * 2", "x * 3"))  # edited after the load
        edited = gateway.handle(call(), principal="alice")
        tools("load", str(tool_file(tmp_path, "2.0.0", "x * 20")))
        second = gateway.handle(call(), principal="alice")
        second_record = gateway.audit.last()
        (rolled,) = tools("rollback", "double")
        third = gateway.handle(call(), principal="alice")
        history = tools("history", "double")

        assert (6, 6, 60, 6) == (first.content, edited.content, second.content, third.content)
        assert ("call.completed", "double@2.0.0") == (second_record.kind,
                                                      second_record.body["tool"])
        assert ("tool.rolled_back", "double@1.0.0") == (rolled["kind"], rolled["ref"])
        assert ("1.0.0", [("activated", "1.0.0", None), ("activated", "2.0.0", "1.0.0"),
                          ("rolled_back", "1.0.0", "2.0.0")]) == (
            history["active"],
            [(e["action"], e["version"], e["previous"]) for e in history["history"]])

    def test_each_record_names_the_version_and_digest_that_ran(
            self, gateway, tools, tmp_path, home):
        """call.authorized carries the ref and digest of the version that ran."""
        (loaded, _activated) = tools("load", str(tool_file(tmp_path, "2.0.0", "x * 20")))
        gateway.handle(call(), principal="alice")

        with sqlite3.connect(home / "audit.db") as db:
            (body,) = db.execute(
                "SELECT body FROM records WHERE kind = 'call.authorized'").fetchone()
        assert {"ref": "double@2.0.0", "digest": loaded["digest"]} == json.loads(body)["tool"]

    def test_unload_and_list(self, gateway, tools, tmp_path):
        """An unloaded version is gone from the list and from the running gateway."""
        tools("load", str(tool_file(tmp_path, "1.0.0")))
        tools("load", str(tool_file(tmp_path, "2.0.0", "x * 20")), "--inactive")
        refused = tools("unload", "double@1.0.0", expect=2)
        tools("unload", "double@2.0.0")
        listed = tools("list", "--json")
        table = tools("list")
        gone = gateway.handle(call("double@2.0.0"), principal="alice")

        assert "is the active version" in refused
        assert [("double@1.0.0", True, "live")] == [
            (e["ref"], e["active"], e["origin"]) for e in listed if e["name"] == "double"]
        assert ("square@1.0.0", "config") in [(e["ref"], e["origin"]) for e in listed]
        assert table.startswith("NAME")
        assert "double" in table
        assert "unknown_tool" == gone.kind

    def test_activate_and_explicit_version(self, gateway, tools, tmp_path):
        """An inactive version runs only when named; activation makes it the default."""
        tools("load", str(tool_file(tmp_path, "1.0.0")))
        tools("load", str(tool_file(tmp_path, "2.0.0", "x * 20")), "--inactive")
        canary = gateway.handle(call("double@2.0.0"), principal="alice")
        default = gateway.handle(call(), principal="alice")
        tools("activate", "double@2.0.0")
        activated = gateway.handle(call(), principal="alice")

        assert (60, 6, 60) == (canary.content, default.content, activated.content)

    def test_a_pinned_policy_denies_the_new_version(self, engine, cli, tmp_path, home, config):
        """With the policy pinning 1.0.0, loading 2.0.0 makes calls denied, audited."""
        pinned = tmp_path / "pinned.yaml"
        with Gateway.from_config(pinned, home=home) as gateway:
            cli("tools", "load", str(tool_file(tmp_path, "1.0.0")), "--config", str(pinned))
            allowed = gateway.handle(call(), principal="alice")
            cli("tools", "load", str(tool_file(tmp_path, "2.0.0", "x * 20")),
                "--config", str(pinned))
            denied = gateway.handle(call(), principal="alice")

        assert ("ok", "permission") == (allowed.kind, denied.kind)
        assert "tools.double.pin" == denied.decision.reasons[0]
        assert "version 2.0.0" in json.loads(denied.content_json)["message"]
        assert "call.denied" == kinds(read_records(home / "audit.db"))[-1]

    def test_every_change_is_audited_and_the_log_verifies(self, gateway, tools, cli, tmp_path,
                                                          home):
        """Each change is a signed record beside the calls, and `audit verify` passes."""
        tools("load", str(tool_file(tmp_path, "1.0.0")))
        tools("load", str(tool_file(tmp_path, "2.0.0", "x * 20")))
        gateway.handle(call(), principal="alice")
        tools("rollback", "double")
        tools("unload", "double@2.0.0")
        verified = cli("audit", "verify")

        assert ["gateway.started", "tool.loaded", "tool.activated", "tool.loaded",
                "tool.activated",
                "call.authorized", "call.completed", "tool.rolled_back",
                "tool.unloaded"] == kinds(read_records(home / "audit.db"))
        assert (0, "OK") == (verified.returncode, json.loads(verified.stdout)["verdict"])


class TestWhileMcpServes:
    def test_mcp_serve_picks_up_loads_and_rollbacks(self, engine, tools, config, home, tmp_path):
        """`callward mcp serve` keeps running; a tool loaded meanwhile is listed and runs,
        a new version runs at the next call, and a rollback is seen at the one after."""
        params = StdioServerParameters(
            command=sys.executable, env={**os.environ},
            args=["-m", "callward.core.cli", "--home", str(home), "mcp", "serve",
                  "--config", str(config), "--principal", "alice"])

        async def session() -> list[object]:
            seen: list[object] = []
            async with Client(params, read_timeout_seconds=60) as client:
                before = await client.call_tool("double", {"x": 3})
                seen.append(before.structured_content["kind"])
                tools("load", str(tool_file(tmp_path, "1.0.0")))
                listed = await client.list_tools()
                seen.append("double" in [tool.name for tool in listed.tools])
                for step in (None, ("load", str(tool_file(tmp_path, "2.0.0", "x * 20"))),
                             ("rollback", "double")):
                    if step is not None:
                        tools(*step)
                    result = await client.call_tool("double", {"x": 3})
                    seen.append(result.content[0].text)
            return seen

        seen = anyio.run(session)

        assert ["unknown_tool", True, "6", "60", "6"] == seen
