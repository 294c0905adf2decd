"""
The audit record format, defined once: what is hashed, what is signed, how records chain.

A record's bytes are the RFC 8785 encoding of::

    {"body": {...}, "key_id": "<16 hex>", "kind": "call.completed",
     "prev": "<64 hex>", "seq": 7, "ts": "2026-11-25T08:00:00.123456Z"}

Invariants:

- ``record_hash`` is SHA-256 over exactly those bytes, and ``signature`` is Ed25519
  over exactly those bytes; nothing else is hashed or signed.
- ``seq`` starts at 1 and grows by exactly 1; ``prev`` is the previous record's hash,
  ``GENESIS_PREV`` for seq 1. Removing, inserting or reordering a record therefore
  breaks the chain at the first record after the change.
- ``ts`` is RFC 3339 UTC with microseconds, fixed width, so text order is time order,
  and it never goes backwards along the chain.
- A record never exceeds ``MAX_RECORD_BYTES``, so a verifier can bound what it reads.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Final, NoReturn

import structlog
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from callward.audit.signer import Signer
from callward.core._canonical import (
    STRICT_DECODER,
    JSONValue,
    Sha256Hex,
    canonical_bytes,
    sha256_hex,
)
from callward.core.errors import VerificationFailed
from callward.core.types import AuditRecord, KeyId

log = structlog.get_logger()

#: A ts this much before the head's is the clock going backwards, not a writer that
#: waited for the lock (``held_at_head``).
CLOCK_STEP_BACK_SECONDS: Final = 1.0

GENESIS_PREV: Final = Sha256Hex("0" * 64)
MAX_RECORD_BYTES: Final = 4 << 20
RECORD_FIELDS: Final = frozenset({"body", "key_id", "kind", "prev", "seq", "ts"})

_KIND = re.compile(r"\A[a-z]+(\.[a-z_]+)+\Z")
_MAX_KIND_LENGTH: Final = 64
_TS = re.compile(r"\A\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z\Z")
_TS_FORMAT: Final = "%Y-%m-%dT%H:%M:%S.%fZ"
_NEEDS_NO_ESCAPE = re.compile(r"\A[0-9A-Za-z._:-]*\Z")
_MAX_SEQ: Final = 2**53 - 1
# RFC 8785 sorts members by name and "body" sorts first, so the record is this
# prefix, the body's canonical bytes, then the other five members.
_BODY_PREFIX: Final = b'{"body":'


def is_record_kind(kind: str) -> bool:
    """Kinds are dotted lower-case names: ``call.authorized``, ``call.completed``."""
    return len(kind) <= _MAX_KIND_LENGTH and bool(_KIND.match(kind))


def is_record_ts(ts: str) -> bool:
    """Whether ``ts`` is fixed-width RFC 3339 UTC with microseconds, and a real instant."""
    try:
        parse_ts(ts)
    except ValueError:
        return False
    return True


def parse_ts(ts: str) -> datetime:
    """
    The instant a record ts names.

    Raises:
        ValueError: ``ts`` is not fixed-width RFC 3339 UTC with microseconds.
    """
    if not _TS.match(ts):
        raise ValueError("a record ts is RFC 3339 UTC with microseconds")
    return datetime.fromisoformat(ts[:-1]).replace(tzinfo=UTC)


def format_ts(now: datetime) -> str:
    """
    ``now`` as RFC 3339 UTC with microseconds, e.g. ``2026-11-25T08:00:00.123456Z``.

    Raises:
        ValueError: ``now`` is naive: a time without a zone cannot be put in UTC.
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("an audit timestamp needs a timezone-aware datetime")
    utc = now.astimezone(UTC)
    if utc.year >= 1000:  # isoformat's text, cheaper than strftime (which pads no year)
        return utc.isoformat(timespec="microseconds")[:-6] + "Z"
    return utc.strftime(_TS_FORMAT)


def held_at_head(ts: str, head_ts: str | None) -> str:
    """
    The ts a record after the head gets: ``ts``, or the head's when ``ts`` is earlier, so
    timestamps never go backwards along the chain. A writer that waited for the lock
    stamps a time just before the head's, which is expected (logged at debug); a step
    back larger than ``CLOCK_STEP_BACK_SECONDS`` is the clock itself going backwards
    (a warning).
    """
    if head_ts is None or ts >= head_ts:
        return ts
    try:
        behind = parse_ts(head_ts) - parse_ts(ts)
    except ValueError:
        behind = timedelta.max
    if behind.total_seconds() > CLOCK_STEP_BACK_SECONDS:
        log.warning("audit_clock_went_backwards", clock_ts=ts, head_ts=head_ts)
    else:
        log.debug("audit_ts_held_at_head", clock_ts=ts, head_ts=head_ts)
    return head_ts


def canonical_body(body: Mapping[str, JSONValue]) -> bytes:
    """
    The canonical bytes of a record body, which must be a JSON object.

    Raises:
        TypeError: ``body`` is not a mapping.
        CanonicalizationError: ``body`` is not I-JSON (NaN, a huge integer, a non-str key).
    """
    if not isinstance(body, Mapping):
        raise TypeError("an audit record body is a JSON object")
    return canonical_bytes(dict(body))


def record_bytes(
    *, seq: int, ts: str, kind: str, prev: str, key_id: str, body_json: bytes
) -> bytes:
    """
    The bytes that are hashed and signed: ``canonical_bytes`` of the six members.

    ``body_json`` must already be canonical; it is placed as is, so it is the same
    byte string whether it came from ``canonical_body`` or from a stored column.
    """
    members = (key_id, kind, prev, ts)
    if type(seq) is int and 0 < seq <= _MAX_SEQ and all(map(_NEEDS_NO_ESCAPE.match, members)):
        # What canonical_bytes writes for these values, without its per-call cost:
        # plain ASCII strings need no escaping and a safe integer is its digits.
        rest = f',"key_id":"{key_id}","kind":"{kind}","prev":"{prev}","seq":{seq},"ts":"{ts}"}}'
        return _BODY_PREFIX + body_json + rest.encode("ascii")
    fields = {"key_id": key_id, "kind": kind, "prev": prev, "seq": seq, "ts": ts}
    return _BODY_PREFIX + body_json + b"," + canonical_bytes(fields)[1:]


def seal(
    *, seq: int, ts: str, kind: str, prev: Sha256Hex, body_json: bytes, signer: Signer
) -> AuditRecord:
    """
    Build and sign the record ``seq`` that follows the record hashing to ``prev``.

    Args:
        body_json: The body's canonical bytes, from ``canonical_body``.

    Raises:
        ValueError: A field is malformed, or the record is over ``MAX_RECORD_BYTES``.
    """
    if not is_record_kind(kind):
        raise ValueError("a record kind is dotted lower-case, like call.completed")
    if not is_record_ts(ts):
        raise ValueError("a record ts is RFC 3339 UTC with microseconds")
    key_id = signer.key_id
    data = record_bytes(seq=seq, ts=ts, kind=kind, prev=prev, key_id=key_id, body_json=body_json)
    if len(data) > MAX_RECORD_BYTES:
        raise ValueError(f"an audit record is at most {MAX_RECORD_BYTES} bytes")
    return AuditRecord(
        seq=seq,
        ts=ts,
        kind=kind,
        prev=prev,
        key_id=key_id,
        body_json=body_json,
        record_bytes=data,
        record_hash=sha256_hex(data),
        signature=signer.sign(data),
    )


def check_record(
    record: AuditRecord,
    *,
    public_key: Ed25519PublicKey,
    key_id: KeyId,
    expected_seq: int,
    prev: Sha256Hex,
    not_before: str | None,
) -> None:
    """
    Check one stored record against the public key and the record before it.

    ``record`` holds what the store holds: its fields other than ``record_bytes``
    and ``signature`` are columns, which are trusted only once they equal the
    signed bytes. The checks run in this order, and the first failure is raised:
    position (seq, stored hash), signature, then contents (columns, prev, ts).

    Args:
        key_id: ``key_id_of(public_key)``.
        expected_seq: One more than the previous record's seq (1 for the first).
        prev: The previous record's hash (``GENESIS_PREV`` for the first).
        not_before: The previous record's ts, or None for the first.

    Raises:
        VerificationFailed: With ``seq=record.seq`` and the first check that failed.
    """
    check_position(record, expected_seq=expected_seq)
    check_signature(record, public_key=public_key, key_id=key_id)
    check_contents(record, key_id=key_id, prev=prev, not_before=not_before)


def check_position(record: AuditRecord, *, expected_seq: int) -> None:
    """
    The first part of ``check_record``: the seq follows on, the stored hash is right.

    Raises:
        VerificationFailed: With ``seq=record.seq``.
    """
    seq = record.seq
    if seq != expected_seq:
        if seq > expected_seq == 1:
            raise VerificationFailed(f"record 1 is missing: the log starts at seq {seq}", seq=seq)
        if seq > expected_seq:
            raise VerificationFailed(
                f"record {expected_seq} is missing: seq {seq} follows seq {expected_seq - 1}",
                seq=seq,
            )
        raise VerificationFailed(f"seq {seq} is out of order after seq {expected_seq - 1}", seq=seq)
    if sha256_hex(record.record_bytes) != record.record_hash:
        raise VerificationFailed(
            f"record {seq}: the stored hash is not the SHA-256 of the record bytes", seq=seq
        )


def check_signature(record: AuditRecord, *, public_key: Ed25519PublicKey, key_id: KeyId) -> None:
    """
    The second part of ``check_record``, for a record in this process.

    Raises:
        VerificationFailed: With ``seq=record.seq``, when the signature does not verify.
    """
    problem = signature_problem(
        record.seq,
        record.record_bytes,
        record.signature,
        record.key_id,
        public_key=public_key,
        key_id=key_id,
    )
    if problem is not None:
        raise VerificationFailed(problem, seq=record.seq)


def signature_problem(
    seq: int,
    data: bytes,
    signature: bytes,
    stored_key_id: str,
    *,
    public_key: Ed25519PublicKey,
    key_id: KeyId,
) -> str | None:
    """
    The second part of ``check_record``: what is wrong with the signature, or None.

    Plain values in and out, so that signatures can be checked in other processes.
    """
    try:
        public_key.verify(signature, data)
    except InvalidSignature:
        if stored_key_id != key_id:
            return (
                f"record {seq}: signed under key id {stored_key_id}, but the public key given "
                f"has key id {key_id}"
            )
        return f"record {seq}: the signature does not verify with the public key"
    return None


def check_contents(
    record: AuditRecord, *, key_id: KeyId, prev: Sha256Hex, not_before: str | None
) -> None:
    """
    The last part of ``check_record``: the signed bytes are the canonical record built
    from the columns, ``prev`` and the key id, and ts does not go backwards.

    Raises:
        VerificationFailed: With ``seq=record.seq``.
    """
    seq = record.seq
    expected = record_bytes(
        seq=seq,
        ts=record.ts,
        kind=record.kind,
        prev=prev,
        key_id=key_id,
        body_json=record.body_json,
    )
    if record.record_bytes != expected:
        _raise_mismatch(record, prev=prev, key_id=key_id)
    for column, signed in (("prev", prev), ("key_id", key_id)):
        if getattr(record, column) != signed:
            raise VerificationFailed(
                f"record {seq}: the {column} column differs from the signed record", seq=seq
            )
    if not is_record_ts(record.ts):
        raise VerificationFailed(f"record {seq}: ts is not RFC 3339 UTC with microseconds", seq=seq)
    if not_before is not None and record.ts < not_before:
        raise VerificationFailed(
            f"record {seq}: ts {record.ts} goes back before record {seq - 1}'s {not_before}",
            seq=seq,
        )


def _raise_mismatch(record: AuditRecord, *, prev: Sha256Hex, key_id: KeyId) -> NoReturn:
    """Say which part of a validly signed record disagrees with its row or its chain."""
    seq = record.seq
    data = record.record_bytes

    def fail(problem: str) -> NoReturn:
        raise VerificationFailed(f"record {seq}: {problem}", seq=seq)

    try:
        if len(data) > MAX_RECORD_BYTES:
            raise ValueError("too large")  # noqa: TRY301 - same outcome as a parse error
        signed = STRICT_DECODER.decode(data.decode("utf-8"))
    except (ValueError, RecursionError):
        fail("the signed bytes are not a JSON object")
    if not isinstance(signed, dict) or set(signed) != RECORD_FIELDS:
        fail("the signed bytes are not a callward record")
    if signed["seq"] != seq or isinstance(signed["seq"], bool):
        fail(
            f"the signed record says seq {signed['seq']!r}, but it is stored at seq {seq} "
            "(records moved or swapped)"
        )
    if signed["prev"] != prev:
        if seq == 1:
            fail("prev is not the genesis value, so the log does not start here")
        fail(f"prev is not the hash of record {seq - 1}")
    if signed["key_id"] != key_id:
        fail(f"the signed key_id is not the id of the public key given ({key_id})")
    for column in ("kind", "ts"):
        if signed[column] != getattr(record, column):
            fail(f"the {column} column differs from the signed record")
    try:
        rest = b"," + canonical_bytes({k: v for k, v in signed.items() if k != "body"})[1:]
    except ValueError:
        fail("the signed bytes are not in canonical form")
    if data.startswith(_BODY_PREFIX) and data.endswith(rest):
        signed_body = data[len(_BODY_PREFIX) : len(data) - len(rest)]
        if signed_body != record.body_json:
            fail("the body column differs from the signed record")
    fail("the signed bytes are not in canonical form")


__all__ = [
    "GENESIS_PREV",
    "MAX_RECORD_BYTES",
    "canonical_body",
    "check_contents",
    "check_position",
    "check_record",
    "format_ts",
    "is_record_kind",
    "is_record_ts",
    "parse_ts",
    "record_bytes",
    "seal",
    "signature_problem",
]
