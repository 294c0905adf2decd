"""
Anomaly monitoring: per (principal, tool) baselines, and the deviations from them.

The detector is a ``CallObserver``: the gateway hands it every finished call
after the call's record is durable. What it finds is written as a signed
``anomaly.detected`` record with its evidence, kept open in the anomaly state (``AnomalyStore``)
(where the policy can read it), and closed by ``anomaly.resolved`` after a
quiet period or by an operator (``callward anomalies resolve``).

How a deviation is defined (``DetectorSettings`` holds every number):

- ``call_rate``: calls are counted in fixed buckets of ``rate_bucket_seconds``;
  the baseline is the median and MAD of the last ``rate_history_buckets``
  finished buckets (idle buckets count as 0). The current bucket deviates when
  it holds at least ``rate_min_calls`` calls and more than
  ``median + rate_z * max(1.4826 * MAD, sqrt(median), 1)``; the sqrt term is
  the Poisson noise a steady rate has anyway. No verdict before
  ``rate_min_history_buckets`` buckets of history.
- ``denial_ratio`` / ``limits_tripped``: the share of denials (of tool runs
  that hit timeout, memory, pids, output or disk limits) in the last
  ``ratio_window`` calls, against the smoothed share of every call before that
  window, ``p0 = (hits + 1) / (calls + 2)``. It deviates when the window has
  at least ``ratio_min_events`` hits, exceeds ``p0`` by ``ratio_min_increase``
  and by ``ratio_z`` binomial standard deviations. No verdict before
  ``ratio_min_history`` calls have left the window.
- ``result_size``: log2 of the result bytes of ``ok`` results; the baseline
  is the median and MAD of the last ``size_history``. A result deviates when it
  is at least ``size_min_bytes`` and over ``median + size_z * max(1.4826 * MAD,
  0.5)`` (so never under 2**(0.5 * size_z) times the median).
- ``first_use``: the first completed call of a tool by a principal who has
  already made ``first_use_min_calls`` calls (so a quiet start does not alert).
  Flagged once per (principal, tool), ever: first uses are kept in the state.

One anomaly is open per (principal, tool, metric) at a time; a deviation seen
again while it is open only moves its ``last_seen``. An open anomaly not seen
for ``quiet_seconds`` is resolved by the detector (``by: "quiet-period"``).
Calls the policy denied because of an open anomaly (a reason ``anomaly.*``)
feed no baseline: the gate would otherwise raise the denial ratio it reacts to.

Baselines live in memory and are rebuilt after a restart (the minimum counts
hold the verdict back until then); open anomalies and first uses are in the
state file.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Final

import structlog

from callward.core._canonical import JSONValue
from callward.core.observe._events import CallEvent
from callward.core.protocols import AuditLog
from callward.policies._anomaly_state import Anomaly, AnomalyMetric, AnomalyStore

if TYPE_CHECKING:
    from callward.core.observe._metrics import Metrics

log = structlog.get_logger()

LIMIT_KINDS: Final = frozenset({"timeout", "memory_limit", "pids_limit", "output_limit",
                                "disk_limit"})
#: Rule ids with this prefix mark a denial caused by an open anomaly.
ANOMALY_REASON_PREFIX: Final = "anomaly."
QUIET_RESOLVER: Final = "quiet-period"
_MAD_TO_SIGMA: Final = 1.4826
_SWEEP_EVERY_SECONDS: Final = 1.0
_SEEN_WRITE_EVERY_SECONDS: Final = 5.0


def new_anomaly_id() -> str:
    return f"anm_{uuid.uuid4().hex[:20]}"


@dataclass(frozen=True, slots=True)
class DetectorSettings:
    """Every threshold of the detector; the module docstring says how each is used."""

    rate_bucket_seconds: float = 10.0
    rate_history_buckets: int = 60
    rate_min_history_buckets: int = 6
    rate_min_calls: int = 20
    rate_z: float = 6.0
    ratio_window: int = 20
    ratio_min_history: int = 30
    ratio_min_events: int = 5
    ratio_min_increase: float = 0.25
    ratio_z: float = 4.0
    size_history: int = 50
    size_min_history: int = 20
    size_min_bytes: int = 1024
    size_z: float = 6.0
    first_use_min_calls: int = 20
    quiet_seconds: float = 900.0

    def __post_init__(self) -> None:
        if self.rate_bucket_seconds <= 0 or self.quiet_seconds <= 0:
            raise ValueError("rate_bucket_seconds and quiet_seconds are positive")
        if not 1 <= self.rate_min_history_buckets <= self.rate_history_buckets:
            raise ValueError("rate_min_history_buckets is 1..rate_history_buckets")
        if self.ratio_window < 1 or self.size_history < self.size_min_history:
            raise ValueError("ratio_window is positive; size_history >= size_min_history")

    @classmethod
    def from_json(cls, given: Mapping[str, Any]) -> DetectorSettings:
        """
        Settings from a configuration section; counts must be whole numbers.

        Raises:
            ValueError: An unknown name, a count that is not whole, or an invalid value.
        """
        values: dict[str, Any] = {}
        for name, value in given.items():
            if name not in _FIELD_TYPES:
                raise ValueError(f"no detector setting is named {name!r}")
            if _FIELD_TYPES[name] == "int" and value != int(value):
                raise ValueError(f"{name} is a whole number")
            values[name] = int(value) if _FIELD_TYPES[name] == "int" else value
        return cls(**values)


_FIELD_TYPES: Final = {f.name: str(f.type) for f in fields(DetectorSettings)}
ANOMALY_SETTING_NAMES: Final = tuple(_FIELD_TYPES)


@dataclass(frozen=True, slots=True)
class Finding:
    """A deviation seen on one call, before it becomes (or refreshes) an anomaly."""

    metric: AnomalyMetric
    observed: float
    baseline: float
    threshold: float
    window: str
    method: str

    def evidence(self) -> dict[str, JSONValue]:
        return {"metric": self.metric, "observed": round(self.observed, 6),
                "baseline": round(self.baseline, 6), "threshold": round(self.threshold, 6),
                "window": self.window, "method": self.method}


def _median_mad(values: list[float]) -> tuple[float, float]:
    median = statistics.median(values)
    return median, statistics.median(abs(v - median) for v in values)


class _Rate:
    """Calls per fixed bucket, with the median/MAD threshold of past buckets."""

    __slots__ = ("bucket", "count", "history", "threshold")

    def __init__(self, bucket: int, keep: int) -> None:
        self.bucket = bucket
        self.count = 0
        self.history: deque[int] = deque(maxlen=keep)
        self.threshold: tuple[float, float] | None = None

    def add(self, bucket: int, settings: DetectorSettings) -> Finding | None:
        if bucket > self.bucket:
            self.history.append(self.count)
            idle = min(bucket - self.bucket - 1, self.history.maxlen or 0)
            self.history.extend([0] * idle)
            self.bucket, self.count = bucket, 0
            self.threshold = None
        self.count += 1
        if len(self.history) < settings.rate_min_history_buckets:
            return None
        if self.threshold is None:
            median, mad = _median_mad([float(c) for c in self.history])
            scale = max(_MAD_TO_SIGMA * mad, math.sqrt(median), 1.0)
            self.threshold = (median, median + settings.rate_z * scale)
        median, threshold = self.threshold
        if self.count >= settings.rate_min_calls and self.count > threshold:
            return Finding("call_rate", self.count, median, threshold,
                           f"{settings.rate_bucket_seconds:g}s",
                           f"median+{settings.rate_z:g}*MAD of {len(self.history)} buckets")
        return None


class _Ratio:
    """Share of hits in a sliding window, against the smoothed share before it."""

    __slots__ = ("before_calls", "before_hits", "window", "window_hits")

    def __init__(self, size: int) -> None:
        self.window: deque[bool] = deque(maxlen=size)
        self.window_hits = 0
        self.before_calls = 0
        self.before_hits = 0

    def add(self, hit: bool, metric: AnomalyMetric, settings: DetectorSettings
            ) -> Finding | None:
        if len(self.window) == self.window.maxlen:
            left = self.window[0]
            self.before_calls += 1
            self.before_hits += left
            self.window_hits -= left
        self.window.append(hit)
        self.window_hits += hit
        size = settings.ratio_window
        if not hit or len(self.window) < size or self.before_calls < settings.ratio_min_history:
            return None
        p0 = (self.before_hits + 1) / (self.before_calls + 2)
        share = self.window_hits / size
        deviation = settings.ratio_z * math.sqrt(p0 * (1 - p0) / size)
        threshold = p0 + max(settings.ratio_min_increase, deviation)
        if self.window_hits >= settings.ratio_min_events and share >= threshold:
            return Finding(metric, share, p0, threshold, f"last {size} calls",
                           f"binomial z>={settings.ratio_z:g} over {self.before_calls} calls")
        return None


class _Size:
    """log2 result sizes, with the median/MAD threshold of the recent ones."""

    __slots__ = ("history",)

    def __init__(self, keep: int) -> None:
        self.history: deque[float] = deque(maxlen=keep)

    def add(self, size_bytes: int, settings: DetectorSettings) -> Finding | None:
        value = math.log2(size_bytes + 1)
        finding = None
        if len(self.history) >= settings.size_min_history and size_bytes >= settings.size_min_bytes:
            median, mad = _median_mad(list(self.history))
            threshold = median + settings.size_z * max(_MAD_TO_SIGMA * mad, 0.5)
            if value > threshold:
                finding = Finding("result_size", size_bytes, 2 ** median - 1, 2 ** threshold - 1,
                                  f"last {len(self.history)} results",
                                  f"log2 median+{settings.size_z:g}*MAD")
        self.history.append(value)
        return finding


class _Baselines:
    """Everything kept for one (principal, tool)."""

    __slots__ = ("denials", "limits", "rate", "size")

    def __init__(self, bucket: int, settings: DetectorSettings) -> None:
        self.rate = _Rate(bucket, settings.rate_history_buckets)
        self.denials = _Ratio(settings.ratio_window)
        self.limits = _Ratio(settings.ratio_window)
        self.size = _Size(settings.size_history)


class AnomalyDetector:
    """
    Watches finished calls and records deviations. Satisfies ``CallObserver``.

    Args:
        state: Where open anomalies and first uses are kept (and the policy reads them).
        audit: Where ``anomaly.detected`` / ``anomaly.resolved`` are signed.
        clock: Seconds since the epoch, injected so tests replay traffic without sleeping.
        metrics: Counts detections for the Prometheus endpoint.

    The constructor does no I/O; the state is read on the first call.
    """

    def __init__(
        self,
        state: AnomalyStore,
        audit: AuditLog,
        *,
        settings: DetectorSettings | None = None,
        clock: Callable[[], float] = time.time,
        new_id: Callable[[], str] = new_anomaly_id,
        metrics: Metrics | None = None,
    ) -> None:
        self.state = state
        self.settings = settings if settings is not None else DetectorSettings()
        self._audit = audit
        self._clock = clock
        self._new_id = new_id
        self._metrics = metrics
        self._lock = threading.Lock()
        self._baselines: dict[tuple[str, str], _Baselines] = {}
        self._open: dict[tuple[str, str, str], Anomaly] = {}
        self._seen_written: dict[str, float] = {}
        self._first_uses: dict[tuple[str, str], int] | None = None
        self._principal_calls: dict[str, int] = {}
        self._next_sweep = 0.0

    @property
    def open_count(self) -> int:
        return len(self._open)

    def _load(self) -> dict[tuple[str, str], int]:
        if self._first_uses is None:
            self._first_uses = self.state.first_uses()
            for (principal, _), calls in self._first_uses.items():
                self._principal_calls[principal] = max(
                    self._principal_calls.get(principal, 0), calls + 1)
            for anomaly in self.state.all_open():
                self._open[(anomaly.principal, anomaly.tool, anomaly.metric)] = anomaly
        return self._first_uses

    def observe(self, event: CallEvent) -> None:
        """
        Update the baselines with one call and record what deviates.

        Raises:
            AnomalyStateUnavailable: The state file failed (the gateway logs it and goes on).
            AuditUnavailable: A record could not be written (likewise).
        """
        if event.record_kind == "call.rejected" or not event.tool:
            return
        now = self._clock()
        with self._lock:
            first_uses = self._load()
            self.sweep(now)
            if any(r.startswith(ANOMALY_REASON_PREFIX) for r in event.reasons):
                return
            for finding in self._findings(event, now, first_uses):
                self._raise(event, finding, now)

    def _findings(self, event: CallEvent, now: float,
                  first_uses: dict[tuple[str, str], int]) -> list[Finding]:
        settings = self.settings
        key = (event.principal, event.tool)
        bucket = int(now // settings.rate_bucket_seconds)
        baselines = self._baselines.get(key)
        if baselines is None:
            baselines = self._baselines[key] = _Baselines(bucket, settings)
        found = [baselines.rate.add(bucket, settings),
                 baselines.denials.add(event.denied, "denial_ratio", settings)]
        if not event.denied:
            found.append(baselines.limits.add(event.outcome in LIMIT_KINDS, "limits_tripped",
                                              settings))
            if event.outcome == "ok":
                found.append(baselines.size.add(event.result_bytes, settings))
            calls = self._principal_calls.get(event.principal, 0)
            if key not in first_uses:
                first_uses[key] = calls
                self.state.add_first_use(event.principal, event.tool, now, calls)
                if calls >= settings.first_use_min_calls:
                    found.append(Finding("first_use", 1, 0, 0, "ever",
                                         f"after {calls} calls on other tools"))
            self._principal_calls[event.principal] = calls + 1
        return [f for f in found if f is not None]

    def _raise(self, event: CallEvent, finding: Finding, now: float) -> None:
        key = (event.principal, event.tool, finding.metric)
        current = self._open.get(key)
        if current is not None and now - self._seen_written.get(current.id, 0.0) >= \
                _SEEN_WRITE_EVERY_SECONDS:
            # Now and then, ask the state: an operator may have resolved it meanwhile.
            stored = self.state.get(current.id)
            if stored is None or stored.status != "open":
                del self._open[key]
                current = None
            else:
                self.state.seen(current.id, now)
                self._seen_written[current.id] = now
        if current is not None:
            self._open[key] = replace(current, last_seen=now)
            return
        anomaly = Anomaly(id=self._new_id(), principal=event.principal, tool=event.tool,
                          metric=finding.metric, evidence=finding.evidence(), detected_at=now,
                          last_seen=now)
        # Evidence first: an anomaly the policy acts on always has its signed record.
        record = self._audit.append("anomaly.detected", {
            "anomaly_id": anomaly.id, "principal": anomaly.principal, "tool": anomaly.tool,
            **finding.evidence(), "call_id": event.call_id, "call_seq": event.seq,
            "detected_at": now})
        self.state.add(anomaly)
        self._open[key] = anomaly
        self._seen_written[anomaly.id] = now
        if self._metrics is not None:
            self._metrics.anomalies_detected.labels(finding.metric).inc()
        log.warning("anomaly_detected", anomaly_id=anomaly.id, metric=finding.metric,
                    principal=anomaly.principal, tool=anomaly.tool, seq=record.seq)

    def sweep(self, now: float) -> None:
        """Resolve the open anomalies quiet for ``quiet_seconds`` (at most once a second)."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + _SWEEP_EVERY_SECONDS
        for key, anomaly in list(self._open.items()):
            if now - anomaly.last_seen >= self.settings.quiet_seconds:
                resolve(self.state, self._audit, anomaly.id, by=QUIET_RESOLVER, now=now)
                del self._open[key]
                self._seen_written.pop(anomaly.id, None)

    def forget(self, anomaly_id: str) -> None:
        """Drop an anomaly resolved elsewhere (an operator) from the open set."""
        with self._lock:
            for key, anomaly in list(self._open.items()):
                if anomaly.id == anomaly_id:
                    del self._open[key]


#: The longest resolution reason recorded, in characters (a longer one is cut).
MAX_REASON_CHARS: Final = 2000


def resolve(state: AnomalyStore, audit: AuditLog, anomaly_id: str, *, by: str,
            now: float, reason: str | None = None) -> Anomaly | None:
    """
    Close an open anomaly and sign ``anomaly.resolved``; a ``reason`` (why it is
    resolved, cut to ``MAX_REASON_CHARS``) is part of that record.

    Returns:
        The resolved anomaly, or None when none with that id is open (nothing written).

    Raises:
        AnomalyStateUnavailable: The state cannot be read or written.
        AuditUnavailable: The record is not durable; the anomaly stays open.
    """
    anomaly = state.get(anomaly_id)
    if anomaly is None or anomaly.status != "open":
        return None
    # The record first: an anomaly is never closed without its signed resolution.
    body: dict[str, JSONValue] = {
        "anomaly_id": anomaly.id, "principal": anomaly.principal, "tool": anomaly.tool,
        "metric": anomaly.metric, "by": by[:256], "detected_at": anomaly.detected_at,
        "last_seen": anomaly.last_seen, "resolved_at": now}
    if reason is not None:
        body["reason"] = reason[:MAX_REASON_CHARS]
    audit.append("anomaly.resolved", body)
    resolved = state.resolve(anomaly_id, by=by, at=now)
    log.info("anomaly_resolved", anomaly_id=anomaly.id, by=by)
    return resolved if resolved is not None else anomaly
