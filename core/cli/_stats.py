"""
``callward stats`` and ``callward anomalies …``: where the time goes, and what deviates.

``stats`` reads the stage timings from an audit log (offline, any log: the
``durations_ms`` of ``call.completed``/``call.denied`` and the ``duration_ms``
of ``model.turn``), or from a live process's Prometheus endpoint (``--url``),
and prints p50/p99 per stage and per tool. From a log the quantiles are exact
(nearest rank); from an endpoint they are interpolated inside histogram
buckets, as Prometheus's ``histogram_quantile`` does.
"""

from __future__ import annotations

import argparse
import math
import re
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Final

from callward.core._canonical import JSONValue
from callward.core.cli._audit import add_store_options, audit_source, source_name
from callward.core.cli._common import (
    EXIT_CHECK_FAILED,
    EXIT_OK,
    Subcommands,
    config_options,
    config_path,
    print_json,
    subcommand_options,
)
from callward.core.errors import ConfigurationError
from callward.core.gateway._config import Home, load_config
from callward.core.observe._metrics import STAGES, UNKNOWN_TOOL_LABEL

if TYPE_CHECKING:
    from callward.policies._anomaly_state import AnomalyStore

QUANTILES: Final = (0.5, 0.99)
_RELATIVE: Final = re.compile(r"\A(\d+(?:\.\d+)?)([smhd])\Z")
_UNIT_SECONDS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SCRAPE_TIMEOUT_SECONDS: Final = 10.0
_MAX_SCRAPE_BYTES: Final = 16 << 20


def since_moment(value: str, *, now: datetime | None = None) -> datetime:
    """
    ``--since``: an RFC 3339 time, or an age such as ``90s``, ``15m``, ``2h``, ``7d``.

    Raises:
        ConfigurationError: Neither.
    """
    relative = _RELATIVE.match(value)
    if relative is not None:
        seconds = float(relative.group(1)) * _UNIT_SECONDS[relative.group(2)]
        return (now or datetime.now(UTC)) - timedelta(seconds=seconds)
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ConfigurationError(f"--since {value!r} is neither an RFC 3339 time nor an age "
                                 "like 15m", remediation="e.g. --since 1h") from exc
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def nearest_rank(sorted_values: list[float], q: float) -> float:
    """The q-quantile of sorted values by nearest rank (an observed value)."""
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def _summary(samples: Mapping[str, list[float]]) -> dict[str, dict[str, JSONValue]]:
    table: dict[str, dict[str, JSONValue]] = {}
    for name, values in samples.items():
        ordered = sorted(values)
        table[name] = {"n": len(ordered),
                       **{f"p{round(q * 100)}_ms": round(nearest_rank(ordered, q), 3)
                          for q in QUANTILES},
                       "max_ms": round(ordered[-1], 3)}
    return table


def _number(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _queue_ms(durations: Mapping[str, JSONValue], usage: JSONValue) -> float | None:
    """The sandbox stage minus the tool's own run time, as the gateway's metrics count it."""
    sandbox = _number(durations.get("sandbox"))
    wall = _number(usage.get("wall_ms")) if isinstance(usage, Mapping) else None
    return None if sandbox is None or wall is None else round(max(0.0, sandbox - wall), 3)


def _stage_order(item: tuple[str, object]) -> tuple[int, str]:
    """Stages in the order a call meets them; any others after, by name."""
    name = item[0]
    return (STAGES.index(name) if name in STAGES else len(STAGES), name)


def _tool_of(kind: str, body: Mapping[str, JSONValue]) -> str:
    tool = body.get("tool")
    if kind == "call.completed" and isinstance(tool, str):
        return tool
    if isinstance(tool, Mapping) and isinstance(tool.get("ref"), str):
        return str(tool["ref"])
    return UNKNOWN_TOOL_LABEL


def _outcome_of(kind: str, body: Mapping[str, JSONValue]) -> str:
    if kind == "call.completed":
        return str(body.get("outcome"))
    decision = body.get("decision")
    return str(decision.get("kind")) if isinstance(decision, Mapping) else "permission"


def stats_from_records(records: Iterable[tuple[str, str, Mapping[str, JSONValue]]],
                       since: datetime | None = None) -> dict[str, JSONValue]:
    """
    Per-stage and per-tool p50/p99 from ``(ts, kind, body)`` of audit records.

    A tool's time is the sum of a call's stages (``queue`` is inside ``sandbox``).
    """
    stages: dict[str, list[float]] = defaultdict(list)
    tools: dict[str, list[float]] = defaultdict(list)
    outcomes: Counter[str] = Counter()
    first = last = None
    for ts, kind, body in records:
        if since is not None and datetime.fromisoformat(ts.replace("Z", "+00:00")) < since:
            continue
        if kind == "model.turn":
            duration = _number(body.get("duration_ms"))
            if duration is not None:
                stages["model"].append(duration)
            continue
        if kind not in {"call.completed", "call.denied"}:
            continue
        first = first or ts
        last = ts
        durations = body.get("durations_ms")
        total = 0.0
        if isinstance(durations, Mapping):
            for stage, value in durations.items():
                ms = _number(value)
                if ms is not None:
                    stages[stage].append(ms)
                    total += ms if stage != "queue" else 0.0
            queue = _queue_ms(durations, body.get("usage"))
            if queue is not None and "queue" not in durations:
                stages["queue"].append(queue)
        tools[_tool_of(kind, body)].append(total)
        outcomes[_outcome_of(kind, body)] += 1
    return {"calls": sum(outcomes.values()), "first_ts": first, "last_ts": last,
            "stages": _summary(dict(sorted(stages.items(), key=_stage_order))),
            "tools": _summary(dict(sorted(tools.items()))),
            "outcomes": dict(sorted(outcomes.items()))}


def _histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus's ``histogram_quantile`` over cumulative ``(le, count)`` buckets."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_le, lower_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return lower_le
            width = count - lower_count
            share = 0.0 if width <= 0 else (rank - lower_count) / width
            return lower_le + (le - lower_le) * share
        lower_le, lower_count = le, count
    return buckets[-1][0]


def stats_from_exposition(text: str) -> dict[str, JSONValue]:
    """The same summary from a scraped Prometheus text exposition of ``Metrics``."""
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    histograms: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(
        lambda: defaultdict(list))
    outcomes: dict[str, JSONValue] = {}
    open_anomalies: JSONValue = None
    families = {"callward_stage_seconds": "stage", "callward_tool_call_seconds": "tool"}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if family.name in families and sample.name.endswith("_bucket"):
                label = sample.labels[families[family.name]]
                histograms[family.name][label].append(
                    (float(sample.labels["le"]), float(sample.value)))
            elif family.name == "callward_calls" and sample.name.endswith("_total"):
                outcomes[sample.labels["outcome"]] = int(sample.value)
            elif family.name == "callward_anomalies_open":
                open_anomalies = int(sample.value)

    def table(name: str) -> dict[str, JSONValue]:
        rows: dict[str, JSONValue] = {}
        for label, buckets in sorted(histograms[name].items()):
            count = max(c for _, c in buckets)
            if count <= 0:
                continue
            row: dict[str, JSONValue] = {"n": int(count)}
            for q in QUANTILES:
                value = _histogram_quantile(q, buckets)
                row[f"p{round(q * 100)}_ms"] = None if value is None else round(value * 1000, 3)
            rows[label] = row
        return rows

    return {"calls": sum(int(v) for v in outcomes.values() if isinstance(v, int)),
            "stages": table("callward_stage_seconds"),
            "tools": table("callward_tool_call_seconds"),
            "outcomes": dict(sorted(outcomes.items())), "anomalies_open": open_anomalies}


def scrape(url: str) -> str:
    """
    Raises:
        ConfigurationError: Not an http(s) URL, or the endpoint did not answer.
    """
    if not url.startswith(("http://", "https://")):
        raise ConfigurationError(f"--url {url!r} is not an http(s) URL")
    try:
        with urllib.request.urlopen(url, timeout=_SCRAPE_TIMEOUT_SECONDS) as response:  # noqa: S310 - scheme checked above
            return bytes(response.read(_MAX_SCRAPE_BYTES)).decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"the metrics endpoint {url} did not answer "
                                 f"({type(exc).__name__})") from exc


def _print_table(summary: Mapping[str, JSONValue]) -> None:
    for section, title in (("stages", "stage"), ("tools", "tool")):
        rows = summary.get(section)
        if not isinstance(rows, Mapping):
            continue
        print(f"{title:<28} {'n':>8} {'p50 ms':>10} {'p99 ms':>10}")
        for name, row in rows.items():
            if isinstance(row, Mapping):
                p50, p99 = row.get("p50_ms"), row.get("p99_ms")
                print(f"{name[:28]:<28} {row.get('n')!s:>8} "
                      f"{'-' if p50 is None else p50:>10} {'-' if p99 is None else p99:>10}")
        print()
    outcomes = summary.get("outcomes")
    if isinstance(outcomes, Mapping):
        print("outcomes: " + ", ".join(f"{k}={v}" for k, v in outcomes.items()))


def _stats(args: argparse.Namespace, home: Home) -> int:
    if args.url:
        summary = {"source": args.url, **stats_from_exposition(scrape(args.url))}
    else:
        from callward.audit import read_records  # noqa: PLC0415 - the CLI edge loads the stage

        db = audit_source(args, home, option="log")
        if isinstance(db, Path) and not db.is_file():
            raise ConfigurationError(f"no audit log at {db}",
                                     remediation="pass --log PATH or --store URL")
        since = since_moment(args.since) if args.since else None
        records = ((r.ts, r.kind, r.body) for r in read_records(db))
        summary = {"source": source_name(db), **stats_from_records(records, since)}
    if args.json:
        print_json(summary)
    else:
        _print_table(summary)
    return EXIT_OK


# -- anomalies ------------------------------------------------------------------


def _anomaly_state(args: argparse.Namespace, home: Home) -> AnomalyStore:
    """The open anomalies: the home's file, or the fleet's store."""
    from callward.core.gateway._stores import anomaly_state_for  # noqa: PLC0415

    return anomaly_state_for(load_config(config_path(args, home)), home)


def _anomalies_list(args: argparse.Namespace, home: Home) -> int:
    state = _anomaly_state(args, home)
    try:
        listed = state.listing(status=None if args.all else "open")
    finally:
        state.close()
    print_json([anomaly.to_json() for anomaly in listed])
    return EXIT_OK


def _anomalies_resolve(args: argparse.Namespace, home: Home) -> int:
    from callward.core.gateway._stores import audit_store_for  # noqa: PLC0415
    from callward.core.observe._anomaly import resolve  # noqa: PLC0415

    state = _anomaly_state(args, home)
    # The resolution is signed into the log the gateways write (the fleet's, with a store).
    store = audit_store_for(load_config(config_path(args, home)), home)
    store.open()
    try:
        resolved = resolve(state, store, args.id, by=args.by, now=time.time(),
                           reason=args.reason)
    finally:
        store.close()
        state.close()
    if resolved is None:
        print_json({"ok": False, "anomaly": args.id, "message": "no open anomaly has that id"})
        return EXIT_CHECK_FAILED
    print_json({"ok": True, **resolved.to_json()})
    return EXIT_OK


def add_commands(commands: Subcommands) -> None:
    """Add ``stats`` and ``anomalies list|resolve``."""
    stats = commands.add_parser("stats", parents=[subcommand_options()],
                                help="p50/p99 per stage and per tool, from the log or --url")
    stats.add_argument("--log", help="audit database, or a fleet's postgresql:// store URL "
                                     "(default: the configuration's store, else HOME/audit.db)")
    add_store_options(stats)
    stats.add_argument("--url", help="a live process's metrics endpoint, e.g. "
                                     "http://127.0.0.1:9464/metrics")
    stats.add_argument("--since", help="only records since an RFC 3339 time or an age (15m)")
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    stats.set_defaults(handler=_stats)

    anomalies = commands.add_parser("anomalies", help="detected anomalies")
    sub = anomalies.add_subparsers(dest="anomalies_command", required=True, metavar="COMMAND")
    listing = sub.add_parser("list", parents=[subcommand_options(), config_options()],
                             help="open anomalies (--all: resolved ones too)")
    listing.add_argument("--all", action="store_true")
    listing.set_defaults(handler=_anomalies_list)
    resolve = sub.add_parser("resolve", parents=[subcommand_options(), config_options()],
                             help="close an open anomaly (audited as anomaly.resolved)")
    resolve.add_argument("id")
    resolve.add_argument("--by", required=True, help="who resolves it")
    resolve.add_argument("--reason", help="why it is resolved (kept in anomaly.resolved)")
    resolve.set_defaults(handler=_anomalies_resolve)
