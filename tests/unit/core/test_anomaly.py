"""
Anomaly monitoring: replayed traffic on an injected clock (never sleeps), a
real SQLite audit log with real Ed25519 signatures, and a real state file.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from callward.audit import SQLiteAuditStore, verify
from callward.core.observe._anomaly import (
    MAX_REASON_CHARS,
    AnomalyDetector,
    DetectorSettings,
    resolve,
)
from callward.core.observe._events import CallEvent
from callward.policies._anomaly_state import AnomalyState

START = 1_800_000_000.0


class Clock:
    """Seconds since the epoch that a test moves by hand."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


@pytest.fixture(name="state")
def _state(tmp_path: Path):
    state = AnomalyState(tmp_path / "anomaly-state.db")
    yield state
    state.close()


@pytest.fixture(name="clock")
def _clock() -> Clock:
    return Clock()


@pytest.fixture(name="detector")
def _detector(state, store, clock) -> AnomalyDetector:
    return AnomalyDetector(state, store, clock=clock)


def call(principal: str = "alice", tool: str = "square", outcome: str = "ok", *,
         result_bytes: int = 20, reasons: tuple[str, ...] = ()) -> CallEvent:
    denied = outcome in {"permission", "schema", "rate_limit", "approval_required"}
    return CallEvent(call_id="c", principal=principal, tool=tool, outcome=outcome,
                     record_kind="call.denied" if denied else "call.completed",
                     result_bytes=0 if denied else result_bytes, reasons=reasons)


def replay_normal(detector: AnomalyDetector, clock: Clock, *, seconds: float, seed: int = 7,
                  denial_share: float = 0.0, mean_gap: float = 3.0,
                  principal: str = "alice", tool: str = "square") -> int:
    """Poisson-jittered traffic (exponential gaps), with a share of random denials."""
    rng = random.Random(seed)  # noqa: S311 - replayed traffic, not security
    end = clock.now + seconds
    calls = 0
    while clock.now < end:
        clock.now += rng.expovariate(1 / mean_gap)
        outcome = "permission" if rng.random() < denial_share else "ok"
        detector.observe(call(principal, tool, outcome, result_bytes=rng.randint(15, 40)))
        calls += 1
    return calls


def detected(store: SQLiteAuditStore) -> list[tuple[str, str, str]]:
    return [(r.body["metric"], r.body["principal"], r.body["tool"])  # type: ignore[misc]
            for r in store.records() if r.kind == "anomaly.detected"]


class TestCallRate:
    def test_replayed_burst_after_spaced_traffic_is_flagged(self, detector, clock, store,
                                                             tmp_path):
        """200 calls in 4 s after 10 minutes of jittery traffic: one call_rate anomaly."""
        replay_normal(detector, clock, seconds=600)
        for _ in range(200):
            clock.now += 0.02
            detector.observe(call())

        assert [("call_rate", "alice", "square")] == detected(store)
        (record,) = [r for r in store.records() if r.kind == "anomaly.detected"]
        assert {"observed", "baseline", "threshold", "window", "method", "anomaly_id"} \
            <= set(record.body)
        assert record.body["observed"] > record.body["threshold"] > record.body["baseline"]
        verify(tmp_path / "audit.db", [tmp_path / "keys" / "audit-ed25519.pub"])

    def test_hour_of_jittery_traffic_with_some_denials_is_not_flagged(self, detector, clock,
                                                                      store):
        """An hour of Poisson traffic at two rates, with 4% denials, raises nothing."""
        calls = replay_normal(detector, clock, seconds=1800, denial_share=0.04)
        calls += replay_normal(detector, clock, seconds=1800, denial_share=0.04, seed=8,
                               mean_gap=1.5)

        assert calls > 1500
        assert [] == detected(store)

    def test_quiet_start_does_not_alert(self, detector, clock, store):
        """A principal's first burst, before any baseline exists, is not judged."""
        for _ in range(100):
            clock.now += 0.05
            detector.observe(call("newcomer"))

        assert [] == detected(store)


class TestRatios:
    def test_denial_ratio_spike_is_flagged(self, detector, clock, store):
        """15 denials in 20 calls after a baseline of 4% denials: a denial_ratio anomaly."""
        replay_normal(detector, clock, seconds=300, denial_share=0.04)
        for n in range(20):
            clock.now += 5
            detector.observe(call(outcome="permission" if n % 4 else "ok"))

        assert [("denial_ratio", "alice", "square")] == detected(store)

    def test_limits_tripped_is_flagged(self, detector, clock, store):
        """Ten timeouts and memory kills in a row after clean runs: limits_tripped."""
        replay_normal(detector, clock, seconds=300)
        for n in range(10):
            clock.now += 5
            detector.observe(call(outcome="timeout" if n % 2 else "memory_limit"))

        assert [("limits_tripped", "alice", "square")] == detected(store)


class TestResultSize:
    def test_result_far_over_the_usual_size_is_flagged(self, detector, clock, store):
        """A 1 MiB result after results of tens of bytes: result_size, with the sizes."""
        replay_normal(detector, clock, seconds=300)
        clock.now += 3
        detector.observe(call(result_bytes=1 << 20))

        assert [("result_size", "alice", "square")] == detected(store)
        record = store.last()
        assert (1 << 20, True) == (record.body["observed"], record.body["baseline"] < 64)


class TestFirstUse:
    def test_first_use_is_flagged_once(self, detector, clock, store):
        """An established principal's first call of another tool is flagged, once."""
        replay_normal(detector, clock, seconds=200)
        for _ in range(3):
            clock.now += 3
            detector.observe(call(tool="drop_table"))

        assert [("first_use", "alice", "drop_table")] == detected(store)

    def test_first_use_survives_a_restart(self, state, store, clock, tmp_path):
        """Known first uses are in the state file: a new detector does not flag them again."""
        first = AnomalyDetector(state, store, clock=clock)
        replay_normal(first, clock, seconds=200)
        clock.now += 3
        first.observe(call(tool="add"))
        state.close()
        again = AnomalyDetector(AnomalyState(tmp_path / "anomaly-state.db"), store, clock=clock)
        clock.now += 3
        again.observe(call(tool="add"))
        again.observe(call(tool="capital"))

        assert [("first_use", "alice", "add"), ("first_use", "alice", "capital")] \
            == detected(store)


class TestLifecycle:
    def test_anomaly_resolves_after_the_quiet_period(self, state, store, clock):
        """Not seen for quiet_seconds: anomaly.resolved by the quiet period, no longer open."""
        detector = AnomalyDetector(state, store, clock=clock,
                                   settings=DetectorSettings(quiet_seconds=60))
        replay_normal(detector, clock, seconds=600)
        for _ in range(100):
            clock.now += 0.02
            detector.observe(call())
        (anomaly,) = state.open_for("alice", clock.now)
        clock.now += 61
        detector.observe(call())

        resolved = [r.body for r in store.records() if r.kind == "anomaly.resolved"]
        assert [(anomaly.id, "quiet-period")] == [(b["anomaly_id"], b["by"]) for b in resolved]
        assert () == state.open_for("alice", clock.now)
        assert 0 == detector.open_count

    def test_operator_resolves_once_and_it_is_audited(self, detector, state, store, clock):
        """resolve() signs anomaly.resolved with who; resolving again changes nothing."""
        replay_normal(detector, clock, seconds=600)
        for _ in range(100):
            clock.now += 0.02
            detector.observe(call())
        (anomaly,) = state.all_open()

        assert anomaly.id == resolve(state, store, anomaly.id, by="sec-oncall", now=clock.now).id
        assert resolve(state, store, anomaly.id, by="sec-oncall", now=clock.now) is None
        assert [("anomaly.resolved", "sec-oncall")] == [
            (r.kind, r.body["by"]) for r in store.records() if r.kind == "anomaly.resolved"]
        assert [False] == ["reason" in r.body for r in store.records()
                           if r.kind == "anomaly.resolved"]

    def test_a_reason_is_kept_in_the_resolution_record(self, detector, state, store, clock):
        """resolve(reason=...) puts the reason in anomaly.resolved itself, cut to its cap."""
        replay_normal(detector, clock, seconds=600)
        for _ in range(100):
            clock.now += 0.02
            detector.observe(call())
        (anomaly,) = state.all_open()

        resolve(state, store, anomaly.id, by="sec-oncall", now=clock.now,
                reason="a load test " + "x" * MAX_REASON_CHARS)

        (body,) = [r.body for r in store.records() if r.kind == "anomaly.resolved"]
        assert (MAX_REASON_CHARS, True) == (len(body["reason"]),
                                            body["reason"].startswith("a load test x"))
        assert () == state.open_for("alice", clock.now)

    def test_calls_held_by_an_anomaly_feed_no_baseline(self, detector, clock, store):
        """Denials caused by an open anomaly do not raise a denial-ratio anomaly of their own."""
        replay_normal(detector, clock, seconds=300)
        for _ in range(40):
            clock.now += 5
            detector.observe(call(outcome="approval_required",
                                  reasons=("hold", "anomaly.anm_x", "proposal.p")))

        assert [] == detected(store)


class TestNeverBlocks:
    def test_a_broken_state_file_does_not_fail_the_call(self, make_gateway, store, tmp_path):
        """The detector's state cannot open: the call completes, the failure is logged."""
        (tmp_path / "not-a-file").mkdir()
        detector = AnomalyDetector(AnomalyState(tmp_path / "not-a-file"), store)
        gateway = make_gateway(observers=(detector,))
        with capture_logs() as logs:
            (result,) = gateway.handle_text('call function("square", [3])', principal="alice")

        assert ("ok", "call.completed") == (result.kind, store.last().kind)
        assert ["AnomalyDetector"] == [e["observer"] for e in logs
                                       if e["event"] == "observer_failed"]
