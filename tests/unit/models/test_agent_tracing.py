"""
An agent run is one trace: ``invoke_agent``, each turn's ``chat`` span (GenAI semantic
conventions: operation, provider, models, token usage), the parse of its output, its
calls' ``execute_tool`` spans, and the span its ``model.turn`` record is written in.
The SDK's in-memory exporter handed to the gateway's own ``Tracing``; canned model turns.
"""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from callward.core.agent._loop import Agent
from callward.core.gateway import Gateway

ADD = '{"name": "add", "arguments": {"a": 2, "b": 40}}'


@pytest.fixture(name="traced_gateway")
def _traced_gateway(registry, policy, runner, store, tracing) -> Gateway:  # type: ignore[no-untyped-def]
    return Gateway(registry=registry, policy=policy, runner=runner, audit=store,
                   tracing=tracing)


def children_of(spans: InMemorySpanExporter, parent: ReadableSpan) -> list[str]:
    found = [span for span in spans.get_finished_spans()
             if span.parent is not None and span.parent.span_id == parent.context.span_id]
    return [span.name for span in sorted(found, key=lambda span: span.start_time or 0)]


class TestAgentTrace:
    def test_a_run_is_one_trace_from_model_turn_to_tool_call(
            self, stub_model, traced_gateway, spans):
        """
        invoke_agent holds, per turn: the chat span, the parse, the calls, and the
        model.turn record's span; the tool span holds its stages.
        """
        model = stub_model([ADD, "2 + 40 is 42."])

        Agent(gateway=traced_gateway, model=model, principal="alice").run("What is 2 + 40?")

        finished = spans.get_finished_spans()
        root = next(span for span in finished if span.name == "invoke_agent callward")
        tool = next(span for span in finished if span.name == "execute_tool add")
        assert root.parent is None
        assert ["chat stub", "callward.parse", "execute_tool add", "callward.audit.record",
                "chat stub", "callward.parse", "callward.audit.record"] == children_of(spans,
                                                                                      root)
        assert (["callward.policy", "callward.audit.authorized", "callward.sandbox",
                 "callward.audit.completed"] == children_of(spans, tool))
        assert {root.context.trace_id} == {span.context.trace_id for span in finished}

    def test_the_chat_span_follows_the_gen_ai_conventions(self, stub_model, traced_gateway,
                                                          spans):
        """Operation chat, the provider, request and response model, tokens in and out."""
        model = stub_model(["No tool needed."])

        run = Agent(gateway=traced_gateway, model=model, principal="alice").run("Hi")

        chat = next(span for span in spans.get_finished_spans() if span.name == "chat stub")
        root = next(span for span in spans.get_finished_spans()
                    if span.name == "invoke_agent callward")
        attributes = dict(chat.attributes or {})
        assert {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "transformers",
                "gen_ai.system": "transformers", "gen_ai.request.model": "stub",
                "gen_ai.response.model": "stub", "gen_ai.usage.input_tokens": 10,
                "gen_ai.usage.output_tokens": 5, "callward.agent.turn": 1} == attributes
        assert ("invoke_agent", run.run_id, "answered") == (
            (root.attributes or {})["gen_ai.operation.name"],
            (root.attributes or {})["gen_ai.conversation.id"],
            (root.attributes or {})["callward.agent.stop"])

    def test_the_model_turn_record_names_its_span(self, stub_model, traced_gateway, spans,
                                                  store):
        """model.turn carries the ids of the span it was written in, which holds its seq."""
        model = stub_model(["No tool needed."])

        Agent(gateway=traced_gateway, model=model, principal="alice").run("Hi")

        record = store.last()
        span = next(span for span in spans.get_finished_spans()
                    if span.name == "callward.audit.record")
        assert "model.turn" == record.kind
        assert {"trace_id": trace.format_trace_id(span.context.trace_id),
                "span_id": trace.format_span_id(span.context.span_id)} == record.body["trace"]
        assert (record.seq, record.record_hash) == (
            (span.attributes or {})["callward.audit.seq"],
            (span.attributes or {})["callward.audit.record_hash"])
