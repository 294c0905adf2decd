"""
OpenTelemetry traces of the gateway's calls, the agent's model turns, plans and MCP requests.

Invariants:

- A span carries names, ids, kinds, rule ids, sizes and audit seqs and hashes: never an
  argument value, a result value, a model's text, a principal's token or an error's
  message (messages can quote values). Errors set the span's status to ``ERROR`` with
  the kind as description.
- Tracing is an observer: it never changes a call's outcome. A span that cannot be
  exported is dropped by the SDK's batch processor, not retried by the call.
- Off (no ``observability.otlp_endpoint``, no provider handed in, no global SDK
  provider): ``Tracing.span`` returns one shared no-op context manager and every
  ``annotate_*`` returns on a single ``is_recording()`` check, so no span, context or
  attribute dict is built.
- Each record written inside a recording span carries ``"trace": {"trace_id",
  "span_id"}`` of that span (``Tracing.record_fields``), and the ``callward.audit.*``
  span it was written in carries the record's ``callward.audit.seq`` and
  ``callward.audit.record_hash``: a reviewer goes from a span to the signed record and
  back. With tracing off the records are exactly as before.

The span names are listed in docs/observability.md.

Example::

    >>> from callward.core.observe import Tracing
    >>> Tracing().enabled  # off unless configured
    False
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import (
    INVALID_SPAN,
    NoOpTracerProvider,
    ProxyTracerProvider,
    Span,
    SpanKind,
    StatusCode,
    TracerProvider,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from callward.core._canonical import JSONValue

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

    from callward.core.types import AuditRecord, Decision, ToolCall, ToolResult

INSTRUMENTATION_NAME: Final = "callward"
DEFAULT_SERVICE_NAME: Final = "callward"
DEFAULT_EXPORT_TIMEOUT_SECONDS: Final = 10.0
#: The OTLP/HTTP path for traces, added to an endpoint given without a path.
OTLP_TRACES_PATH: Final = "/v1/traces"
#: The W3C Trace Context headers (and ``_meta`` keys) a request may carry.
TRACE_CONTEXT_KEYS: Final = ("traceparent", "tracestate")
_TOOL_NAME_CHARS: Final = 256
#: ``gen_ai.agent.name`` of the agent loop (``callward.core.agent``).
AGENT_NAME: Final = "callward"
#: ``gen_ai.provider.name`` of a chat model the agent runs in-process (transformers).
MODEL_PROVIDER: Final = "transformers"
#: ``gen_ai.provider.name`` of a served chat model: the API it speaks.
SERVED_PROVIDER: Final = "openai"
_PROPAGATOR: Final = TraceContextTextMapPropagator()


class _NoSpan:
    """The context manager of a span not made: yields the invalid (non-recording) span."""

    __slots__ = ()

    def __enter__(self) -> Span:
        return INVALID_SPAN

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        return None


_NO_SPAN: Final = _NoSpan()


class Tracing:
    """
    The tracer every part of callward makes its spans with.

    Args:
        provider: The tracer provider spans go to; None is off (unless ``from_global``).
            The caller keeps owning a provider it hands in; one ``configure_tracing``
            made is shut down by ``shutdown``.
    """

    def __init__(self, provider: TracerProvider | None = None, *, owned: bool = False) -> None:
        self._provider = provider
        self._owned = owned and provider is not None
        self._tracer = None if provider is None else provider.get_tracer(INSTRUMENTATION_NAME)

    @classmethod
    def from_global(cls) -> Tracing:
        """The process's global provider when an application installed one, else off."""
        provider = trace.get_tracer_provider()
        if isinstance(provider, ProxyTracerProvider | NoOpTracerProvider):
            return cls()
        return cls(provider)

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def span(self, name: str, *, kind: SpanKind = SpanKind.INTERNAL,
             parent: Context | None = None,
             attributes: Mapping[str, str | int | bool] | None = None,
             ) -> contextlib.AbstractContextManager[Span]:
        """
        A span, current within the block; an exception leaving the block sets its
        status to ``ERROR`` with the exception's type (never its message).

        Args:
            parent: The context to continue (an extracted ``traceparent``); None: the
                current span's.
        """
        if self._tracer is None:
            return _NO_SPAN
        return self._span(name, kind, parent, attributes)

    @contextlib.contextmanager
    def _span(self, name: str, kind: SpanKind, parent: Context | None,
              attributes: Mapping[str, str | int | bool] | None) -> Iterator[Span]:
        if self._tracer is None:  # pragma: no cover - span() checked it
            raise TypeError("tracing is off")
        with self._tracer.start_as_current_span(
                name, context=parent, kind=kind, attributes=attributes,
                record_exception=False, set_status_on_exception=False) as span:
            try:
                yield span
            except BaseException as exc:
                if span.is_recording():
                    kind_of = getattr(exc, "kind", None)
                    error_type = kind_of if isinstance(kind_of, str) else type(exc).__name__
                    span.set_attribute("error.type", error_type)
                    span.set_status(StatusCode.ERROR, error_type)
                raise

    def tool_span(self, call: ToolCall) -> contextlib.AbstractContextManager[Span]:
        """The ``execute_tool {name}`` span of one call (GenAI semantic conventions)."""
        if self._tracer is None:
            return _NO_SPAN
        name = call.name[:_TOOL_NAME_CHARS]
        return self._span(f"execute_tool {name}", SpanKind.INTERNAL, None, {
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": name,
            "gen_ai.tool.call.id": call.id,
            "gen_ai.tool.type": "function",
            "callward.call.dialect": call.dialect,
            "callward.call.arguments_bytes": len(call.arguments_json),
        })

    def agent_span(self, run_id: str, model_id: str) -> contextlib.AbstractContextManager[Span]:
        """The ``invoke_agent callward`` span of one agent run: the root of its trace."""
        if self._tracer is None:
            return _NO_SPAN
        return self._span(f"invoke_agent {AGENT_NAME}", SpanKind.INTERNAL, None, {
            "gen_ai.operation.name": "invoke_agent",
            "gen_ai.agent.name": AGENT_NAME,
            "gen_ai.conversation.id": run_id,
            "gen_ai.request.model": model_id,
        })

    def chat_span(self, model_id: str, turn: int) -> contextlib.AbstractContextManager[Span]:
        """
        The ``chat {model}`` span of one model turn (GenAI semantic conventions;
        ``INTERNAL``, as for a model run in this process; ``annotate_turn`` says who
        answered).
        """
        if self._tracer is None:
            return _NO_SPAN
        return self._span(f"chat {model_id}", SpanKind.INTERNAL, None, {
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": model_id,
            "callward.agent.turn": turn,
        })

    def plan_span(self, name: str, digest: str, steps: int
                  ) -> contextlib.AbstractContextManager[Span]:
        """The ``callward.plan {name}`` span of one plan run: the root of its trace."""
        if self._tracer is None:
            return _NO_SPAN
        name = name[:_TOOL_NAME_CHARS]
        return self._span(f"callward.plan {name}".rstrip(), SpanKind.INTERNAL, None, {
            "callward.plan.name": name,
            "callward.plan.digest": digest,
            "callward.plan.steps": steps,
        })

    def server_span(self, method: str, tool: str, *, parent: Context | None
                    ) -> contextlib.AbstractContextManager[Span]:
        """
        The ``SERVER`` span of one MCP request (``tools/call {tool}``), continuing the
        client's trace when ``parent`` holds one.
        """
        if self._tracer is None:
            return _NO_SPAN
        name = tool[:_TOOL_NAME_CHARS]
        return self._span(f"{method} {name}", SpanKind.SERVER, parent, {
            "mcp.method.name": method,
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": name,
        })

    def record_fields(self) -> dict[str, JSONValue]:
        """
        ``{"trace": {"trace_id", "span_id"}}`` of the current span for a record's body
        when it is recording; ``{}`` otherwise, so records are unchanged with tracing off.
        """
        if self._tracer is None:
            return {}
        span = trace.get_current_span()
        if not span.is_recording():
            return {}
        context = span.get_span_context()
        return {"trace": {"trace_id": trace.format_trace_id(context.trace_id),
                          "span_id": trace.format_span_id(context.span_id)}}

    def force_flush(self) -> None:
        """Export what is buffered now (a provider without ``force_flush`` has nothing)."""
        flush = getattr(self._provider, "force_flush", None)
        if flush is not None:
            flush()

    def shutdown(self) -> None:
        """Flush and stop a provider ``configure_tracing`` made; one handed in is the caller's."""
        if self._owned:
            shutdown = getattr(self._provider, "shutdown", None)
            if shutdown is not None:
                shutdown()
            self._owned = False


def configure_tracing(endpoint: str | None = None, *,
                      service_name: str = DEFAULT_SERVICE_NAME,
                      exporter: SpanExporter | None = None,
                      export_timeout_seconds: float = DEFAULT_EXPORT_TIMEOUT_SECONDS) -> Tracing:
    """
    A tracer provider of the OpenTelemetry SDK, exporting over OTLP/HTTP (protobuf).

    Args:
        endpoint: The collector's URL; one without a path gets ``/v1/traces``. Spans are
            batched and exported off the calls' threads.
        service_name: The ``service.name`` resource attribute.
        exporter: Instead of ``endpoint``: an exporter each span goes to synchronously as
            it ends (tests: the SDK's ``InMemorySpanExporter``).
        export_timeout_seconds: How long one export may take, retries included; a
            collector that is down delays ``shutdown`` by up to this, never a call.

    Raises:
        ValueError: Neither or both of ``endpoint`` and ``exporter``, or an endpoint that is
            not an http(s) URL.
    """
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource  # noqa: PLC0415
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import (  # noqa: PLC0415
        BatchSpanProcessor,
        SimpleSpanProcessor,
    )

    if (endpoint is None) == (exporter is None):
        raise ValueError("give either an OTLP endpoint or an exporter")
    provider = SdkTracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
            OTLPSpanExporter,
        )

        provider.add_span_processor(BatchSpanProcessor(
            OTLPSpanExporter(endpoint=otlp_traces_url(str(endpoint)),
                             timeout=export_timeout_seconds)))
    return Tracing(provider, owned=True)


def otlp_traces_url(endpoint: str) -> str:
    """
    The URL spans are posted to: ``endpoint`` itself, or with ``/v1/traces`` when it has
    no path (as ``OTEL_EXPORTER_OTLP_ENDPOINT`` is read).

    Raises:
        ValueError: Not an http(s) URL with a host.
    """
    parts = urlsplit(endpoint)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError("an OTLP endpoint is an http:// or https:// URL")
    if parts.path in {"", "/"}:
        return endpoint.rstrip("/") + OTLP_TRACES_PATH
    return endpoint


def continued_context(*carriers: Mapping[str, object] | None) -> Context | None:
    """
    The trace context of the first carrier with a valid W3C ``traceparent`` (e.g. an MCP
    request's ``_meta``, then its HTTP headers); None when none has one.
    """
    for carrier in carriers:
        if not carrier:
            continue
        fields = {key: value for key in TRACE_CONTEXT_KEYS
                  if isinstance(value := carrier.get(key), str)}
        if "traceparent" not in fields:
            continue
        context = _PROPAGATOR.extract(fields)
        if trace.get_current_span(context).get_span_context().is_valid:
            return context
    return None


def asgi_trace_headers(headers: Iterable[tuple[bytes, bytes]]) -> dict[str, object]:
    """The W3C Trace Context headers of an ASGI scope's header list (names lowercased)."""
    found: dict[str, object] = {}
    for raw_name, raw_value in headers:
        name = raw_name.decode("latin-1").lower()
        if name in TRACE_CONTEXT_KEYS and name not in found:
            found[name] = raw_value.decode("latin-1")
    return found


# -- attributes -----------------------------------------------------------------
# Each returns at once when the span is not recording: no attribute is built.

def annotate_decision(span: Span, decision: Decision) -> None:
    """The decision's effect, kind, rule ids and policy digest (never its message)."""
    if not span.is_recording():
        return
    span.set_attributes({
        "callward.decision.effect": decision.effect,
        "callward.decision.rules": [str(rule) for rule in decision.reasons],
        "callward.policy.digest": str(decision.policy_digest),
    })
    if decision.kind is not None:
        span.set_attribute("callward.decision.kind", decision.kind)


def annotate_record(span: Span, record: AuditRecord) -> None:
    """The signed record written in this span: its kind, seq and record hash."""
    if not span.is_recording():
        return
    span.set_attributes({
        "callward.audit.kind": record.kind,
        "callward.audit.seq": record.seq,
        "callward.audit.record_hash": str(record.record_hash),
    })


def annotate_outcome(span: Span, kind: str, *, result_bytes: int | None = None) -> None:
    """A stage's outcome kind; anything but ``ok`` sets the span's status to ``ERROR``."""
    if not span.is_recording():
        return
    span.set_attribute("callward.result.kind", kind)
    if result_bytes is not None:
        span.set_attribute("callward.result.bytes", result_bytes)
    if kind != "ok":
        span.set_attribute("error.type", kind)
        span.set_status(StatusCode.ERROR, kind)


def annotate_result(span: Span, result: ToolResult) -> None:
    """A tool call's result: kind, decision, and the seq and hash of its final record."""
    if not span.is_recording():
        return
    if result.decision is not None:
        annotate_decision(span, result.decision)
    span.set_attributes({
        "callward.audit.seq": result.receipt.seq,
        "callward.audit.record_hash": str(result.receipt.record_hash),
    })
    annotate_outcome(span, result.kind, result_bytes=len(result.content_json))


def annotate_turn(span: Span, *, model_id: str, input_tokens: int, output_tokens: int,
                  served: Mapping[str, JSONValue] | None = None) -> None:
    """
    A model turn once generated: who answered (``gen_ai.provider.name``,
    ``gen_ai.response.model``) and its token counts (``gen_ai.usage.*``).

    Args:
        served: What a served model's turn reports (``ModelTurn.served``: endpoint, the
            model the server names, usage); None for a model run in this process.
    """
    if not span.is_recording():
        return
    if served is None:
        span.set_attributes({
            "gen_ai.provider.name": MODEL_PROVIDER, "gen_ai.system": MODEL_PROVIDER,
            "gen_ai.response.model": model_id,
            "gen_ai.usage.input_tokens": input_tokens,
            "gen_ai.usage.output_tokens": output_tokens,
        })
        return
    reported = served.get("reported")
    span.set_attributes({
        "gen_ai.provider.name": SERVED_PROVIDER, "gen_ai.system": SERVED_PROVIDER,
        "gen_ai.response.model": reported if isinstance(reported, str) else model_id,
    })
    endpoint = served.get("endpoint")
    if isinstance(endpoint, str):
        parts = urlsplit(endpoint)
        if parts.hostname:
            span.set_attribute("server.address", parts.hostname)
        with contextlib.suppress(ValueError):
            if parts.port is not None:
                span.set_attribute("server.port", parts.port)
    if isinstance(served.get("usage"), Mapping):  # a server that reported no usage: none
        span.set_attributes({"gen_ai.usage.input_tokens": input_tokens,
                             "gen_ai.usage.output_tokens": output_tokens})


def annotate_run(span: Span, *, stop: str, steps: int) -> None:
    """How an agent run ended (``answered``, a budget) and after how many turns."""
    if not span.is_recording():
        return
    span.set_attributes({"callward.agent.stop": stop, "callward.agent.steps": steps})
