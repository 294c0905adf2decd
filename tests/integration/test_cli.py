"""The command surface, end to end, against a real engine, real SQLite and real keys."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest


def records(home: Path) -> list[tuple[int, str]]:
    with sqlite3.connect(home / "audit.db") as db:
        return db.execute("SELECT seq, kind FROM records ORDER BY seq").fetchall()


@pytest.fixture(name="filled_log")
def _filled_log(cli, engine, home):
    """A log of eight records written by real calls: three starts and five call records."""
    for text in ('call function("square", [3], 9)', 'call function("nope", [])',
                 'call function("add", [1, 2])'):
        cli("call", text, "--principal", "alice")
    assert 8 == len(records(home))
    return home / "audit.db"


class TestDemo:
    def test_demo_runs_every_step_and_verifies(self, cli, engine, leftover_containers):
        """`callward demo --no-model` shows every required case and ends with a verified log."""
        done = cli("demo", "--no-model")

        assert 0 == done.returncode, done.stderr
        for expected in ("expected output matched: True", "outcome:  schema",
                         "outcome:  unknown_tool", "outcome:  permission", "outcome:  timeout",
                         "outcome:  malformed", "plan ok: 4 steps",
                         "provenance: /texts <- clean.output.texts", "verdict: OK"):
            assert expected in done.stdout
        assert [] == leftover_containers()


class TestCall:
    def test_call_prints_results_and_receipts(self, cli, engine, home):
        """`callward call` runs each call and prints results with receipts as JSON."""
        done = cli("call", 'call function("square", [12], 144)', "--principal", "alice")

        (result,) = json.loads(done.stdout)
        assert (0, "ok", 144, True) == (done.returncode, result["kind"], result["content"],
                                        result["expected_matched"])
        assert [(1, "gateway.started"), (2, "call.authorized"),
                (3, "call.completed")] == records(home)
        assert 3 == result["receipt"]["seq"]

    def test_denied_call_exits_1(self, cli, engine):
        """A denied call is a failed check: exit 1, with its kind."""
        done = cli("call", 'call function("drop_table", ["users"])', "--principal", "mallory")

        assert (1, "permission") == (done.returncode, json.loads(done.stdout)[0]["kind"])

    def test_malformed_text_exits_2(self, cli, engine, home):
        """Unreadable model output is bad input: exit 2, recorded as call.rejected."""
        done = cli("call", 'call function("square", [3]', "--principal", "alice")

        assert (2, "malformed") == (done.returncode, json.loads(done.stdout)[0]["kind"])
        assert [(1, "gateway.started"), (2, "call.rejected")] == records(home)

    def test_text_from_stdin(self, cli, engine):
        """TEXT '-' reads the model output from standard input."""
        done = cli("call", "-", "--principal", "alice",
                   stdin='<tool_call>{"name": "capital", "arguments": {"country": "Japan"}}'
                         "</tool_call>")

        assert "Tokyo" == json.loads(done.stdout)[0]["content"]

    def test_unreachable_engine_refuses_to_start(self, cli, home):
        """
        With no engine the gateway cannot prove its sandbox: it refuses to serve, says
        what failed and what to do, and records gateway.start_refused; nothing ran.
        """
        done = cli("call", 'call function("square", [3])', "--principal", "alice",
                   env={"DOCKER_HOST": "unix:///nonexistent/docker.sock"})

        expected = (1, "", True, False, [(1, "gateway.start_refused")])
        assert expected == (done.returncode, done.stdout,
                            "\n[sandbox_unavailable] the sandbox does not prove its "
                            "protections (runc: " in done.stderr,
                            "Traceback" in done.stderr, records(home))

    def test_unreachable_engine_with_probes_skipped_is_audited_with_no_result(self, cli, home):
        """
        Started with --unsafe-skip-probes (recorded), a call without an engine still
        ends sandbox_unavailable, audited, with no value.
        """
        done = cli("call", 'call function("square", [3])', "--principal", "alice",
                   "--unsafe-skip-probes",
                   env={"DOCKER_HOST": "unix:///nonexistent/docker.sock"})

        (result,) = json.loads(done.stdout)
        assert (1, "sandbox_unavailable") == (done.returncode, result["kind"])
        assert "sandbox_unavailable" == result["content"]["error"]
        assert [(1, "gateway.started"), (2, "call.authorized"),
                (3, "call.completed")] == records(home)
        with sqlite3.connect(home / "audit.db") as db:
            (started,) = db.execute("SELECT body FROM records WHERE seq = 1").fetchone()
            (body,) = db.execute("SELECT body FROM records WHERE seq = 3").fetchone()
        assert (True, []) == (json.loads(started)["unsafe_skip_probes"],
                              json.loads(started)["probes"])
        assert "sandbox_unavailable" == json.loads(body)["outcome"]

    def test_broken_policy_refuses_to_start(self, cli, tmp_path, examples):
        """A broken policy file is an error at start (exit 2), never an allow-all."""
        (tmp_path / "policy.yaml").write_text("version: 1\ndefault: allow\nrules: []\n")
        config = tmp_path / "callward.yaml"
        config.write_text(f"tools: [{examples / 'tools.py'}]\npolicy: policy.yaml\n")

        done = cli("call", 'call function("square", [3])', "--principal", "alice",
                   "--config", str(config))

        assert 2 == done.returncode
        assert "[policy_invalid]" in done.stderr


class TestAuditVerify:
    def test_untouched_log_verifies(self, cli, filled_log):
        """An untouched log verifies: exit 0 and the record count."""
        done = cli("audit", "verify")

        assert (0, "OK", 8) == (done.returncode, *map(json.loads(done.stdout).get,
                                                       ("verdict", "records")))

    @pytest.mark.parametrize(
        ("tamper", "seq"),
        [
            ("UPDATE records SET body = replace(body, 'alice', 'admin') WHERE seq = 2", 2),
            ("DELETE FROM records WHERE seq = 2", 3),
            ("UPDATE records SET seq = -seq WHERE seq IN (2, 4);"
             "UPDATE records SET seq = 4 WHERE seq = -2;"
             "UPDATE records SET seq = 2 WHERE seq = -4", 2),
        ],
        ids=["edit", "delete", "reorder"],
    )
    def test_tampering_names_the_first_broken_seq(self, cli, filled_log, tamper, seq):
        """
        Editing, deleting or reordering a row fails verification at the first record
        that no longer verifies (for a deletion, the one after the gap), with exit 1.
        """
        with sqlite3.connect(filled_log) as db:
            db.executescript(tamper)

        done = cli("audit", "verify")

        verdict = json.loads(done.stdout)
        assert (1, "FAILED", seq) == (done.returncode, verdict["verdict"], verdict["seq"])

    def test_show_prints_records(self, cli, filled_log):
        """`audit show` prints records as JSON lines, filterable by kind."""
        done = cli("audit", "show", "--kind", "call.denied")

        (line,) = done.stdout.splitlines()
        assert "call.denied" == json.loads(line)["kind"]
