"""Small helpers shared by the benchmarks: logging, percentiles and a printed table."""

from __future__ import annotations

import logging
import statistics
import sys
from collections.abc import Sequence

import structlog


def configure_logging() -> None:
    """Log as the CLI does by default: JSON on stderr, warnings and above only."""
    structlog.configure(
        processors=[structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile (fraction in [0, 1]) of the values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[index]


def summarize(values_ms: Sequence[float]) -> tuple[float, float, float]:
    """p50, p99 and mean, in milliseconds."""
    return percentile(values_ms, 0.50), percentile(values_ms, 0.99), statistics.fmean(values_ms)


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [list(map(str, header))] + [
        [f"{value:.3f}" if isinstance(value, float) else str(value) for value in row]
        for row in rows
    ]
    widths = [max(len(row[column]) for row in cells) for column in range(len(header))]
    print(f"\n{title}")
    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    print(line(cells[0]))
    print("|" + "|".join("-" * (width + 2) for width in widths) + "|")
    for row in cells[1:]:
        print(line(row))
