"""
The MCP HTTP face continues a client's W3C trace: a ``traceparent`` in the HTTP headers,
or in the request's ``_meta`` (which wins), becomes the parent of the ``tools/call``
server span, under which the call's spans and records sit. A real uvicorn server on
loopback, the SDK's own client, a real signed log, the SDK's in-memory span exporter.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from callward.core.gateway import Gateway
from callward.core.mcp._server import McpFace, http_app
from tests.unit.mcp._serving import serving

HEADER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
HEADER_PARENT = "00f067aa0ba902b7"
META_TRACE = "0af7651916cd43dd8448eb211c80319c"
META_PARENT = "b7ad6b7169203331"


@pytest.fixture(name="url")
def _url(registry, policy, runner, store, tracing) -> Iterator[str]:  # type: ignore[no-untyped-def]
    counter = itertools.count(1)
    gateway = Gateway(registry=registry, policy=policy, runner=runner, audit=store,
                      new_id=lambda: f"gen_{next(counter)}", tracing=tracing)
    with serving(http_app(McpFace(gateway, principal="alice"), host="127.0.0.1")) as url:
        yield url


async def call_square(url: str, *, meta: dict[str, Any] | None = None) -> str:
    headers = {"traceparent": f"00-{HEADER_TRACE}-{HEADER_PARENT}-01"}
    async with httpx2.AsyncClient(headers=headers, timeout=60) as http, Client(
            streamable_http_client(url, http_client=http)) as client:
        result = await client.call_tool("square", {"x": 3}, meta=meta)  # type: ignore[arg-type]
    kind: str = result.structured_content["kind"]  # type: ignore[index]
    return kind


def the(spans: InMemorySpanExporter, name: str) -> ReadableSpan:
    return next(span for span in spans.get_finished_spans() if span.name == name)


class TestTraceContinued:
    def test_a_traceparent_header_is_continued_through_the_call(self, url, spans, store):
        """
        The server span's parent is the client's span; the tool span is its child; the
        records of the call are in the client's trace.
        """
        kind = anyio.run(call_square, url)

        server = the(spans, "tools/call square")
        tool = the(spans, "execute_tool square")
        assert "ok" == kind
        assert (SpanKind.SERVER, HEADER_TRACE, HEADER_PARENT) == (
            server.kind, trace.format_trace_id(server.context.trace_id),
            trace.format_span_id(server.parent.span_id) if server.parent else None)
        assert tool.parent is not None
        assert server.context.span_id == tool.parent.span_id
        assert {HEADER_TRACE} == {record.body["trace"]["trace_id"]
                                  for record in store.records()}

    def test_a_traceparent_in_meta_is_preferred(self, url, spans, store):
        """A client that passes the trace in ``_meta`` (SEP-414) is continued from it."""
        meta = {"traceparent": f"00-{META_TRACE}-{META_PARENT}-01"}

        anyio.run(lambda: call_square(url, meta=meta))

        server = the(spans, "tools/call square")
        assert (META_TRACE, META_PARENT) == (
            trace.format_trace_id(server.context.trace_id),
            trace.format_span_id(server.parent.span_id) if server.parent else None)
        assert {META_TRACE} == {record.body["trace"]["trace_id"] for record in store.records()}


def test_no_traceparent_starts_a_trace_of_its_own(registry, policy, runner, store, spans,  # type: ignore[no-untyped-def]
                                                 tracing):
    """Without a traceparent the server span is the root of a new trace."""
    gateway = Gateway(registry=registry, policy=policy, runner=runner, audit=store,
                      tracing=tracing)

    async def plain(url: str) -> None:
        async with httpx2.AsyncClient(timeout=60) as http, Client(
                streamable_http_client(url, http_client=http)) as client:
            await client.call_tool("drop_table", {"table": "users"})

    with serving(http_app(McpFace(gateway, principal="alice"), host="127.0.0.1")) as url:
        anyio.run(plain, url)

    server = the(spans, "tools/call drop_table")
    assert server.parent is None
    assert "permission" == (server.attributes or {})["callward.result.kind"]
