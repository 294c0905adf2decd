"""
A served model for real: ``transformers serve`` (the OpenAI-compatible server the
``transformers`` package ships, with FastAPI and Uvicorn from ``callward[model]``)
serving the demo model's safetensors copy on 127.0.0.1, offline, started on a free
port by the fixture and stopped after. The agent asks it through
``EndpointChatModel``; the calls run in the real Docker sandbox, the log is real.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from callward.audit import read_records, verify
from callward.core.agent import Agent, AgentLimits
from callward.core.gateway import Gateway
from callward.core.gateway._config import example_config_path
from callward.core.models import EndpointChatModel, GenerationConfig
from callward.core.models._gguf import prepare_demo_model
from tests._net import free_port

START_SECONDS = 600
#: A turn of the 0.5B model takes seconds on an idle machine, minutes on a busy one.
LIMITS = AgentLimits(wall_seconds=1500)


@pytest.fixture(scope="module", name="served")
def _served(tmp_path_factory: pytest.TempPathFactory,
            model_cache: Path) -> Iterator[tuple[str, str]]:
    """
    ``transformers serve`` with the demo model preloaded, answering on loopback: yields
    the base URL and the model name it serves (the directory: the server is pinned to it).
    The model's safetensors copy is the session's (``model_cache``, converted once).
    """
    directory = prepare_demo_model(model_cache)
    hub = tmp_path_factory.mktemp("hub")  # an empty hub cache: nothing is fetched
    port = free_port()
    log = (tmp_path_factory.mktemp("serve") / "serve.log").open("wb")
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("transformers")), "serve", "--host", "127.0.0.1",
         "--port", str(port), "--device", "cpu", "--dtype", "float32",
         "--log-level", "warning", str(directory)],
        stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
             "HF_HUB_CACHE": str(hub)},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_SECONDS
        while True:
            if server.poll() is not None:
                pytest.fail(f"transformers serve exited with {server.returncode}; see {log.name}")
            try:
                if httpx2.get(f"{base}/health", timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx2.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"transformers serve did not answer in {START_SECONDS} s")
            time.sleep(1)
        yield f"{base}/v1", str(directory)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@pytest.mark.timeout(1800)
class TestTransformersServe:
    def test_a_question_answered_through_the_endpoint(self, engine, served, home):
        """
        The served demo model calls add; the gateway runs it in the sandbox; the result
        goes back (folded into a user turn, as for the embedded demo model: in the tool
        role this 0.5B model repeats its call instead of answering); the answer holds
        the sum; model.turn records the served model and the log verifies.
        """
        url, name = served
        with (EndpointChatModel(url, name, timeout_seconds=600, tool_role="user") as model,
              Gateway.from_config(example_config_path(), home=home) as gateway):
            run = Agent(gateway=gateway, model=model, principal="alice",
                        limits=LIMITS).run("What is 1234 + 5678?")

        results = [result for step in run.steps for result in step.results]
        assert "answered" == run.stop, run
        assert "6912" in (run.answer or "")
        assert ("add", "ok", 6912) == (results[0].tool, results[0].kind, results[0].content)
        turns = [r.body for r in read_records(home / "audit.db") if r.kind == "model.turn"]
        first = turns[0]
        assert (url, name, None, "served: no digest") == (
            first["model"]["endpoint"], first["model"]["requested"], first["model"]["digest"],
            first["model"]["weights"])
        assert str(first["model"]["reported"]).startswith(name)
        assert (True, True) == (first["tokens"]["prompt"] > 100, first["tokens"]["output"] > 0)
        verify(home / "audit.db", home / "keys" / "audit-ed25519.pub")

    def test_results_in_the_tool_role_are_taken_by_the_server(self, engine, served, home):
        """
        The tool role with tool_call_id: the server takes the assistant turn with its
        tool_calls and the tool message paired to it, and generates the next turn.
        """
        url, name = served
        with (EndpointChatModel(url, name, timeout_seconds=600, tool_role="tool") as model,
              Gateway.from_config(example_config_path(), home=home) as gateway):
            run = Agent(gateway=gateway, model=model, principal="alice",
                        limits=AgentLimits(max_steps=2, wall_seconds=1500)).run(
                "What is 1234 + 5678?")

        first, second = run.steps
        assert ("add", "ok", 6912) == (first.results[0].tool, first.results[0].kind,
                                       first.results[0].content)
        assert second.turn.served is not None
        assert second.turn.served["finish_reason"] in ("stop", "tool_calls")

    def test_a_response_cut_off_by_the_token_limit_never_runs(self, engine, served, home):
        """
        With a budget of 4 tokens the server stops at finish_reason "length": the turn is
        refused as malformed (call.rejected) and nothing runs.
        """
        url, name = served
        with (EndpointChatModel(url, name, timeout_seconds=600,
                                generation=GenerationConfig(max_new_tokens=4)) as model,
              Gateway.from_config(example_config_path(), home=home) as gateway):
            run = Agent(gateway=gateway, model=model, principal="alice",
                        limits=AgentLimits(max_steps=1)).run("What is 1234 + 5678?")

        kinds = [r.kind for r in read_records(home / "audit.db")]
        assert ("step_budget", "malformed") == (run.stop, run.steps[0].results[0].kind)
        assert "length" == run.steps[0].turn.served["finish_reason"]  # type: ignore[index]
        assert (True, False) == ("call.rejected" in kinds, "call.authorized" in kinds)
