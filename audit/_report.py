"""
A self-contained HTML page for a security review of one audit log.

Invariants:

- The verification verdict comes first, computed by ``verify`` when the page is made;
  a log that fails is still reported, under a FAILED banner naming the record.
- Everything is inline (styles, SVG charts, one small script); a Content-Security-Policy
  forbids every network fetch, so opening the page reaches nothing.
- Every value from the log is HTML-escaped: the log holds what models and tools
  wrote, and the page must not run it.
"""

from __future__ import annotations

import html
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from callward.audit._chain import parse_ts
from callward.audit._query import call_view, read_records
from callward.audit._sqlite_format import AuditSource, describe_source, resolve_source
from callward.audit.verify import verify
from callward.core._canonical import JSONValue
from callward.core.errors import VerificationFailed

LIMIT_KINDS: Final = frozenset(
    {"timeout", "memory_limit", "pids_limit", "output_limit", "disk_limit"}
)
_MAX_ROWS: Final = 500
_BAR_ROWS: Final = 15
_TIMELINE_BUCKETS: Final = 48
_CSP: Final = (
    "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"
)
_STYLE: Final = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222;max-width:70em}
.verdict{padding:1em;border-radius:6px;font-size:1.3em;font-weight:bold}
.ok{background:#e3f6e3;border:2px solid #2a8a2a}.failed{background:#fbe3e3;border:2px solid #b22}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:2px 8px;
text-align:left;vertical-align:top}svg{display:block;margin:.5em 0 1.5em}
.charts{display:flex;flex-wrap:wrap;gap:2em}
"""
_SCRIPT: Final = (
    "document.documentElement.dataset.charts="
    "String(document.querySelectorAll('svg.chart').length);"
)


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _bar_chart(title: str, counts: Counter[str], chart_id: str) -> str:
    rows = counts.most_common(_BAR_ROWS)
    width, bar_x, row_height = 460, 160, 22
    height = row_height * max(len(rows), 1) + 30
    top = max((n for _, n in rows), default=1)
    parts = [
        f'<svg class="chart" id="{chart_id}" role="img" aria-label="{_e(title)}" '
        f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">',
        f'<text x="0" y="14" font-weight="bold">{_e(title)}</text>',
    ]
    for i, (label, n) in enumerate(rows):
        y = 24 + i * row_height
        bar = max(1, round((width - bar_x - 50) * n / top))
        parts.append(
            f'<text x="0" y="{y + 14}" font-size="12">{_e(label[:24])}</text>'
            f'<rect x="{bar_x}" y="{y}" width="{bar}" height="16" fill="#4a78b5">'
            f"<title>{_e(label)}: {n}</title></rect>"
            f'<text x="{bar_x + bar + 4}" y="{y + 13}" font-size="12">{n}</text>'
        )
    if not rows:
        parts.append('<text x="0" y="40" font-size="12">none</text>')
    parts.append("</svg>")
    return "".join(parts)


def _timeline(minutes: Counter[int]) -> str:
    width, height = 900, 140
    parts = [
        f'<svg class="chart" id="timeline" role="img" aria-label="records over time" '
        f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">',
        '<text x="0" y="14" font-weight="bold">Records over time (UTC)</text>',
    ]
    if minutes:
        first, last = min(minutes), max(minutes)
        span = max(1, last - first + 1)
        buckets = [0] * _TIMELINE_BUCKETS
        for minute, n in minutes.items():
            buckets[min(_TIMELINE_BUCKETS - 1, (minute - first) * _TIMELINE_BUCKETS // span)] += n
        top = max(buckets) or 1
        step = width / _TIMELINE_BUCKETS
        for i, n in enumerate(buckets):
            bar = round((height - 40) * n / top)
            parts.append(
                f'<rect x="{i * step:.1f}" y="{height - 20 - bar}" width="{step - 1:.1f}" '
                f'height="{bar}" fill="#b5834a"><title>{n} records</title></rect>'
            )
        parts.append(
            f'<text x="0" y="{height - 4}" font-size="11">{_e(_minute_text(first))}</text>'
            f'<text x="{width - 130}" y="{height - 4}" font-size="11">'
            f"{_e(_minute_text(last))}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _minute_text(minute: int) -> str:
    from datetime import UTC, datetime  # noqa: PLC0415 - only for the two axis labels

    return datetime.fromtimestamp(minute * 60, UTC).strftime("%Y-%m-%d %H:%M")


def _table(title: str, header: Sequence[str], rows: list[list[object]], total: int) -> str:
    more = f" (first {len(rows)} of {total})" if total > len(rows) else f" ({total})"
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    if not rows:
        body = f'<tr><td colspan="{len(header)}">none</td></tr>'
    return f"<h2>{_e(title)}{_e(more)}</h2><table><tr>{head}</tr>{body}</table>"


class _Tally:
    def __init__(self) -> None:
        self.principals: Counter[str] = Counter()
        self.tools: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()
        self.minutes: Counter[int] = Counter()
        self.denials: list[list[object]] = []
        self.approvals: list[list[object]] = []
        self.limits: list[list[object]] = []
        self.counts: Counter[str] = Counter()

    def add(self, view: dict[str, JSONValue]) -> None:
        kind, outcome = str(view["kind"]), view["outcome"]
        self.minutes[int(parse_ts(str(view["ts"])).timestamp()) // 60] += 1
        if kind in ("call.authorized", "call.denied", "call.rejected"):
            self.principals[str(view["principal"] or "(none)")] += 1
            self.tools[str(view["tool"] or "(unknown)")] += 1
        if outcome is not None and kind != "call.authorized":
            self.outcomes[str(outcome)] += 1
        row = [view["seq"], view["ts"], view["principal"], view["tool"], view["call_id"]]
        if kind == "call.denied":
            self._keep("denials", self.denials, [*row, outcome, _reasons(view["reasons"])])
            if outcome == "approval_required":
                self._keep("approvals", self.approvals, [*row, kind, outcome])
        elif "approv" in kind:
            self._keep("approvals", self.approvals, [*row, kind, outcome])
        if outcome in LIMIT_KINDS:
            self._keep("limits", self.limits, [*row, outcome])

    def _keep(self, name: str, rows: list[list[object]], row: list[object]) -> None:
        self.counts[name] += 1
        if len(rows) < _MAX_ROWS:
            rows.append(row)


def _reasons(value: JSONValue) -> str:
    return ", ".join(str(r) for r in value) if isinstance(value, list) else ""


def render_report(
    db_path_or_url: AuditSource,
    public_keys: Iterable[Ed25519PublicKey],
    *,
    witnesses: Sequence[Path] = (),
) -> str:
    """
    The review page for the log at ``db_path_or_url`` (an ``audit.db`` or a fleet's
    store), verified with ``public_keys``.

    Raises:
        ConfigurationError: The file is not an audit database.
    """
    keys = list(public_keys)
    source = resolve_source(db_path_or_url)
    where = describe_source(source)
    title = source.name if isinstance(source, Path) else where
    try:
        verified = verify(source, keys, witnesses=witnesses)
    except VerificationFailed as exc:
        verdict = (
            '<div class="verdict failed" id="verdict">Verification FAILED'
            f"{_e(f' at record {exc.seq}' if exc.seq else '')}: {_e(exc.message)}</div>"
        )
    else:
        witnessed = (
            f", checked against {verified.witnessed} witness checkpoints" if witnesses else ""
        )
        verdict = (
            '<div class="verdict ok" id="verdict">Verification OK: '
            f"{verified.records} records, {verified.checkpoints} checkpoints, "
            f"root {_e(verified.root_hash[:16])}…, keys {_e(', '.join(verified.key_ids))}"
            f"{_e(witnessed)}"
            "</div>"
        )
    tally = _Tally()
    opened: dict[int, dict[str, JSONValue]] = {}
    total = 0
    for record in read_records(source):
        tally.add(call_view(record, opened))
        total += 1
    call_header = ["seq", "ts", "principal", "tool", "call id"]
    return "".join([
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        f"<title>callward audit report: {_e(title)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>callward audit report</h1>{verdict}",
        f"<p>Log <code>{_e(where)}</code>: {total} records.</p>",
        '<div class="charts">',
        _bar_chart("Calls per principal", tally.principals, "by-principal"),
        _bar_chart("Calls per tool", tally.tools, "by-tool"),
        _bar_chart("Outcomes", tally.outcomes, "by-outcome"),
        "</div>",
        _timeline(tally.minutes),
        _table("Denials", [*call_header, "kind", "rules"], tally.denials,
               tally.counts["denials"]),
        _table("Approvals", [*call_header, "record", "outcome"], tally.approvals,
               tally.counts["approvals"]),
        _table("Limits hit", [*call_header, "kind"], tally.limits, tally.counts["limits"]),
        f"<script>{_SCRIPT}</script></body></html>",
    ])


__all__ = ["LIMIT_KINDS", "render_report"]
