"""
`callward stats` on a real log and on a live process's endpoint, and
`callward anomalies`, end to end: real engine, real SQLite, real keys, real HTTP.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from mcp import Client
from prometheus_client.parser import text_string_to_metric_families

from callward.policies._anomaly_state import Anomaly, AnomalyState
from tests._net import free_port


def _wait_for(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mcp serve exited: {process.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    pytest.fail(f"nothing listens on {port}")


@pytest.fixture(name="filled_log")
def _filled_log(cli, engine, home: Path) -> Path:
    """Real calls: two allowed, one unknown tool, one denied."""
    for text, principal in (('call function("square", [3], 9)', "alice"),
                            ('call function("add", [1, 2])', "alice"),
                            ('call function("nope", [])', "alice"),
                            ('call function("drop_table", ["users"])', "mallory")):
        cli("call", text, "--principal", principal)
    return home / "audit.db"


class TestStatsFromLog:
    def test_stats_json_has_every_stage_and_tool(self, cli, filled_log):
        """p50/p99 per stage (queue derived from the record) and per tool, from the log."""
        done = cli("stats", "--json")

        assert 0 == done.returncode, done.stderr
        summary = json.loads(done.stdout)
        assert 4 == summary["calls"]
        assert {"parse", "policy", "audit_authorized", "sandbox", "queue"} \
            <= set(summary["stages"])
        assert 2 == summary["stages"]["sandbox"]["n"]
        assert summary["stages"]["sandbox"]["p99_ms"] >= summary["stages"]["queue"]["p50_ms"]
        assert {"ok": 2, "permission": 1, "unknown_tool": 1} == summary["outcomes"]
        assert any(tool.startswith("square") for tool in summary["tools"])

    def test_stats_table_and_since(self, cli, filled_log):
        """The table names stages and tools; --since in the future leaves nothing."""
        table = cli("stats", "--since", "1h")
        future = cli("stats", "--json", "--since", "2999-01-01T00:00:00Z")
        bad = cli("stats", "--since", "yesterday-ish")

        assert 0 == table.returncode, table.stderr
        assert "p50 ms" in table.stdout
        assert "sandbox" in table.stdout
        assert 0 == json.loads(future.stdout)["calls"]
        assert 2 == bad.returncode

    def test_stats_without_a_log_is_bad_input(self, cli):
        """No log at the path: exit 2, saying where it looked."""
        done = cli("stats")

        assert 2 == done.returncode
        assert "no audit log" in done.stderr + done.stdout


@pytest.fixture(name="live")
def _live(home: Path, examples: Path) -> Iterator[tuple[str, str]]:
    """`callward mcp serve --transport http --metrics-port`: (MCP URL, metrics URL)."""
    port, metrics_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "callward.core.cli", "--home", str(home), "mcp", "serve",
         "--config", str(examples / "callward.yaml"), "--principal", "alice",
         "--transport", "http", "--port", str(port), "--metrics-port", str(metrics_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for(port, process)
        _wait_for(metrics_port, process)
        yield f"http://127.0.0.1:{port}/mcp", f"http://127.0.0.1:{metrics_port}/metrics"
    finally:
        process.terminate()
        process.wait(timeout=30)


class TestStatsLive:
    def test_live_endpoint_scraped_and_summarised(self, cli, engine, live):
        """Calls over MCP show up on the live endpoint and in `callward stats --url`."""
        mcp_url, metrics_url = live

        async def exercise() -> None:
            async with Client(mcp_url, read_timeout_seconds=60) as client:
                await client.call_tool("square", {"x": 3})
                await client.call_tool("square", {"x": 4})
                await client.call_tool("drop_table", {"table": "t"})

        anyio.run(exercise)
        with urllib.request.urlopen(metrics_url, timeout=10) as response:  # noqa: S310 - http
            families = {f.name: f for f in text_string_to_metric_families(
                response.read().decode())}
        done = cli("stats", "--url", metrics_url, "--json")

        calls = {s.labels["outcome"]: s.value for s in families["callward_calls"].samples
                 if s.name == "callward_calls_total"}
        assert {"ok": 2.0, "permission": 1.0} == calls
        assert 0 == done.returncode, done.stderr
        summary = json.loads(done.stdout)
        assert (3, 2) == (summary["calls"], summary["stages"]["sandbox"]["n"])
        assert 0 == summary["anomalies_open"]


class TestAnomaliesCli:
    def test_operator_resolves_an_open_anomaly_and_it_verifies(self, cli, engine, home):
        """`anomalies resolve ID --by P` closes it, signs anomaly.resolved, the log verifies."""
        cli("call", 'call function("square", [2])', "--principal", "alice")  # makes keys
        state = AnomalyState(home / "anomaly-state.db")
        state.add(Anomaly(id="anm_1", principal="alice", tool="square", metric="call_rate",
                          evidence={"observed": 200}, detected_at=time.time(),
                          last_seen=time.time()))
        state.close()

        listed = json.loads(cli("anomalies", "list").stdout)
        resolved = cli("anomalies", "resolve", "anm_1", "--by", "sec-oncall")
        again = cli("anomalies", "resolve", "anm_1", "--by", "sec-oncall")
        shown = cli("audit", "show", "--kind", "anomaly.resolved", "--last", "1")
        verified = cli("audit", "verify")

        assert ["anm_1"] == [a["id"] for a in listed]
        assert (0, 1) == (resolved.returncode, again.returncode)
        assert "sec-oncall" == json.loads(shown.stdout)["body"]["by"]
        assert [] == json.loads(cli("anomalies", "list").stdout)
        assert 0 == verified.returncode, verified.stdout

    def test_a_resolution_keeps_its_reason(self, cli, engine, home):
        """`anomalies resolve ID --by P --reason R`: R is in the anomaly.resolved record."""
        cli("call", 'call function("square", [2])', "--principal", "alice")  # makes keys
        state = AnomalyState(home / "anomaly-state.db")
        state.add(Anomaly(id="anm_2", principal="alice", tool="square", metric="call_rate",
                          evidence={"observed": 200}, detected_at=time.time(),
                          last_seen=time.time()))
        state.close()

        resolved = cli("anomalies", "resolve", "anm_2", "--by", "sec-oncall",
                       "--reason", "the nightly load test")
        shown = cli("audit", "show", "--kind", "anomaly.resolved", "--last", "1")

        assert 0 == resolved.returncode
        assert ("sec-oncall", "the nightly load test") == (
            json.loads(shown.stdout)["body"]["by"], json.loads(shown.stdout)["body"]["reason"])
