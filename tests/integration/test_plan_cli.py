"""`callward plan run / validate` end to end: a real engine, real SQLite, real keys."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from callward.audit import read_records
from callward.core.testing import kinds

EXAMPLE = Path(__file__).resolve().parents[2] / "core" / "examples" / "plans"
CONFIG = str(EXAMPLE / "callward.yaml")
NEWS = str(EXAMPLE / "news_summary.yaml")

LEAK = """
name: leak
steps:
  - {id: wire, tool: internal_wire, arguments: {topic: acme}}
  - {id: search, tool: search_articles, arguments: {query: solar farm, limit: 1}}
  - id: leak
    tool: publish
    arguments: {channel: public, text: {$ref: "steps.wire.output.items[0].text"}}
  - id: news
    tool: publish
    arguments: {channel: public, text: {$ref: "steps.search.output.hits[0].title"}}
  - id: after_leak
    tool: clean_text
    arguments: {texts: [{$ref: "steps.leak.output.channel"}]}
"""


def body(home: Path, seq: int) -> dict:
    with sqlite3.connect(home / "audit.db") as db:
        (text,) = db.execute("SELECT body FROM records WHERE seq = ?", (seq,)).fetchone()
    return json.loads(text)


class TestPlanRun:
    def test_news_summary_runs_end_to_end_and_the_log_verifies(self, cli, engine, home):
        """The example plan runs every step in the sandbox, exits 0, and the log verifies."""
        done = cli("plan", "run", NEWS, "--config", CONFIG, "--principal", "editor")

        assert 0 == done.returncode, done.stderr
        report = json.loads(done.stdout)
        assert [("search", "ok"), ("background", "ok"), ("clean", "ok"),
                ("summarize", "ok")] == [(s["step"], s["kind"]) for s in report["steps"]]
        summary = report["steps"][3]["output"]["summary"]
        assert summary.startswith("Utilities added record battery storage to the grid")
        assert "<p>" not in summary
        written = kinds(read_records(home / "audit.db"))
        assert ["gateway.started", "plan.started", "plan.completed"] == [
            written[0], written[1], written[-1]]
        clean = report["steps"][2]
        completed = body(home, clean["receipt"]["seq"])
        assert [e["source_step"] for e in clean["provenance"]] == [
            e["source_step"] for e in completed["provenance"]["edges"]]
        verified = cli("audit", "verify")
        assert 0 == verified.returncode, verified.stdout + verified.stderr

    def test_a_secret_value_is_denied_per_value_and_exits_1(self, cli, engine, home):
        """Publishing the wire's secret is denied as flow; the news title is published."""
        path = home / "leak.yaml"
        path.write_text(LEAK)

        done = cli("plan", "run", str(path), "--config", CONFIG, "--principal", "editor",
                   "--max-parallel", "2")

        assert 1 == done.returncode, done.stderr
        steps = {s["step"]: s for s in json.loads(done.stdout)["steps"]}
        assert ("denied", "flow") == (steps["leak"]["status"], steps["leak"]["kind"])
        assert ("ok", "ok") == (steps["news"]["status"], steps["news"]["kind"])
        assert "skipped: dependency leak ended flow" == steps["after_leak"]["message"]
        denied = body(home, steps["leak"]["receipt"]["seq"])
        assert ("no-secret-egress", "$.text") == (denied["decision"]["reasons"][0],
                                                  denied["decision"]["json_path"])
        assert "plan.step_skipped" in kinds(read_records(home / "audit.db"))

    def test_a_bad_plan_exits_2_is_audited_and_nothing_runs(self, cli, engine, home):
        """A plan with an unknown step ref is refused with its location; nothing runs."""
        path = home / "bad.yaml"
        path.write_text(Path(NEWS).read_text().replace("steps.clean.output", "steps.clen.output"))

        done = cli("plan", "run", str(path), "--config", CONFIG, "--principal", "editor")

        assert 2 == done.returncode
        assert [{"location": "steps[3].arguments.texts",
                 "message": "$ref names unknown step 'clen'"}] == json.loads(
            done.stdout)["problems"]
        assert "[plan_invalid]" in done.stderr
        assert ["gateway.started", "plan.rejected"] == kinds(read_records(home / "audit.db"))


class TestPlanValidate:
    def test_valid_plan_prints_its_order(self, cli):
        """`plan validate` checks against the registry and prints the order; runs nothing."""
        done = cli("plan", "validate", NEWS, "--config", CONFIG)

        assert 0 == done.returncode, done.stderr
        assert ["search", "background", "clean", "summarize"] == json.loads(done.stdout)["order"]

    def test_unknown_tool_exits_2(self, cli, home):
        """A plan naming a tool the registry lacks is refused with exit 2."""
        path = home / "bad.yaml"
        path.write_text("steps:\n  - {id: a, tool: embed_search, arguments: {}}\n")

        done = cli("plan", "validate", str(path), "--config", CONFIG)

        assert 2 == done.returncode
        assert "no tool 'embed_search' is registered" in done.stderr
