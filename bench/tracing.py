"""
What tracing costs per call: the gateway with tracing off (no ``otlp_endpoint``), and
on with the real OpenTelemetry SDK, all in one process (run: .venv/bin/python -m
bench.tracing [--dir /dev/shm]).

Configurations, measured in interleaved rounds so a busy machine slows each alike:

- off: ``Tracing()``, what every gateway without ``observability.otlp_endpoint`` gets;
- on, batch: the SDK's ``BatchSpanProcessor`` (as ``otlp_endpoint`` configures it) into
  an exporter that drops the spans, so the network is left out but the SDK's span
  building, attributes, the record's ``trace`` field and the queue are all in;
- on, simple: the SDK's ``SimpleSpanProcessor`` into its ``InMemorySpanExporter``
  (export on the call's thread; what the tests use);
- on, not sampled: a ``ParentBased`` sampler under a parent that is not sampled (a
  client's ``traceparent`` with flags 00): spans exist but do not record.

The sandbox is left out (``NullRunner`` answers at once), so the ratio is against
governance alone, the smallest denominator a call can have. Each call makes six spans
(parse, execute_tool, policy, audit.authorized, sandbox, audit.completed). The last
two rows time those six spans alone (no gateway, no log), off and on: the tracing's own
cost, without the log's fsync noise.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from bench._common import (
    EXAMPLES,
    NullRunner,
    configure_logging,
    cpu_summary,
    print_table,
    summarize,
    timed,
)
from callward.audit import FileSigner, SQLiteAuditStore
from callward.core import AuditRecord, ToolCall, ToolRegistry, ToolResult
from callward.core.gateway import Gateway
from callward.core.observe import Tracing
from callward.core.observe._tracing import (
    annotate_decision,
    annotate_outcome,
    annotate_record,
    annotate_result,
)
from callward.policies import Policy

TEXT = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 40}}</tool_call>'


class DroppingExporter(SpanExporter):
    """Accepts every batch and keeps nothing: the SDK's cost without a network."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None



def provider_with(processor: BatchSpanProcessor | SimpleSpanProcessor) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": "callward-bench"}))
    provider.add_span_processor(processor)
    return provider


def tracing_calls_alone(tracing: Tracing, result: ToolResult, record: AuditRecord,
                        count: int) -> list[float]:
    """The tracing calls one allowed call makes (its six spans), and nothing else."""
    call = ToolCall.create(id="c", name="add", arguments={"a": 2, "b": 40}, dialect="api")
    decision = result.decision
    if decision is None:
        raise ValueError("an allowed call's result carries its decision")

    def one_call() -> None:
        with tracing.span("callward.parse") as parse:
            parse.set_attribute("callward.parse.calls", 1)
        with tracing.tool_span(call) as span:
            with tracing.span("callward.policy") as policy:
                annotate_decision(policy, decision)
            for name in ("callward.audit.authorized", "callward.audit.completed"):
                with tracing.span(name) as audit:
                    if audit.is_recording():
                        tracing.record_fields()
                    annotate_record(audit, record)
            with tracing.span("callward.sandbox") as run:
                annotate_outcome(run, "ok")
            annotate_result(span, result)

    return timed(one_call, count)


def main() -> None:
    configure_logging()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--dir", default=None,
                        help="where the logs go, e.g. /dev/shm to take fsync noise out")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        root = Path(directory)
        registry = ToolRegistry()
        registry.load(EXAMPLES / "tools.py")
        signer = FileSigner.load_or_create(root / "keys")
        policy_text = (EXAMPLES / "policy.yaml").read_text(encoding="utf-8")
        stores: list[SQLiteAuditStore] = []
        memory = InMemorySpanExporter()
        providers = {
            "batch": provider_with(BatchSpanProcessor(DroppingExporter())),
            "simple": provider_with(SimpleSpanProcessor(memory)),
        }

        def gateway(name: str, tracing: Tracing) -> Gateway:
            store = SQLiteAuditStore(root / f"{name}.db", signer)
            store.open()
            stores.append(store)
            return Gateway(registry=registry, policy=Policy.from_text(policy_text),
                           runner=NullRunner(), audit=store, tracing=tracing)

        unsampled = trace.set_span_in_context(NonRecordingSpan(SpanContext(
            0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, is_remote=True,
            trace_flags=TraceFlags(0))))

        def under_unsampled_parent(each: Gateway) -> None:
            token = otel_context.attach(unsampled)
            try:
                each.handle_text(TEXT, principal="alice")
            finally:
                otel_context.detach(token)

        off = Tracing()
        configurations: dict[str, tuple[Gateway, Callable[[Gateway], None]]] = {
            "tracing off (baseline)": (gateway("off", off), lambda each: each.handle_text(
                TEXT, principal="alice")),
            "on: SDK, batch processor, dropping exporter": (
                gateway("batch", Tracing(providers["batch"])),
                lambda each: each.handle_text(TEXT, principal="alice")),
            "on: SDK, simple processor, in-memory exporter": (
                gateway("simple", Tracing(providers["simple"])),
                lambda each: each.handle_text(TEXT, principal="alice")),
            "on: parent not sampled (traceparent flags 00)": (
                gateway("unsampled", Tracing(providers["batch"])), under_unsampled_parent),
        }
        for each, run in configurations.values():
            for _ in range(200):  # warm-up
                run(each)
        samples: dict[str, list[float]] = {name: [] for name in configurations}
        per_round = max(1, args.calls // args.rounds)
        for _, (name, (each, run)) in itertools.product(range(args.rounds),
                                                        configurations.items()):
            samples[name] += timed(lambda each=each, run=run: run(each), per_round)
            memory.clear()  # the kept spans would slow the garbage collector for all rows
        sample = configurations["tracing off (baseline)"][0].handle_text(
            TEXT, principal="alice")[0]
        last = stores[0].last()
        if last is None:
            raise ValueError("the baseline wrote its records")
        alone = {
            "the six spans of one call alone, off": tracing_calls_alone(off, sample, last,
                                                                       args.calls),
            "the six spans of one call alone, on (batch)": tracing_calls_alone(
                Tracing(providers["batch"]), sample, last, args.calls),
        }
        for provider in providers.values():
            provider.shutdown()
        for store in stores:
            store.close()

    report(samples, alone, per_round * args.rounds, args.rounds)


def report(samples: dict[str, list[float]], alone: dict[str, list[float]], calls: int,
           rounds: int) -> None:
    base50, _, base_mean = summarize(samples["tracing off (baseline)"])
    rows = []
    for name, values in samples.items():
        p50, p99, mean = summarize(values)
        rows.append((name, p50, p99, mean, (mean - base_mean) * 1000, f"{p50 / base50:.3f}"))
    for name, values in alone.items():
        p50, p99, mean = summarize(values)
        rows.append((name, p50, p99, mean, mean * 1000, f"{p50 / base50:.4f} (share)"))
    print_table(
        f"Tracing cost per call ({calls} calls per configuration, "
        f"{rounds} interleaved rounds, one process, 1 thread, NullRunner)",
        ["path", "p50 ms", "p99 ms", "mean ms", "added mean us", "p50 / baseline p50"],
        rows,
    )
    print(f"\nCPU: {cpu_summary()}")


if __name__ == "__main__":
    main()
