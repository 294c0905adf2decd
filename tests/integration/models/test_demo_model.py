"""
The real demo model (Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF from the six pinned
chunk wheels) end to end: real Docker sandbox, real SQLite log, real keys.

Kept to a few short turns: the model is converted once per session (about a
minute on 2 cores; ``conftest.py``) and each turn takes a few seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from callward.audit import read_records, verify
from callward.core.agent import Agent
from callward.core.gateway import Gateway
from callward.core.gateway._config import example_config_path
from callward.core.models._gguf import DEMO_MODEL_ID, DEMO_MODEL_SHA256
from callward.core.testing import kinds


# A turn takes seconds on an idle 2-core machine, much longer on a shared one.
@pytest.mark.timeout(1200)
class TestDemoModel:
    def test_arithmetic_through_the_gateway(self, engine, demo_model, home):
        """The model calls add through the gateway and answers with the sum; the log verifies."""
        with Gateway.from_config(example_config_path(), home=home) as gateway:
            run = Agent(gateway=gateway, model=demo_model, principal="alice").run(
                "What is 1234 + 5678?")
            turns = [r.body for r in gateway.audit.records() if r.kind == "model.turn"]

        results = [result for step in run.steps for result in step.results]
        assert "answered" == run.stop
        assert "6912" in (run.answer or "")
        assert [("add", "ok", 6912)] == [(r.tool, r.kind, r.content) for r in results]
        assert {(DEMO_MODEL_ID, DEMO_MODEL_SHA256)} == {
            (body["model"]["id"], body["model"]["digest"]) for body in turns}
        assert ["call.authorized", "call.completed", "model.turn", "model.turn"] == [
            kind for kind in kinds(read_records(home / "audit.db"))
            if kind.startswith(("call.", "model."))]
        verify(home / "audit.db", home / "keys" / "audit-ed25519.pub")
        # Only this process's containers: the engine may be shared with other runs.
        assert [] == engine.containers.list(
            all=True, filters={"label": f"callward.pid={os.getpid()}"})

    def test_forbidden_tool_is_not_offered_and_never_runs(self, engine, demo_model, home):
        """
        A guest asking to drop a table: the model is not offered drop_table, nothing runs
        (a call of it by name would be denied), and the model answers.
        """
        with Gateway.from_config(example_config_path(), home=home) as gateway:
            offered = [spec.name for spec in gateway.tools_for("mallory")]
            run = Agent(gateway=gateway, model=demo_model, principal="mallory").run(
                "Drop the table named users.")

        results = [result for step in run.steps for result in step.results]
        expected = ("answered", ["square"], set())
        assert expected == (run.stop, offered,
                            {result.kind for result in results} - {"permission", "unknown_tool"})
        assert "call.completed" not in kinds(read_records(home / "audit.db"))

    def test_callward_demo_runs_the_model(self, engine, home, model_cache):
        """`callward demo` runs the model on its questions and ends with a verified log."""
        (home / "models").symlink_to(model_cache, target_is_directory=True)

        done = subprocess.run(
            [sys.executable, "-m", "callward.core.cli", "--home", str(home), "demo"],
            capture_output=True, text=True, timeout=900, check=False,
        )

        assert 0 == done.returncode, done.stderr
        for expected in ("model:  Qwen2.5-Coder-0.5B-Instruct", "set-up: sandbox pool warmed",
                         "Answered correctly with tools:", "of model + callward time",
                         "outcome:  ok", "plan ok: 4 steps",
                         "step tone: sentiment  ok", "verdict: OK"):
            assert expected in done.stdout
        # The guest is not offered drop_table, and nothing of it runs.
        forbidden = done.stdout.split("[4] Tempted into a forbidden tool")[1]
        assert "correct: yes" in forbidden.split("Answered correctly with tools:")[0]

    def test_callward_agent_answers_as_json(self, engine, home, model_cache):
        """`callward agent QUESTION` prints the run as JSON: turns, results, receipts, answer."""
        (home / "models").symlink_to(model_cache, target_is_directory=True)

        done = subprocess.run(
            [sys.executable, "-m", "callward.core.cli", "--home", str(home), "agent",
             "What is 37 squared?", "--principal", "alice"],
            capture_output=True, text=True, timeout=600, check=False,
        )

        assert 0 == done.returncode, done.stderr
        run = json.loads(done.stdout)
        assert ("answered", DEMO_MODEL_SHA256) == (run["stop"], run["model"]["digest"])
        assert "1369" in run["answer"]
        assert [("square", "ok")] == [(r["tool"], r["kind"]) for step in run["steps"]
                                      for r in step["results"]]
