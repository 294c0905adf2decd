"""
The console's charts, drawn on the server as SVG: calls over time by kind, denials by
rule, latency per stage. No script draws them and no style attribute colours them (the
CSP forbids inline style); bars are ``<rect>`` elements with a class.

The per-stage latencies are ``callward stats``'s own summary (``stats_from_records``,
handed in by the command line, which owns it), so the chart and the command agree.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from callward.core._canonical import JSONValue
from callward.core.types import AuditRecord

#: ``(ts, kind, body)`` of records → ``callward stats``'s summary.
StatsFunction = Callable[[Iterable[tuple[str, str, Mapping[str, JSONValue]]]],
                         Mapping[str, JSONValue]]

CALL_KINDS: Final = ("call.authorized", "call.denied", "call.rejected")
BUCKETS: Final = 24
WIDTH: Final = 720
HEIGHT: Final = 160
MAX_RULES: Final = 10
#: The longest horizontal bar, leaving room for its name before and its label after.
_BAR_SPAN: Final = WIDTH - 460


@dataclass(frozen=True, slots=True)
class Bar:
    """One rectangle: where it is, its class (its colour) and what it says on hover."""

    x: float
    y: float
    width: float
    height: float
    css_class: str
    title: str


@dataclass(frozen=True, slots=True)
class Chart:
    """One chart: its bars and its axis labels."""

    bars: tuple[Bar, ...]
    labels: tuple[tuple[float, float, str], ...]
    width: int
    height: int
    empty: bool


def _epoch(ts: str) -> float:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def calls_over_time(records: list[AuditRecord]) -> Chart:
    """Decided calls per time bucket, stacked by kind (authorized, denied, rejected)."""
    calls = [(r.ts, r.kind) for r in records if r.kind in CALL_KINDS]
    if not calls:
        return Chart((), (), WIDTH, HEIGHT, True)
    start, end = _epoch(calls[0][0]), _epoch(calls[-1][0])
    span = max(end - start, 1.0)
    counts: list[Counter[str]] = [Counter() for _ in range(BUCKETS)]
    for ts, kind in calls:
        index = min(BUCKETS - 1, int((_epoch(ts) - start) / span * BUCKETS))
        counts[index][kind] += 1
    tallest = max(sum(c.values()) for c in counts)
    slot = WIDTH / BUCKETS
    bars = []
    for index, counter in enumerate(counts):
        top = float(HEIGHT - 20)
        for kind in CALL_KINDS:
            if counter[kind]:
                height = counter[kind] / tallest * (HEIGHT - 30)
                top -= height
                bars.append(Bar(index * slot + 2, top, slot - 4, height,
                                "bar-" + kind.replace(".", "-"),
                                f"{counter[kind]} {kind}"))
    labels = ((0.0, float(HEIGHT - 4), calls[0][0][:19].replace("T", " ")),
              (WIDTH - 150.0, float(HEIGHT - 4), calls[-1][0][:19].replace("T", " ")))
    return Chart(tuple(bars), labels, WIDTH, HEIGHT, False)


def _horizontal(values: list[tuple[str, float, str]], css_class: str) -> Chart:
    if not values:
        return Chart((), (), WIDTH, 40, True)
    largest = max(value for _, value, _ in values) or 1.0
    row = 22
    bars = tuple(Bar(220.0, index * row + 4.0, max(1.0, value / largest * _BAR_SPAN),
                     row - 8.0, css_class, text)
                 for index, (_, value, text) in enumerate(values))
    labels = tuple(label for index, (name, value, text) in enumerate(values)
                   for label in ((0.0, index * row + 16.0, name[:32]),
                                 (225.0 + value / largest * _BAR_SPAN, index * row + 16.0,
                                  text)))
    return Chart(bars, labels, WIDTH, len(values) * row + 8, False)


def denials_by_rule(records: list[AuditRecord]) -> Chart:
    """The rules that denied most often (a proposal's id is not a rule)."""
    rules: Counter[str] = Counter()
    for record in records:
        if record.kind != "call.denied":
            continue
        decision = record.body.get("decision")
        reasons = decision.get("reasons") if isinstance(decision, Mapping) else None
        for reason in reasons if isinstance(reasons, list) else ():
            if isinstance(reason, str) and not reason.startswith("proposal."):
                rules[reason] += 1
    return _horizontal([(rule, float(n), str(n)) for rule, n in rules.most_common(MAX_RULES)],
                       "bar-call-denied")


def latency_per_stage(records: list[AuditRecord], stats: StatsFunction | None) -> Chart:
    """p50 per stage (the p99 in the label), from ``callward stats``'s summary."""
    if stats is None:
        return Chart((), (), WIDTH, 40, True)
    summary = stats((r.ts, r.kind, r.body) for r in records)
    stages = summary.get("stages")
    values = []
    for stage, row in (stages.items() if isinstance(stages, Mapping) else ()):
        if isinstance(row, Mapping) and isinstance(row.get("p50_ms"), int | float):
            p50, p99 = float(row["p50_ms"]), row.get("p99_ms")  # type: ignore[arg-type]
            values.append((stage, p50, f"p50 {p50:g} ms, p99 {p99} ms, n={row.get('n')}"))
    return _horizontal(values, "bar-stage")


__all__ = ["Bar", "Chart", "StatsFunction", "calls_over_time", "denials_by_rule",
           "latency_per_stage"]
