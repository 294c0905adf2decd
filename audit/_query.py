"""
Read records from an audit database for review (``callward audit show``), read-only:
an SQLite file, or a fleet's PostgreSQL store (its records stream from one snapshot).

Reading is not verifying: these records are what the file holds. ``verify`` says
whether the file can be trusted.
"""

from __future__ import annotations

import base64
import json
import sqlite3
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, TextIO

from callward.audit._chain import format_ts, is_record_kind, parse_ts
from callward.audit._sqlite_format import (
    AuditSource,
    ReadConnection,
    UnreadableDatabase,
    connect_read_only,
    describe_source,
    error_name,
    resolve_source,
    row_to_record,
)
from callward.core._canonical import JSONValue
from callward.core.errors import AuditUnavailable, ConfigurationError
from callward.core.types import AuditRecord

_COLUMNS = "seq, ts, kind, prev, key_id, body, record, hash, signature"


def read_records(
    db_path_or_url: AuditSource,
    *,
    start: int = 1,
    last: int | None = None,
    kind: str | None = None,
) -> Iterator[AuditRecord]:
    """
    The records of an audit database in seq order, streamed, without verifying them.

    Args:
        db_path_or_url: An ``audit.db``, or a fleet's store (``StoreUrl`` or its
            ``postgresql://`` text).
        start: The first seq to read.
        last: Only the last ``last`` records (of those from ``start`` on, of ``kind``).
        kind: Only records of this kind, e.g. ``call.denied``.

    Raises:
        ValueError: ``kind`` is not a record kind, or ``last`` is negative.
        ConfigurationError: The file is missing or is not a callward audit database
            (or the store cannot be reached or is not a fleet audit store).
        AuditUnavailable: The file failed while it was being read.
    """
    if kind is not None and not is_record_kind(kind):
        raise ValueError("a record kind is dotted lower-case, like call.completed")
    if last is not None and last < 0:
        raise ValueError("last must be zero or more")
    where = "seq >= ?"
    params: list[object] = [start]
    if kind is not None:
        where += " AND kind = ?"
        params.append(kind)
    sql = f"SELECT {_COLUMNS} FROM records WHERE {where} ORDER BY seq"  # noqa: S608 - constants
    if last is not None:
        sql = (
            f"SELECT {_COLUMNS} FROM (SELECT {_COLUMNS} FROM records WHERE {where}"  # noqa: S608
            " ORDER BY seq DESC LIMIT ?) AS tail ORDER BY seq"  # PostgreSQL 15 names it
        )
        params.append(last)
    source = resolve_source(db_path_or_url)
    try:
        conn = connect_read_only(source)
    except UnreadableDatabase as exc:
        raise ConfigurationError(
            str(exc), remediation="pass the audit.db of a callward home (--home or --db), or "
            "a fleet's store (--store postgresql://...)"
        ) from exc
    return _stream(conn, sql, tuple(params), describe_source(source))


def _stream(
    conn: ReadConnection, sql: str, params: tuple[object, ...], where: str
) -> Iterator[AuditRecord]:
    try:
        for row in conn.execute(sql, params):
            yield row_to_record(row)
    except (sqlite3.Error, ValueError) as exc:
        name = error_name(exc) if isinstance(exc, sqlite3.Error) else type(exc).__name__
        raise AuditUnavailable(f"reading {where} failed ({name})") from exc
    finally:
        conn.close()



@dataclass(frozen=True, slots=True)
class CallFilter:
    """
    Which records ``query_calls`` returns: those matching every field that is set.

    Attributes:
        kind: A record kind (``call.denied``).
        outcome: ``authorized``, ``ok``, a denial or failure kind, ``interrupted``.
        since: RFC 3339 time, inclusive. until: RFC 3339 time, exclusive.
    """

    principal: str | None = None
    tool: str | None = None
    kind: str | None = None
    outcome: str | None = None
    since: str | None = None
    until: str | None = None
    session: str | None = None
    call_id: str | None = None

    def __post_init__(self) -> None:
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _normalise_time(value, name))


def _normalise_time(value: str, name: str) -> str:
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ConfigurationError(f"--{name} {value!r} is not an RFC 3339 time") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return format_ts(moment)


def _object(value: object) -> Mapping[str, JSONValue]:
    return value if isinstance(value, Mapping) else {}


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def call_view(record: AuditRecord, opened: dict[int, dict[str, JSONValue]]) -> dict[str, JSONValue]:
    """
    One record as a reviewer reads it: who, which tool, which call, how it ended.

    ``opened`` maps the seq of each ``call.authorized`` still open to its view, so a
    ``call.completed`` can name the principal and tool of the call it ends; it is
    updated here (bounded by the calls in flight, not by the log).
    """
    body = _object(record.body)
    call = _object(body.get("call"))
    decision = _object(body.get("decision"))
    view: dict[str, JSONValue] = {
        "seq": record.seq,
        "ts": record.ts,
        "kind": record.kind,
        "call_id": _text(call.get("id")) or _text(body.get("call_id")),
        "principal": _text(body.get("principal")),
        "session_id": _text(body.get("session_id")),
        "tool": _text(call.get("name")),
        "outcome": None,
        "reasons": None,
    }
    if record.kind == "call.authorized":
        view["outcome"] = "authorized"
        opened[record.seq] = view
    elif record.kind == "call.denied":
        view["outcome"] = _text(decision.get("kind")) or "permission"
        view["reasons"] = decision.get("reasons")
    elif record.kind == "call.rejected":
        view["outcome"] = _text(body.get("kind")) or "malformed"
    elif record.kind in ("call.completed", "call.interrupted"):
        seq = body.get("authorized_seq")
        start = opened.pop(seq, {}) if isinstance(seq, int) else {}
        for name in ("principal", "session_id", "tool"):
            view[name] = start.get(name)
        view["outcome"] = _text(body.get("outcome")) or "interrupted"
    return view


def _matches(view: dict[str, JSONValue], selected: CallFilter) -> bool:
    ts = str(view["ts"])
    return (
        (selected.principal is None or view["principal"] == selected.principal)
        and (selected.tool is None or view["tool"] == selected.tool)
        and (selected.kind is None or view["kind"] == selected.kind)
        and (selected.outcome is None or view["outcome"] == selected.outcome)
        and (selected.session is None or view["session_id"] == selected.session)
        and (selected.call_id is None or view["call_id"] == selected.call_id)
        and (selected.since is None or ts >= selected.since)
        and (selected.until is None or ts < selected.until)
    )


def query_calls(
    db_path_or_url: AuditSource, selected: CallFilter
) -> Iterator[dict[str, JSONValue]]:
    """
    The records matching ``selected``, as call views (``call_view``), streamed in seq
    order, read-only and without verifying (run ``verify`` for that).

    Raises:
        ConfigurationError: The file is not an audit database, or a time is malformed.
        AuditUnavailable: The file failed while it was being read.
    """
    opened: dict[int, dict[str, JSONValue]] = {}
    for record in read_records(db_path_or_url):
        view = call_view(record, opened)
        if _matches(view, selected):
            yield view


_OCSF_CLASS_UID: Final = 6003  # API Activity
_OCSF_CATEGORY_UID: Final = 6  # Application Activity
_OCSF_OTHER: Final = 99
_OCSF_VERSION: Final = "1.3.0"


def ocsf_event(record: AuditRecord, view: Mapping[str, JSONValue]) -> dict[str, JSONValue]:
    """
    One record as an OCSF API Activity event (class 6003): the tool call is the API
    operation, the principal the actor; the full signed record rides in ``unmapped``.
    """
    outcome = view["outcome"]
    failed = outcome not in (None, "ok", "authorized")
    instant = parse_ts(record.ts)
    return {
        "class_uid": _OCSF_CLASS_UID,
        "class_name": "API Activity",
        "category_uid": _OCSF_CATEGORY_UID,
        "category_name": "Application Activity",
        "activity_id": _OCSF_OTHER,
        "activity_name": record.kind,
        "type_uid": _OCSF_CLASS_UID * 100 + _OCSF_OTHER,
        "type_name": f"API Activity: {record.kind}",
        "time": int(instant.timestamp() * 1000),
        "time_dt": record.ts,
        "severity_id": 3 if failed else 1,
        "severity": "Medium" if failed else "Informational",
        "status_id": 2 if failed else (1 if outcome is not None else 0),
        "status": "Failure" if failed else ("Success" if outcome is not None else "Unknown"),
        "status_detail": outcome,
        "message": f"{record.kind} {view['tool'] or ''}".strip(),
        "metadata": {
            "version": _OCSF_VERSION,
            "product": {"name": "callward", "vendor_name": "callward"},
            "uid": record.record_hash,
            "sequence": record.seq,
            "correlation_uid": view["call_id"],
            "log_name": "callward audit log",
        },
        "actor": {
            "user": {"name": view["principal"], "type": "User"},
            "session": {"uid": view["session_id"]},
        },
        "api": {
            "operation": view["tool"] or record.kind,
            "request": {"uid": view["call_id"]},
            "response": {"error": outcome if failed else None},
        },
        "src_endpoint": {"svc_name": "callward-gateway"},
        "unmapped": {
            "seq": record.seq,
            "prev": record.prev,
            "key_id": record.key_id,
            "signature": base64.b64encode(record.signature).decode(),
            "reasons": view["reasons"],
            "body": record.body,
        },
    }


def export_records(db_path_or_url: AuditSource, out: TextIO, *, format: str = "jsonl") -> int:
    """
    Write every record to ``out``, one JSON object per line, and return how many.

    Args:
        format: ``jsonl`` (each record with its hash, key id and signature) or
            ``ocsf`` (OCSF API Activity events).

    Raises:
        ValueError: An unknown format.
        ConfigurationError: The file is not an audit database.
    """
    if format not in ("jsonl", "ocsf"):
        raise ValueError("the export format is jsonl or ocsf")
    opened: dict[int, dict[str, JSONValue]] = {}
    count = 0
    for record in read_records(db_path_or_url):
        view = call_view(record, opened)
        if format == "ocsf":
            line: dict[str, JSONValue] = ocsf_event(record, view)
        else:
            line = {
                "seq": record.seq, "ts": record.ts, "kind": record.kind, "prev": record.prev,
                "hash": record.record_hash, "key_id": record.key_id,
                "signature": base64.b64encode(record.signature).decode(), "body": record.body,
            }
        out.write(json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n")
        count += 1
    return count


__all__ = ["CallFilter", "call_view", "export_records", "ocsf_event", "query_calls", "read_records"]
