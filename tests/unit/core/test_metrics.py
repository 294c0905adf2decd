"""
Per-stage metrics: what the gateway hands its observers, the Prometheus
registry built from it, and the loopback endpoint scraped over real HTTP.
"""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from callward.core.cli._stats import stats_from_exposition, stats_from_records
from callward.core.observe._events import CallEvent
from callward.core.observe._metrics import Metrics, serve_metrics


class StubBrokenObserver:
    """An observer with a bug."""

    def observe(self, event: CallEvent) -> None:
        raise ZeroDivisionError("observer bug")


class Recorder:
    """Keeps what it is handed."""

    def __init__(self) -> None:
        self.events: list[CallEvent] = []

    def observe(self, event: CallEvent) -> None:
        self.events.append(event)


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.exposition().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


class TestGatewayObservers:
    def test_completed_call_reports_every_stage(self, make_gateway):
        """An allowed call's event names parse, policy, both audits, sandbox and queue."""
        recorder = Recorder()
        make_gateway(observers=(recorder,)).handle_text('call function("square", [3], 9)',
                                           principal="alice")

        (event,) = recorder.events
        assert {"parse", "policy", "audit_authorized", "sandbox", "queue",
                "audit_completed"} == {stage for stage, _ in event.durations_ms}
        assert ("alice", "square", "ok", "call.completed", 1) == (
            event.principal, event.tool, event.outcome, event.record_kind, event.result_bytes)

    def test_denied_and_malformed_calls_are_observed(self, make_gateway):
        """A denial and unreadable model text reach the observers with their kinds."""
        recorder = Recorder()
        gateway = make_gateway(observers=(recorder,))
        gateway.handle_text('call function("drop_table", ["users"])', principal="mallory")
        gateway.handle_text('call function("square", [3]', principal="mallory")

        assert [("drop_table", "permission", "call.denied"), ("", "malformed", "call.rejected")] \
            == [(e.tool, e.outcome, e.record_kind) for e in recorder.events]
        assert "audit_denied" in dict(recorder.events[0].durations_ms)

    def test_a_failing_observer_never_fails_the_call(self, make_gateway, store):
        """An observer that raises is logged; the call, its record and later observers stand."""
        recorder = Recorder()
        with capture_logs() as logs:
            (result,) = make_gateway(observers=(StubBrokenObserver(), recorder)).handle_text(
                'call function("square", [4], 16)', principal="alice")

        assert ("ok", 16) == (result.kind, result.content)
        assert "call.completed" == store.last().kind
        assert 1 == len(recorder.events)
        assert ["StubBrokenObserver"] == [e["observer"] for e in logs
                                          if e["event"] == "observer_failed"]


class TestMetrics:
    def test_stages_tools_and_outcomes_are_counted(self, make_gateway):
        """Histograms per stage and per tool, and a counter per outcome."""
        metrics = Metrics(open_anomalies=lambda: 2)
        gateway = make_gateway(observers=(metrics,))
        for x in (1, 2, 3):
            gateway.handle_text(f'call function("square", [{x}])', principal="alice")
        gateway.handle_text('call function("nope", [])', principal="alice")

        seen = samples(metrics)
        assert 3 == seen[("callward_stage_seconds_count", (("stage", "sandbox"),))]
        assert 4 == seen[("callward_stage_seconds_count", (("stage", "policy"),))]
        assert 3 == seen[("callward_tool_call_seconds_count", (("tool", "square"),))]
        assert 1 == seen[("callward_tool_call_seconds_count", (("tool", "(unknown)"),))]
        assert 3 == seen[("callward_calls_total", (("outcome", "ok"),))]
        assert 1 == seen[("callward_calls_total", (("outcome", "unknown_tool"),))]
        assert 2 == seen[("callward_anomalies_open", ())]

    def test_model_turn_time_is_the_model_stage(self, make_gateway):
        """A model.turn written through the gateway adds its generation time as ``model``."""
        metrics = Metrics()
        make_gateway(observers=(metrics,)).record("model.turn", {"duration_ms": 250.0, "turn": 1})

        seen = samples(metrics)
        assert 1 == seen[("callward_stage_seconds_count", (("stage", "model"),))]
        assert 0.25 == seen[("callward_stage_seconds_sum", (("stage", "model"),))]


class TestEndpoint:
    def test_endpoint_is_scraped_over_http_and_parses(self, make_gateway):
        """A real GET on the loopback endpoint returns text prometheus_client can parse."""
        metrics = Metrics()
        gateway = make_gateway(observers=(metrics,))
        gateway.handle_text('call function("square", [5])', principal="alice")
        server = serve_metrics(metrics, port=0)
        try:
            with urllib.request.urlopen(server.url, timeout=10) as response:  # noqa: S310 - http URL
                text = response.read().decode()
        finally:
            server.close()

        names = {family.name for family in text_string_to_metric_families(text)}
        assert {"callward_stage_seconds", "callward_tool_call_seconds", "callward_calls",
                "callward_anomalies_open"} <= names
        summary = stats_from_exposition(text)
        assert 1 == summary["calls"]
        assert 1 == summary["stages"]["sandbox"]["n"]  # type: ignore[index]

    @pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "localhost.evil"])  # noqa: S104 - refused
    def test_endpoint_refuses_non_loopback_addresses(self, host):
        """The endpoint has no authentication, so it binds loopback only."""
        with pytest.raises(ValueError, match="loopback"):
            serve_metrics(Metrics(), host=host, port=0)


class TestStatsFromRecords:
    def test_quantiles_are_nearest_rank_per_stage_and_tool(self):
        """p50/p99 of a stage are observed values; a tool's time sums its stages."""
        records = [("2026-01-01T00:00:00.000000Z", "call.completed",
                    {"tool": "square@1", "outcome": "ok",
                     "durations_ms": {"parse": 0.0, "policy": float(n), "sandbox": 10.0,
                                      "queue": 9.0}})
                   for n in range(1, 101)]

        summary = stats_from_records(records)

        assert {"n": 100, "p50_ms": 50.0, "p99_ms": 99.0, "max_ms": 100.0} \
            == summary["stages"]["policy"]  # type: ignore[index]
        assert 60.0 == summary["tools"]["square@1"]["p50_ms"]  # type: ignore[index]
