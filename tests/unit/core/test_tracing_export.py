"""
A real OTLP/HTTP export: the SDK's batch processor and the standard protobuf exporter,
as ``observability.otlp_endpoint`` configures them, post to a receiver on loopback that
decodes each body as an ``ExportTraceServiceRequest``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from callward.core import ToolCall
from callward.core.gateway import Gateway
from callward.core.observe import configure_tracing


class OtlpReceiver(ThreadingHTTPServer):
    """Collects what is posted to /v1/traces: (path, content type, decoded request)."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.received: list[tuple[str, str, ExportTraceServiceRequest]] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: OtlpReceiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        self.server.received.append((self.path, self.headers["Content-Type"], request))
        answer = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: object) -> None:
        return


@pytest.fixture(name="receiver")
def _receiver() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    thread = threading.Thread(target=receiver.serve_forever, daemon=True)
    thread.start()
    yield receiver
    receiver.shutdown()
    receiver.server_close()
    thread.join(10)


def value_of(value: AnyValue) -> object:
    field = value.WhichOneof("value")
    if field == "array_value":
        return tuple(value_of(item) for item in value.array_value.values)
    return getattr(value, field) if field else None


class TestOtlpExport:
    def test_spans_arrive_over_otlp_http_with_their_attributes(
            self, receiver, registry, policy, runner, store):
        """
        A call's spans reach the collector as protobuf at /v1/traces, with the service
        name, the tool span's GenAI attributes and the completed record's seq and hash.
        """
        tracing = configure_tracing(receiver.endpoint, service_name="callward-otlp-test")
        gateway = Gateway(registry=registry, policy=policy, runner=runner, audit=store,
                          tracing=tracing)
        call = ToolCall.create(id="c1", name="square", arguments={"x": 9}, dialect="api")
        try:
            gateway.handle(call, principal="alice")
            tracing.force_flush()
        finally:
            tracing.shutdown()

        paths = {(path, content_type) for path, content_type, _ in receiver.received}
        resource_spans = [rs for _, _, request in receiver.received
                          for rs in request.resource_spans]
        services = {value_of(attribute.value) for rs in resource_spans
                    for attribute in rs.resource.attributes if attribute.key == "service.name"}
        spans = {span.name: {a.key: value_of(a.value) for a in span.attributes}
                 for rs in resource_spans for scope in rs.scope_spans for span in scope.spans}
        completed = store.last()
        assert {("/v1/traces", "application/x-protobuf")} == paths
        assert {"callward-otlp-test"} == services
        assert {"execute_tool square", "callward.policy", "callward.audit.authorized",
                "callward.sandbox", "callward.audit.completed"} == set(spans)
        assert {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "square",
                "gen_ai.tool.call.id": "c1", "callward.result.kind": "ok",
                "callward.audit.seq": completed.seq,
                "callward.audit.record_hash": completed.record_hash,
                } == {key: spans["execute_tool square"][key]
                      for key in ("gen_ai.operation.name", "gen_ai.tool.name",
                                  "gen_ai.tool.call.id", "callward.result.kind",
                                  "callward.audit.seq", "callward.audit.record_hash")}

    def test_the_configuration_section_exports_to_its_endpoint(self, receiver, examples,
                                                               tmp_path):
        """
        ``observability.otlp_endpoint`` in callward.yaml: the gateway it builds exports
        its spans there under the configured service name, flushed when it closes.
        """
        config = tmp_path / "callward.yaml"
        config.write_text(
            f"tools: [{examples / 'tools.py'}]\npolicy: {examples / 'policy.yaml'}\n"
            "anomalies: {enabled: false}\n"
            f"observability: {{otlp_endpoint: '{receiver.endpoint}', service_name: cw-conf}}\n",
            encoding="utf-8")

        with Gateway.from_config(config, home=tmp_path / "home",
                                 unsafe_skip_probes=True) as gateway:
            receipt = gateway.record("test.traced", {"n": 1})

        resource_spans = [rs for _, _, request in receiver.received
                          for rs in request.resource_spans]
        spans = [(span.name, {a.key: value_of(a.value) for a in span.attributes})
                 for rs in resource_spans for scope in rs.scope_spans for span in scope.spans]
        services = {value_of(attribute.value) for rs in resource_spans
                    for attribute in rs.resource.attributes if attribute.key == "service.name"}
        assert {"cw-conf"} == services
        assert [("callward.audit.record", "test.traced", receipt.seq)] == [
            (name, attributes["callward.audit.kind"], attributes["callward.audit.seq"])
            for name, attributes in spans]

    def test_a_collector_that_is_down_does_not_fail_the_call(self, registry, policy, runner,
                                                            store):
        """Nothing listens: the call ends ok and both records are written."""
        tracing = configure_tracing("http://127.0.0.1:9", service_name="nowhere",
                                    export_timeout_seconds=0.5)
        gateway = Gateway(registry=registry, policy=policy, runner=runner, audit=store,
                          tracing=tracing)
        call = ToolCall.create(id="c1", name="square", arguments={"x": 9}, dialect="api")
        try:
            result = gateway.handle(call, principal="alice")
        finally:
            tracing.shutdown()

        assert ("ok", "call.completed") == (result.kind, store.last().kind)
