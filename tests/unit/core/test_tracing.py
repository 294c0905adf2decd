"""
OpenTelemetry traces of the gateway's calls: the span tree, its attributes, the records
that name their spans (and the spans their records), and no argument or result value in
any span. The SDK's in-memory exporter, handed to the gateway's own ``Tracing`` (no
global provider is installed); a real signed SQLite log; tools run in a StubRunner.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from callward.audit import verify, verify_receipt
from callward.core import (
    AuditUnavailable,
    ConfigurationError,
    ToolCall,
    ToolRegistry,
    canonical_bytes,
    tool,
)
from callward.core.gateway import Gateway
from callward.core.gateway._config import TracingSettings, load_config
from callward.core.observe import Tracing, configure_tracing
from callward.core.observe._tracing import annotate_turn, continued_context, otlp_traces_url
from callward.core.plans import parse_plan, run_plan
from callward.core.testing import (
    StubFailingAuditLog,
    StubRunner,
    computed,
    failed_execution,
    kinds,
    ok_execution,
)
from callward.policies import Policy

#: A value no span may ever hold: it travels as an argument and comes back as a result.
SENTINEL = "sentinel-7f3a9c-do-not-trace"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@tool(version="1.0.0", parameters={"type": "object", "properties": {"text": {"type": "string"}},
                                   "required": ["text"], "additionalProperties": False})
def echo(text: str) -> str:
    return text


@tool(version="1.0.0", parameters={"type": "object", "properties": {"text": {"type": "string"}},
                                   "required": ["text"], "additionalProperties": False})
def shout(text: str) -> str:
    return text.upper()


ECHO_POLICY = """
version: 1
default: deny
rules:
  - {id: anyone-echoes, effect: allow, principals: ["*"], tools: [echo, shout]}
"""


@pytest.fixture(name="traced")
def _traced(registry, policy, runner, store, tracing) -> Callable[..., Gateway]:  # type: ignore[no-untyped-def]
    """Build a gateway like ``make_gateway``, with tracing on."""

    def make(*, registry_: ToolRegistry | None = None, policy_: Policy | None = None,
             runner_: StubRunner | None = None) -> Gateway:
        counter = itertools.count(1)
        return Gateway(registry=registry if registry_ is None else registry_,
                       policy=policy if policy_ is None else policy_,
                       runner=runner if runner_ is None else runner_, audit=store,
                       new_id=lambda: f"gen_{next(counter)}", tracing=tracing)

    return make


def by_name(spans: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    return {span.name: span for span in spans.get_finished_spans()}


def children_of(spans: InMemorySpanExporter, parent: ReadableSpan) -> list[str]:
    """The names of ``parent``'s children, in the order they started."""
    found = [span for span in spans.get_finished_spans()
             if span.parent is not None and span.parent.span_id == parent.context.span_id]
    return [span.name for span in sorted(found, key=lambda span: span.start_time or 0)]


def ids_of(span: ReadableSpan) -> dict[str, str]:
    return {"trace_id": trace.format_trace_id(span.context.trace_id),
            "span_id": trace.format_span_id(span.context.span_id)}


def attributes_of(span: ReadableSpan) -> dict[str, object]:
    return dict(span.attributes or {})


class TestSpanTree:
    def test_an_allowed_call_is_one_tool_span_with_a_child_per_stage(self, traced, spans):
        """
        ``execute_tool square`` holds, in order: the policy, the authorized record, the
        sandbox run and the completed record; all in one trace, the tool span its root.
        """
        gateway = traced()
        call = ToolCall.create(id="c1", name="square", arguments={"x": 7}, dialect="api")

        gateway.handle(call, principal="alice")

        named = by_name(spans)
        root = named["execute_tool square"]
        assert root.parent is None
        assert (["callward.policy", "callward.audit.authorized", "callward.sandbox",
                 "callward.audit.completed"] == children_of(spans, root))
        assert {root.context.trace_id} == {span.context.trace_id
                                           for span in spans.get_finished_spans()}

    def test_the_tool_span_follows_the_gen_ai_conventions_and_names_the_outcome(
            self, traced, spans, store):
        """
        The tool span carries the GenAI operation, tool name and call id, the decision's
        effect and rule ids, the result kind, and the final record's seq and hash.
        """
        gateway = traced()
        call = ToolCall.create(id="c1", name="square", arguments={"x": 7}, dialect="api")

        result = gateway.handle(call, principal="alice")

        completed = store.last()
        attributes = attributes_of(by_name(spans)["execute_tool square"])
        expected = {
            "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "square",
            "gen_ai.tool.call.id": "c1", "callward.decision.effect": "allow",
            "callward.decision.rules": ("schema.square", "analysts-use-calculators"),
            "callward.result.kind": "ok", "callward.audit.seq": completed.seq,
            "callward.audit.record_hash": completed.record_hash,
        }
        assert expected == {key: attributes[key] for key in expected}
        assert result.receipt.seq == completed.seq

    def test_a_denied_call_ends_at_its_denied_record_with_an_error_status(
            self, traced, spans, runner, store):
        """
        mallory may not drop tables: the tool span holds the policy and the denied
        record only, says why (kind, rule), and its status is an error; nothing ran.
        """
        gateway = traced()
        call = ToolCall.create(id="c1", name="drop_table", arguments={"table": "t"},
                               dialect="api")

        gateway.handle(call, principal="mallory")

        root = by_name(spans)["execute_tool drop_table"]
        attributes = attributes_of(root)
        assert ["callward.policy", "callward.audit.denied"] == children_of(spans, root)
        assert (StatusCode.ERROR, "permission") == (root.status.status_code,
                                                    attributes["error.type"])
        assert ("deny", "permission", store.last().seq) == (
            attributes["callward.decision.effect"], attributes["callward.decision.kind"],
            attributes["callward.audit.seq"])
        assert "guests-never-destroy" in attributes["callward.decision.rules"]  # type: ignore[operator]
        assert [] == runner.calls

    def test_a_failed_tool_marks_the_sandbox_and_tool_spans(self, traced, spans):
        """A tool that raised ends as tool_error: both its run and its call span say so."""
        gateway = traced(runner_=StubRunner(failed_execution("tool_error")))
        call = ToolCall.create(id="c1", name="square", arguments={"x": 7}, dialect="api")

        gateway.handle(call, principal="alice")

        named = by_name(spans)
        assert [("tool_error", StatusCode.ERROR)] * 2 == [
            (attributes_of(named[name])["callward.result.kind"], named[name].status.status_code)
            for name in ("callward.sandbox", "execute_tool square")]

    def test_a_malformed_message_is_a_parse_span_with_its_rejected_record(
            self, traced, spans, store):
        """Text that is no call: a parse span in error, the rejected record written in it."""
        gateway = traced()

        gateway.handle_text('{"name": "square", "arguments": {"x": ', principal="alice")

        parse = by_name(spans)["callward.parse"]
        assert ["callward.audit.rejected"] == children_of(spans, parse)
        assert ("malformed", StatusCode.ERROR) == (attributes_of(parse)["error.type"],
                                                   parse.status.status_code)
        assert "call.rejected" == store.last().kind

    def test_a_failed_audit_write_ends_the_spans_in_error(self, registry, policy, runner,
                                                           store, tracing, spans):
        """
        call.authorized cannot be written: AuditUnavailable leaves the record's span and
        the tool span in error (its kind, not its message), and nothing ran.
        """
        gateway = Gateway(registry=registry, policy=policy, runner=runner, tracing=tracing,
                          audit=StubFailingAuditLog(store, fail_kinds=("call.authorized",)))
        call = ToolCall.create(id="c1", name="square", arguments={"x": 7}, dialect="api")

        with pytest.raises(AuditUnavailable):
            gateway.handle(call, principal="alice")

        named = by_name(spans)
        assert [("audit_unavailable", StatusCode.ERROR)] * 2 == [
            (attributes_of(named[name])["error.type"], named[name].status.status_code)
            for name in ("callward.audit.authorized", "execute_tool square")]
        assert "disk" not in str(named["execute_tool square"].status.description)
        assert [] == runner.calls

    def test_an_awaited_run_has_the_same_tree(self, traced, spans):
        """``handle_awaiting`` (an upstream MCP tool's path) makes the same spans."""
        gateway = traced()
        call = ToolCall.create(id="c1", name="square", arguments={"x": 7}, dialect="api")

        async def run(spec, call, limits):  # type: ignore[no-untyped-def]
            return ok_execution(49)

        result = anyio.run(lambda: gateway.handle_awaiting(call, principal="alice", run=run))

        root = by_name(spans)["execute_tool square"]
        assert 49 == result.content
        assert (["callward.policy", "callward.audit.authorized", "callward.sandbox",
                 "callward.audit.completed"] == children_of(spans, root))

    def test_a_plan_run_is_one_trace_whichever_thread_runs_a_step(self, traced, spans):
        """
        A plan's steps run on worker threads; their tool spans are still children of the
        ``callward.plan`` span, beside the spans of plan.started and plan.completed.
        """
        registry = ToolRegistry()
        registry.register(echo)
        registry.register(shout)
        gateway = traced(registry_=registry, policy_=Policy.from_text(ECHO_POLICY),
                         runner_=StubRunner(tools={"echo": computed(echo),
                                                   "shout": computed(shout)}))
        plan = parse_plan("""
version: 1
name: two
steps:
  - {id: a, tool: echo, arguments: {text: hi}}
  - {id: b, tool: shout, arguments: {text: {$ref: "steps.a.output"}}}
""", source="test")

        report = run_plan(gateway, plan, principal="anyone")

        root = by_name(spans)["callward.plan two"]
        assert report.ok
        assert (["callward.audit.record", "execute_tool echo", "execute_tool shout",
                 "callward.audit.record"] == children_of(spans, root))


class TestRecordsAndSpans:
    def test_each_record_names_the_span_it_was_written_in_and_back(self, traced, spans, store):
        """
        call.authorized and call.completed carry the trace and span ids of the spans
        they were written in; those spans carry the records' seq and hash.
        """
        gateway = traced()
        call = ToolCall.create(id="c1", name="square", arguments={"x": 7}, dialect="api")

        gateway.handle(call, principal="alice")

        named = by_name(spans)
        for record, span_name in zip(store.records(), ("callward.audit.authorized",
                                                       "callward.audit.completed"), strict=True):
            span = named[span_name]
            assert ids_of(span) == record.body["trace"]
            assert (record.seq, record.record_hash, record.kind) == (
                attributes_of(span)["callward.audit.seq"],
                attributes_of(span)["callward.audit.record_hash"],
                attributes_of(span)["callward.audit.kind"])

    def test_a_denied_record_names_its_span(self, traced, spans, store):
        """call.denied carries the ids of callward.audit.denied."""
        gateway = traced()
        call = ToolCall.create(id="c1", name="drop_table", arguments={"table": "t"},
                               dialect="api")

        gateway.handle(call, principal="mallory")

        assert ids_of(by_name(spans)["callward.audit.denied"]) == store.last().body["trace"]

    def test_traced_records_still_verify_and_their_receipts_too(
            self, traced, store, signer, tmp_path):
        """The trace ids are part of the signed body: the log and receipts verify."""
        gateway = traced()
        results = [gateway.handle(ToolCall.create(id=f"c{x}", name="square",
                                                  arguments={"x": x}, dialect="api"),
                                  principal="alice") for x in range(3)]

        verified = verify(tmp_path / "audit.db", signer.public_key())
        receipt = verify_receipt(results[-1].to_json()["receipt"], [signer.public_key()])

        assert 6 == verified.records
        assert results[-1].receipt.seq == receipt.seq
        assert all("trace" in record.body for record in store.records())

    def test_with_tracing_off_records_are_unchanged(self, make_gateway, store):
        """No provider: no ``trace`` field, and no span is made."""
        gateway = make_gateway()
        call = ToolCall.create(id="c1", name="square", arguments={"x": 7}, dialect="api")

        gateway.handle(call, principal="alice")

        assert (False, ["call.authorized", "call.completed"]) == (
            gateway.tracing.enabled, kinds(store))
        assert not any("trace" in record.body for record in store.records())

    def test_off_is_one_shared_no_op(self):
        """Off, a span is the one shared non-recording context manager; no fields."""
        tracing = Tracing()

        with tracing.span("a") as first, tracing.span("b") as second:
            recording = (first.is_recording(), second.is_recording())

        assert (False, False) == recording
        assert tracing.span("a") is tracing.span("b")
        assert {} == tracing.record_fields()


class TestNoValuesInSpans:
    def test_no_argument_or_result_value_reaches_any_span(self, traced, spans, store):
        """
        A unique string sent as an argument comes back as the result and sits in the
        signed records; in no span's name, attribute or event is it found.
        """
        registry = ToolRegistry()
        registry.register(echo)
        gateway = traced(registry_=registry, policy_=Policy.from_text(ECHO_POLICY),
                         runner_=StubRunner(computed(echo)))
        allowed = ToolCall.create(id="c1", name="echo", arguments={"text": SENTINEL},
                                  dialect="api")
        failing = ToolCall.create(id="c2", name="echo", arguments={"text": SENTINEL},
                                  dialect="api")

        result = gateway.handle(allowed, principal="anyone")
        gateway.handle_text('{"name": "echo", "arguments": {"text": "' + SENTINEL + '"',
                            principal="anyone")
        traced(registry_=registry, policy_=Policy.from_text(ECHO_POLICY),
               runner_=StubRunner(failed_execution("tool_error", f"raised {SENTINEL}"))
               ).handle(failing, principal="anyone")

        assert SENTINEL == result.content
        assert SENTINEL in b"".join(record.body_json for record in store.records()).decode()
        exported = [json.loads(span.to_json()) for span in spans.get_finished_spans()]
        assert len(exported) >= 10
        assert SENTINEL not in json.dumps(exported)
        assert SENTINEL.upper() not in json.dumps(exported)


class TestModelTurn:
    def test_a_served_turn_names_the_server_and_the_model_it_reports(self, tracing, spans):
        """
        A served model's turn: provider openai (the API it speaks), the model the server
        reports, its address, the usage it reported; a server that reported no usage
        leaves the token counts out rather than claiming zero.
        """
        served = {"endpoint": "http://127.0.0.1:8000/v1", "reported": "qwen2.5-7b",
                  "usage": {"prompt_tokens": 12, "completion_tokens": 3}}
        with tracing.chat_span("qwen", 1) as span:
            annotate_turn(span, model_id="qwen", input_tokens=12, output_tokens=3,
                          served=served)
        with tracing.chat_span("qwen", 2) as span:
            annotate_turn(span, model_id="qwen", input_tokens=0, output_tokens=0,
                          served={**served, "usage": None})

        first, second = (attributes_of(span) for span in spans.get_finished_spans())
        assert {"gen_ai.operation.name": "chat", "gen_ai.request.model": "qwen",
                "callward.agent.turn": 1, "gen_ai.provider.name": "openai",
                "gen_ai.system": "openai", "gen_ai.response.model": "qwen2.5-7b",
                "server.address": "127.0.0.1", "server.port": 8000,
                "gen_ai.usage.input_tokens": 12, "gen_ai.usage.output_tokens": 3} == first
        assert "gen_ai.usage.input_tokens" not in second


class TestContinuation:
    def test_a_traceparent_is_continued_from_the_first_carrier_that_has_one(self):
        """_meta first, then headers; an invalid traceparent is skipped."""
        bad = {"traceparent": "00-" + "0" * 32 + "-" + "0" * 16 + "-01"}
        context = continued_context(None, bad, {"traceparent": TRACEPARENT})

        assert context is not None
        span_context = trace.get_current_span(context).get_span_context()
        assert ("0af7651916cd43dd8448eb211c80319c", True) == (
            trace.format_trace_id(span_context.trace_id), span_context.is_remote)
        assert continued_context(None, bad, {}) is None


class TestConfiguration:
    def config_with(self, tmp_path: Path, examples: Path, section: str) -> Path:
        path = tmp_path / "callward.yaml"
        path.write_text(f"tools: [{examples / 'tools.py'}]\npolicy: {examples / 'policy.yaml'}\n"
                        + section, encoding="utf-8")
        return path

    def test_the_observability_section(self, tmp_path, examples):
        """An endpoint and a service name; without the section, no tracing."""
        given = load_config(self.config_with(
            tmp_path, examples,
            "observability: {otlp_endpoint: 'http://127.0.0.1:4318', service_name: cw}\n"))
        absent = load_config(self.config_with(tmp_path, examples, ""))

        assert TracingSettings("http://127.0.0.1:4318", "cw") == given.tracing
        assert absent.tracing is None

    @pytest.mark.parametrize("section", [
        "observability: {otlp_endpoint: 'ftp://collector:4318'}\n",
        "observability: {otlp_endpoint: 'collector:4318'}\n",
        "observability: {otlp_endpoint: 'http://c:4318', headers: {a: b}}\n",
        "observability: {otlp_endpoint: 'http://c:4318', service_name: ''}\n",
    ])
    def test_a_bad_section_is_refused(self, tmp_path, examples, section):
        """A non-http(s) endpoint, an unknown key or an empty name: a configuration error."""
        with pytest.raises(ConfigurationError):
            load_config(self.config_with(tmp_path, examples, section))

    @pytest.mark.parametrize(("endpoint", "url"), [
        ("http://127.0.0.1:4318", "http://127.0.0.1:4318/v1/traces"),
        ("http://127.0.0.1:4318/", "http://127.0.0.1:4318/v1/traces"),
        ("https://otel.example/custom/path", "https://otel.example/custom/path"),
    ])
    def test_the_traces_path_is_added_to_a_bare_endpoint(self, endpoint, url):
        """As OTEL_EXPORTER_OTLP_ENDPOINT is read: a bare endpoint gets /v1/traces."""
        assert url == otlp_traces_url(endpoint)

    def test_an_exporter_or_an_endpoint_not_both(self):
        """configure_tracing takes exactly one destination."""
        with pytest.raises(ValueError, match="either"):
            configure_tracing()
        with pytest.raises(ValueError, match="either"):
            configure_tracing("http://127.0.0.1:4318", exporter=InMemorySpanExporter())


def test_canonical_bytes_of_a_trace_field_are_plain_hex() -> None:
    """The record field is two lowercase hex strings (32 and 16 digits)."""
    tracing = configure_tracing(exporter=InMemorySpanExporter())
    try:
        with tracing.span("x"):
            fields = tracing.record_fields()
    finally:
        tracing.shutdown()

    value = json.loads(canonical_bytes(fields))["trace"]
    assert (32, 16) == (len(value["trace_id"]), len(value["span_id"]))
    assert all(c in "0123456789abcdef" for c in value["trace_id"] + value["span_id"])
