"""
A served model (``model.endpoint``): the OpenAI chat-completions client, against a real
HTTP server on loopback (``http.server`` in a thread) that answers as a test tells it:
calls through the gateway, results paired by id, every way a server can fail audited,
and the API key nowhere but in the Authorization header.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from callward.core import ConfigurationError, canonical_bytes, sha256_hex
from callward.core.agent import Agent
from callward.core.errors import ModelEndpointFailed
from callward.core.gateway._config import load_config
from callward.core.models import EndpointChatModel
from callward.core.models._chat import ChatMessage
from callward.core.testing import kinds

KEY = "sk-test-5b1f0c7e9a2d4e6f8a0b"
KEY_ENV = "CALLWARD_TEST_ENDPOINT_KEY"


@dataclass
class Reply:
    """One answer of the loopback server: a status, a body, and a delay before it."""

    body: bytes
    status: int = 200
    delay: float = 0.0


@dataclass
class Loopback:
    """The server's script of replies, and the requests it received (headers, JSON body)."""

    replies: list[Reply] = field(default_factory=list)
    requests: list[tuple[dict[str, str], dict]] = field(default_factory=list)
    url: str = ""

    def answer(self, *replies: Reply) -> None:
        self.replies.extend(replies)


def completion(message: dict, *, finish_reason: str = "stop", usage: dict | None = None,
               model: str = "served-model-v1") -> Reply:
    """A chat.completion reply as an OpenAI-compatible server sends it."""
    return Reply(json.dumps({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", **message},
                     "finish_reason": finish_reason}],
        "usage": usage if usage is not None else {
            "prompt_tokens": 120, "completion_tokens": 9, "total_tokens": 129},
    }).encode())


def tool_call(call_id: str, name: str, arguments: dict) -> dict:
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments)}}


@pytest.fixture(name="server")
def _server() -> Iterator[Loopback]:
    """A real HTTP server on 127.0.0.1 (a free port), stopped after the test."""
    state = Loopback()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length) or b"{}")
            state.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
            reply = state.replies.pop(0) if state.replies else Reply(b"{}", 500)
            if reply.delay:
                time.sleep(reply.delay)
            try:
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)
            except OSError:  # the client gave up (the timeout test)
                pass

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(name="key")
def _key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(KEY_ENV, KEY)
    return KEY


def served(url: str, **options: object) -> EndpointChatModel:
    return EndpointChatModel(url, "Qwen/Qwen2.5-Coder-0.5B-Instruct", api_key_env=KEY_ENV,
                             **options)  # type: ignore[arg-type]


def record_bodies(store, kind: str) -> list[dict]:
    return [record.body for record in store.records() if record.kind == kind]


class TestServedTurns:
    def test_tool_calls_run_through_the_gateway_and_results_pair_by_id(
            self, server, gateway, store, runner, key):
        """
        The tools go as `tools`, the key as Bearer; the server's tool_call runs through the
        gateway; its result goes back in the tool role with the call's id; the answer ends
        the run.
        """
        server.answer(completion({"content": None,
                                  "tool_calls": [tool_call("call_7", "add", {"a": 2, "b": 40})]},
                                 finish_reason="tool_calls"),
                      completion({"content": "2 + 40 is 42."}))

        with served(server.url) as model:
            run = Agent(gateway=gateway, model=model, principal="alice").run("What is 2 + 40?")

        assert ("answered", "2 + 40 is 42.") == (run.stop, run.answer)
        assert [("add", {"a": 2, "b": 40})] == [(c.name, c.arguments) for c in runner.calls]
        (headers, first), (_, second) = server.requests
        assert f"Bearer {key}" == headers["authorization"]
        assert ("Qwen/Qwen2.5-Coder-0.5B-Instruct", 0) == (first["model"], first["temperature"])
        assert ["add", "capital", "spin", "square"] == sorted(
            entry["function"]["name"] for entry in first["tools"])
        assistant, result = second["messages"][-2:]
        assert ("assistant", "call_7", "add") == (
            assistant["role"], assistant["tool_calls"][0]["id"],
            assistant["tool_calls"][0]["function"]["name"])
        assert ("tool", "call_7", 42) == (result["role"], result["tool_call_id"],
                                          json.loads(result["content"])["result"])

    def test_a_follow_up_turn_asks_the_server_for_a_required_call(
            self, server, gateway, store, runner, key):
        """
        A two-part question answered after one call: the follow-up request carries
        tool_choice "required" (the others do not), its model.turn says call_required, and
        the earlier prose answer is not sent back.
        """
        server.answer(
            completion({"content": None, "tool_calls": [
                tool_call("call_1", "square", {"x": 13})]}, finish_reason="tool_calls"),
            completion({"content": "13 squared is 169."}),
            completion({"content": None, "tool_calls": [
                tool_call("call_2", "capital", {"country": "France"})]},
                finish_reason="tool_calls"),
            completion({"content": "169, and Paris."}))

        with served(server.url) as model:
            run = Agent(gateway=gateway, model=model, principal="alice").run(
                "What is 13 squared, and what is the capital of France?")

        assert ("answered", "169, and Paris.") == (run.stop, run.answer)
        bodies = [body for _, body in server.requests]
        assert [None, None, "required", None] == [body.get("tool_choice") for body in bodies]
        assert "13 squared is 169." not in json.dumps(bodies[2]["messages"])
        assert [False, False, True, False] == [
            body.get("call_required", False) for body in record_bodies(store, "model.turn")]

    def test_model_turn_records_the_served_model(self, server, gateway, store, key):
        """
        model.turn: the endpoint, the model asked for and the one the server reports, no
        digest (and says so), the server's token counts, and the two hashes as defined.
        """
        server.answer(completion({"content": "Hello."}, model="qwen2.5-coder:0.5b"))

        with served(server.url) as model:
            Agent(gateway=gateway, model=model, principal="alice").run("Hi")

        (body,) = record_bodies(store, "model.turn")
        _, request = server.requests[0]
        message = {"role": "assistant", "content": "Hello."}
        assert {"id": "Qwen/Qwen2.5-Coder-0.5B-Instruct", "digest": None,
                "endpoint": server.url, "requested": "Qwen/Qwen2.5-Coder-0.5B-Instruct",
                "reported": "qwen2.5-coder:0.5b", "response_id": "chatcmpl-1",
                "finish_reason": "stop", "weights": "served: no digest",
                "usage": {"prompt_tokens": 120, "completion_tokens": 9, "total_tokens": 129},
                } == body["model"]
        assert {"prompt": 120, "output": 9} == body["tokens"]
        assert sha256_hex(canonical_bytes({"messages": request["messages"],
                                           "tools": request["tools"]})) == body["prompt_sha256"]
        assert sha256_hex(canonical_bytes(message)) == body["output_sha256"]

    def test_unreported_usage_is_recorded_as_unknown(self, server, gateway, store):
        """A server that reports no usage: the tokens are null, not a made-up zero."""
        server.answer(Reply(json.dumps({"object": "chat.completion", "choices": [
            {"message": {"role": "assistant", "content": "Hello."},
             "finish_reason": "stop"}]}).encode()))

        with EndpointChatModel(server.url, "m") as model:
            Agent(gateway=gateway, model=model, principal="alice").run("Hi")

        (body,) = record_bodies(store, "model.turn")
        assert ({"prompt": None, "output": None}, None, "no authorization") == (
            body["tokens"], body["model"]["reported"],
            server.requests[0][0].get("authorization", "no authorization"))

    def test_calls_in_the_text_are_read_and_paired(self, server, gateway, runner, key):
        """
        A server that leaves the call in the text (no tool parser): callward's parser
        reads it; the echoed assistant message states it as a tool_call with callward's
        id, and the result answers that id.
        """
        server.answer(completion({"content": '<tool_call>\n{"name": "square", '
                                             '"arguments": {"x": 12}}\n</tool_call>'}),
                      completion({"content": "12 squared is 144."}))

        with served(server.url) as model:
            run = Agent(gateway=gateway, model=model, principal="alice").run(
                "What is 12 squared?")

        assert ("answered", [("square", {"x": 12})]) == (
            run.stop, [(c.name, c.arguments) for c in runner.calls])
        assistant, result = server.requests[1][1]["messages"][-2:]
        stated = assistant["tool_calls"][0]
        assert (stated["id"], {"x": 12}) == (result["tool_call_id"],
                                             json.loads(stated["function"]["arguments"]))

    def test_a_cut_off_response_never_runs(self, server, gateway, store, runner, key):
        """
        finish_reason "length": the parser refuses the whole turn (call.rejected, nothing
        runs), the model hears it could not be read, and its next turn is taken.
        """
        server.answer(completion({"content": None, "tool_calls": [
            tool_call("call_1", "add", {"a": 2, "b": 40})]}, finish_reason="length"),
            completion({"content": "I could not finish."}))

        with served(server.url) as model:
            run = Agent(gateway=gateway, model=model, principal="alice").run("What is 2 + 40?")

        assert [] == runner.calls
        assert ("answered", "malformed") == (run.stop, run.steps[0].results[0].kind)
        (rejected,) = record_bodies(store, "call.rejected")
        assert "length" in rejected["message"]
        last = server.requests[1][1]["messages"][-1]  # no call to pair it with: a user turn
        assert ("user", "malformed") == (
            last["role"], json.loads(last["content"].removeprefix("Tool result: "))["status"])


@dataclass(frozen=True)
class Failure:
    name: str
    reply: Reply | None  # None: nothing listens on the port
    reason: str
    timeout: float = 10.0


FAILURES = [
    Failure("refused", None, "connection_failed"),
    Failure("500", Reply(b'{"error": "boom"}', 500), "http_status"),
    Failure("401 echoing the key", Reply(json.dumps(
        {"error": {"message": f"Incorrect API key provided: {KEY}"}}).encode(), 401),
        "http_status"),
    Failure("timeout", Reply(b"{}", 200, delay=3.0), "timeout", timeout=0.5),
    Failure("not JSON", Reply(b"<html>502 Bad Gateway</html>"), "malformed_response"),
    Failure("no choices", Reply(b'{"object": "chat.completion", "choices": []}'),
            "malformed_response"),
    Failure("content not a string", Reply(json.dumps({"choices": [
        {"message": {"role": "assistant", "content": 42}, "finish_reason": "stop"}]}).encode()),
        "malformed_response"),
    Failure("usage not counts", Reply(json.dumps({"choices": [
        {"message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": "many"}}).encode()), "malformed_response"),
    Failure("empty answer", Reply(json.dumps({"choices": [
        {"message": {"role": "assistant", "content": ""}, "finish_reason": "stop"}]}).encode()),
        "malformed_response"),
    Failure("a list", Reply(b"[]"), "malformed_response"),
]


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


class TestFailures:
    @pytest.mark.parametrize("failure", FAILURES, ids=[f.name for f in FAILURES])
    def test_a_failed_turn_is_an_audited_error_never_an_empty_answer(
            self, failure, server, gateway, store, key, tmp_path, capfd):
        """
        Each way a server can fail raises ModelEndpointFailed with its reason, after a
        model.failed record; the key is in no record, log line or message.
        """
        url = server.url if failure.reply is not None else closed_port_url()
        if failure.reply is not None:
            server.answer(failure.reply)

        with (served(url, timeout_seconds=failure.timeout) as model,
              pytest.raises(ModelEndpointFailed) as raised):
            Agent(gateway=gateway, model=model, principal="alice").run("What is 2 + 40?")

        (failed,) = record_bodies(store, "model.failed")
        assert (failure.reason, "model_unavailable", url.rstrip("/")) == (
            raised.value.reason, raised.value.kind, raised.value.endpoint)
        assert (failed["reason"], failed["kind"], failed["endpoint"]) == (
            failure.reason, "model_unavailable", url)
        assert ["model.failed"] == kinds(store)
        if failure.reason == "http_status":
            assert failed["status"] == failure.reply.status  # type: ignore[union-attr]
        store.close()
        logs = capfd.readouterr()
        assert KEY.encode() not in (tmp_path / "audit.db").read_bytes()
        assert KEY not in logs.out + logs.err + raised.value.diagnostics()

    def test_a_missing_key_variable_is_refused_before_sending(self, server, gateway, store,
                                                              monkeypatch):
        """api_key_env names a variable that is not set: nothing is sent, the turn fails."""
        monkeypatch.delenv(KEY_ENV, raising=False)

        with served(server.url) as model, pytest.raises(ModelEndpointFailed) as raised:
            Agent(gateway=gateway, model=model, principal="alice").run("Hi")

        assert ("no_api_key", [], ["model.failed"]) == (
            raised.value.reason, server.requests, kinds(store))

    def test_a_redirect_is_not_followed(self, server, gateway, key):
        """A 3xx is an error: the key is never carried to where a redirect points."""
        server.answer(Reply(b"", 307))

        with served(server.url) as model, pytest.raises(ModelEndpointFailed) as raised:
            model.generate([ChatMessage("user", "Hi")], [])

        assert ("http_status", 307, 1) == (raised.value.reason, raised.value.status,
                                           len(server.requests))


class TestEndpointSettings:
    def write(self, directory: Path, examples: Path, section: str) -> Path:
        config = directory / "callward.yaml"
        config.write_text(f"tools: [{examples / 'tools.py'}]\n"
                          f"policy: {examples / 'policy.yaml'}\n{section}")
        return config

    def test_the_endpoint_section_is_read(self, tmp_path, examples):
        """model.endpoint, name, api_key_env and timeout_seconds are read as given."""
        config = self.write(tmp_path, examples, (
            "model: {endpoint: 'http://127.0.0.1:8000/v1/', name: Qwen/Qwen2.5-Coder-0.5B-"
            "Instruct, api_key_env: OPENAI_API_KEY, timeout_seconds: 30}\n"))

        settings = load_config(config).model

        assert settings is not None
        assert ("http://127.0.0.1:8000/v1", "Qwen/Qwen2.5-Coder-0.5B-Instruct",
                "OPENAI_API_KEY", 30, None) == (
            settings.endpoint, settings.name, settings.api_key_env, settings.timeout_seconds,
            settings.directory)

    @pytest.mark.parametrize(("section", "match"), [
        ("{endpoint: 'http://127.0.0.1:8000/v1'}", "name"),
        ("{name: m}", "endpoint"),
        ("{endpoint: 'http://127.0.0.1:8000/v1', name: m, directory: x}", "model"),
        ("{endpoint: 'ftp://127.0.0.1/v1', name: m}", "model"),
        ("{endpoint: 'http://user:secret@127.0.0.1:8000/v1', name: m}", "credentials"),
        ("{endpoint: 'http://127.0.0.1:8000/v1?key=x', name: m}", "query"),
        ("{endpoint: 'http://models.example.com/v1', name: m, api_key_env: K}", "https"),
        ("{endpoint: 'http://127.0.0.1:8000/v1', name: m, api_key_env: 'A-B'}", "model"),
        ("{endpoint: 'http://127.0.0.1:8000/v1', name: m, timeout_seconds: 0}", "model"),
    ])
    def test_an_unsafe_or_incomplete_endpoint_is_refused(self, tmp_path, examples, section,
                                                         match):
        """No name, a directory beside it, credentials, a query, a key over plain http."""
        config = self.write(tmp_path, examples, f"model: {section}\n")

        with pytest.raises(ConfigurationError, match=match):
            load_config(config)

    def test_https_to_another_host_may_carry_a_key(self, tmp_path, examples):
        config = self.write(tmp_path, examples, (
            "model: {endpoint: 'https://models.example.com/v1', name: m, api_key_env: K}\n"))

        assert "https://models.example.com/v1" == load_config(config).model.endpoint  # type: ignore[union-attr]


class TestAgentCommand:
    @pytest.mark.timeout(300)
    def test_agent_uses_the_configured_endpoint(self, server, tmp_path, examples):
        """`callward agent` with model.endpoint asks that server; the key is not printed."""
        server.answer(completion({"content": "Hello there."}))
        config = tmp_path / "callward.yaml"
        config.write_text(f"tools: [{examples / 'tools.py'}]\n"
                          f"policy: {examples / 'policy.yaml'}\n"
                          f"model: {{endpoint: '{server.url}', name: served-m, "
                          f"api_key_env: {KEY_ENV}}}\n")

        done = subprocess.run(
            [sys.executable, "-m", "callward.core.cli", "--home", str(tmp_path / "home"),
             "agent", "Hi", "--config", str(config), "--max-steps", "1"],
            capture_output=True, text=True, timeout=300, check=False,
            env={**os.environ, KEY_ENV: KEY})

        report = json.loads(done.stdout)
        assert ("Hello there.", {"id": "served-m", "digest": None, "endpoint": server.url}) == (
            report["answer"], report["model"])
        assert f"Bearer {KEY}" == server.requests[0][0]["authorization"]
        assert KEY not in done.stdout + done.stderr
        assert KEY.encode() not in (tmp_path / "home" / "audit.db").read_bytes()
