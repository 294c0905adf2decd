"""
Observers of the gateway's calls: events, Prometheus metrics, anomaly detection and
OpenTelemetry traces.

Observers help an operator; they are not the audit log, and a failing observer never
changes a call's outcome.

Example::

    >>> from callward.core.observe import Metrics
    >>> metrics = Metrics()  # counts calls by tool and kind for Prometheus
"""

from callward.core.observe._anomaly import AnomalyDetector, DetectorSettings
from callward.core.observe._events import CallEvent, CallObserver, RecordObserver
from callward.core.observe._metrics import Metrics, serve_metrics
from callward.core.observe._tracing import Tracing, configure_tracing

__all__ = [
    "AnomalyDetector",
    "CallEvent",
    "CallObserver",
    "DetectorSettings",
    "Metrics",
    "RecordObserver",
    "Tracing",
    "configure_tracing",
    "serve_metrics",
]
