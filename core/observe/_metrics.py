"""
Per-call observations and the Prometheus metrics built from them.

The gateway hands every finished call (``call.completed``, ``call.denied``,
``call.rejected``) to its observers as a ``CallEvent``, after the record is
durable. Observers are not evidence: the audit log is. An observer that fails
is logged and skipped (see ``Gateway``); it can never fail, delay past its own
cost, or change a call.

Stages, in milliseconds, as a call meets them:

- ``parse``: reading the model's text into calls (0 when the call came parsed).
- ``policy``: the policy decision.
- ``audit_authorized``: the signed, durable ``call.authorized``.
- ``queue``: the sandbox stage minus the tool's own run time: waiting for a
  warm container, or starting a cold one, and handing the container back.
  The sandbox does not report a separate wait, so this is the whole overhead.
- ``sandbox``: the whole sandbox stage, ``queue`` included.
- ``audit_completed`` / ``audit_denied``: the final record; known only after
  it is written, so it is in the metrics and not in the record itself.
- ``model``: a model turn's generation (from the agent's ``model.turn``).

Metrics (own registry, never the process-global one)::

    callward_stage_seconds{stage}          histogram
    callward_tool_call_seconds{tool}       histogram, the gateway's time for a call
    callward_calls_total{outcome}          counter, by result kind
    callward_anomalies_open                gauge
    callward_anomalies_detected_total{metric}  counter
    callward_observer_failures_total{observer} counter
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final
from wsgiref.simple_server import WSGIServer

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.exposition import generate_latest

from callward.core._canonical import JSONValue
from callward.core.errors import ConfigurationError
from callward.core.observe._events import CallEvent

log = structlog.get_logger()

#: Stage names, in the order a call meets them.
STAGES: Final = ("parse", "policy", "audit_authorized", "queue", "sandbox",
                 "audit_completed", "audit_denied", "model")
#: Latency buckets in seconds: 50 µs to 60 s, dense where governance lives.
BUCKETS_SECONDS: Final = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                          0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: How a tool that is not registered is labelled, so no model text becomes a label.
UNKNOWN_TOOL_LABEL: Final = "(unknown)"


class Metrics:
    """
    Prometheus metrics of the calls a gateway handles. Satisfies ``CallObserver``
    and ``RecordObserver``.

    Args:
        open_anomalies: Counts the open anomalies for the gauge (None: always 0).
    """

    def __init__(self, *, open_anomalies: Callable[[], int] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._stage = Histogram("callward_stage_seconds", "Time per pipeline stage",
                                ("stage",), registry=self.registry, buckets=BUCKETS_SECONDS)
        self._tool = Histogram("callward_tool_call_seconds",
                               "The gateway's time per call, by tool", ("tool",),
                               registry=self.registry, buckets=BUCKETS_SECONDS)
        self._calls = Counter("callward_calls", "Finished calls by result kind", ("outcome",),
                              registry=self.registry)
        self._open = Gauge("callward_anomalies_open", "Anomalies detected and not resolved",
                           registry=self.registry)
        self.count_open_anomalies(open_anomalies)
        self.anomalies_detected = Counter("callward_anomalies_detected",
                                          "anomaly.detected records written, by metric",
                                          ("metric",), registry=self.registry)
        self.observer_failures = Counter("callward_observer_failures",
                                         "Observers that raised on a call (logged, skipped)",
                                         ("observer",), registry=self.registry)
        # Children are cached: labels() takes a lock and hashes; a call should not pay it.
        self._stage_children = {stage: self._stage.labels(stage) for stage in STAGES}
        self._tool_children: dict[str, Histogram] = {}

    def count_open_anomalies(self, count: Callable[[], int] | None) -> None:
        """Read the open-anomalies gauge from ``count`` at each scrape (NaN if it fails)."""

        def read() -> float:
            if count is None:
                return 0.0
            try:
                return float(count())
            except Exception:  # a scrape must answer; the gauge says "unknown"
                log.exception("metrics_open_anomalies_failed")
                return math.nan

        self._open.set_function(read)

    def observe(self, event: CallEvent) -> None:
        """Record one call's stages, its tool's time and its outcome."""
        for stage, ms in event.durations_ms:
            child = self._stage_children.get(stage)
            if child is not None:
                child.observe(ms / 1000)
        tool = event.tool or UNKNOWN_TOOL_LABEL
        child = self._tool_children.get(tool)
        if child is None:
            child = self._tool_children.setdefault(tool, self._tool.labels(tool))
        child.observe(event.total_ms / 1000)
        self._calls.labels(event.outcome).inc()

    def observe_record(self, kind: str, body: Mapping[str, JSONValue]) -> None:
        """A ``model.turn``'s generation time is the ``model`` stage."""
        if kind != "model.turn":
            return
        duration = body.get("duration_ms")
        if isinstance(duration, int | float) and not isinstance(duration, bool):
            self._stage_children["model"].observe(float(duration) / 1000)

    @staticmethod
    def of(observers: tuple[object, ...]) -> Metrics | None:
        """The ``Metrics`` among a gateway's observers, if any."""
        return next((o for o in observers if isinstance(o, Metrics)), None)

    def exposition(self) -> bytes:
        """The metrics in the Prometheus text format."""
        return generate_latest(self.registry)


@dataclass(slots=True)
class MetricsServer:
    """A running ``/metrics`` endpoint; ``close()`` stops it."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    @property
    def url(self) -> str:
        return f"http://{self.server.server_name}:{self.port}/metrics"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@contextlib.contextmanager
def serving_metrics(gateway: object, port: int | None) -> Iterator[MetricsServer | None]:
    """
    Within the block, serve the gateway's metrics on ``127.0.0.1:port`` (no-op for None).

    Raises:
        ConfigurationError: The gateway has no metrics, or the port cannot be used.
    """
    if port is None:
        yield None
        return
    metrics = Metrics.of(tuple(getattr(gateway, "observers", ())))
    if metrics is None:
        raise ConfigurationError("this gateway collects no metrics")
    try:
        server = serve_metrics(metrics, port=port)
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"cannot serve metrics on port {port} "
                                 f"({type(exc).__name__})") from exc
    try:
        yield server
    finally:
        server.close()


def serve_metrics(metrics: Metrics, *, host: str = "127.0.0.1", port: int = 0) -> MetricsServer:
    """
    Serve ``metrics`` over HTTP in a daemon thread, on a loopback address only.

    The endpoint has no authentication, so it is never bound to a routable address;
    put a proxy in front to expose it.

    Args:
        port: 0 picks a free port (see ``MetricsServer.port``).

    Raises:
        ValueError: ``host`` is not a loopback address, or ``port`` is out of range.
        OSError: The port cannot be bound.
    """
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"the metrics endpoint listens on loopback only, not {host!r}")
    if not 0 <= port <= 65535:
        raise ValueError("port is 0..65535")
    server, thread = start_http_server(port, addr=host, registry=metrics.registry)
    log.info("metrics_serving", host=host, port=int(server.server_port))
    return MetricsServer(server, thread)
