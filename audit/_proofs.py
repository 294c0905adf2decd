"""
Receipts and consistency proofs a reviewer can check with nothing but the public key.

A receipt file (``callward audit prove SEQ``) is a JSON object::

    {"format": "callward-receipt/1", "seq": 7, "record_hash": "<hex>", "key_id": "<hex>",
     "leaf_hash": "<hex>", "tree_size": 1000, "inclusion_proof": ["<hex>", ...],
     "checkpoint": "<signed note>", "record": "<base64 bytes>", "signature": "<base64>"}

Invariants:

- ``verify_receipt`` trusts nothing in the file but what the public keys sign: the
  checkpoint's signature, the record's signature, then the record bytes' hashes, then
  the inclusion proof from the leaf to the signed root. The first failure raises
  ``VerificationFailed`` naming the field.
- Proofs are read from a database opened read-only (an SQLite file, or a fleet's
  PostgreSQL store in one snapshot); making them never writes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, cast

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from callward.audit._chain import MAX_RECORD_BYTES
from callward.audit._checkpoint import Checkpoint, open_checkpoint
from callward.audit._merkle import leaf_hash, verify_consistency, verify_inclusion
from callward.audit._sqlite_format import (
    AuditSource,
    ReadConnection,
    UnreadableDatabase,
    connect_read_only,
    describe_source,
    row_to_record,
)
from callward.audit._tree import MissingNode, consistency_path, inclusion_path, root_at
from callward.audit.signer import key_id_of
from callward.core._canonical import STRICT_DECODER, JSONValue
from callward.core.errors import ConfigurationError, VerificationFailed

RECEIPT_FORMAT: Final = "callward-receipt/1"
CONSISTENCY_FORMAT: Final = "callward-consistency/1"
_SELECT_RECORD: Final = (
    "SELECT seq, ts, kind, prev, key_id, body, record, hash, signature FROM records WHERE seq = ?"
)
_MAX_PROOF_HASHES: Final = 64
_HEX64 = re.compile(r"\A[0-9a-f]{64}\Z")


@dataclass(frozen=True, slots=True)
class VerifiedReceipt:
    """
    What a receipt proved: record ``seq`` hashing to ``record_hash`` is in the log
    ``origin`` under a checkpoint of ``tree_size`` records with ``root_hash``.

    Attributes:
        record_checked: The record bytes and signature were in the file and verified
            (a receipt from a ``ToolResult`` carries only the hashes).
    """

    seq: int
    record_hash: str
    origin: str
    tree_size: int
    root_hash: str
    record_checked: bool


def _fail(message: str) -> VerificationFailed:
    return VerificationFailed(message, seq=None)


def _open(db_path_or_url: AuditSource) -> ReadConnection:
    try:
        return connect_read_only(db_path_or_url)
    except UnreadableDatabase as exc:
        raise ConfigurationError(
            str(exc), remediation="pass the audit.db of a callward home (--home or --db), or "
            "a fleet's store (--store postgresql://...)"
        ) from exc


def _tree(conn: ReadConnection) -> sqlite3.Connection:
    """``conn`` for ``_tree``, which reads through ``execute(...).fetchone()`` only."""
    return cast("sqlite3.Connection", conn)


def _stored_checkpoint(conn: ReadConnection, sql: str, param: int) -> tuple[int, str] | None:
    row = conn.execute(sql, (param,)).fetchone()
    return None if row is None else (int(row[0]), str(row[1]))


def prove(
    db_path_or_url: AuditSource, seq: int, *, tree_size: int | None = None
) -> dict[str, JSONValue]:
    """
    The receipt of record ``seq`` under the first stored checkpoint that covers it
    (or the one of exactly ``tree_size``), from an ``audit.db`` or a fleet's store.

    Raises:
        ConfigurationError: The file is not an audit database, there is no record
            ``seq``, or no stored checkpoint covers it yet (write one with
            ``callward audit checkpoint``).
        VerificationFailed: The stored tree does not hold the record.
    """
    conn = _open(db_path_or_url)
    try:
        row = conn.execute(_SELECT_RECORD, (seq,)).fetchone()
        if row is None:
            raise ConfigurationError(f"the log has no record {seq}")
        record = row_to_record(row)
        if tree_size is None:
            found = _stored_checkpoint(
                conn, "SELECT size, note FROM checkpoints WHERE size >= ? ORDER BY size LIMIT 1",
                seq,
            )
        else:
            found = _stored_checkpoint(
                conn, "SELECT size, note FROM checkpoints WHERE size = ?", tree_size
            )
        if found is None:
            raise ConfigurationError(
                f"no stored checkpoint covers record {seq} yet",
                remediation="run `callward audit checkpoint` (it signs the log's head), then "
                "prove again",
            )
        size, note = found
        try:
            path = inclusion_path(_tree(conn), seq, size)
        except MissingNode as exc:
            raise VerificationFailed(f"the stored Merkle tree is damaged ({exc})", seq=seq) from exc
    except sqlite3.Error as exc:
        # A fleet store's error reads as describe() says: no server message, no value.
        raise ConfigurationError(
            f"{describe_source(db_path_or_url)} cannot be read as an audit log ({exc})"
        ) from exc
    finally:
        conn.close()
    return {
        "format": RECEIPT_FORMAT,
        "seq": record.seq,
        "record_hash": record.record_hash,
        "key_id": record.key_id,
        "leaf_hash": leaf_hash(record.record_bytes).hex(),
        "tree_size": size,
        "inclusion_proof": [node.hex() for node in path],
        "checkpoint": note,
        "record": base64.b64encode(record.record_bytes).decode(),
        "signature": base64.b64encode(record.signature).decode(),
    }


def _int_field(receipt: Mapping[str, object], name: str) -> int:
    value = receipt.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _fail(f"the receipt's {name} is missing or not a positive integer")
    return value


def _str_field(receipt: Mapping[str, object], name: str) -> str:
    value = receipt.get(name)
    if not isinstance(value, str):
        raise _fail(f"the receipt's {name} is missing or not text")
    return value


def _hex_hash(value: object, name: str) -> bytes:
    if not isinstance(value, str) or not _HEX64.match(value):
        raise _fail(f"the receipt's {name} is not a 64-digit hex SHA-256")
    return bytes.fromhex(value)


def _b64(value: object, name: str) -> bytes:
    if not isinstance(value, str) or len(value) > 2 * MAX_RECORD_BYTES:
        raise _fail(f"the receipt's {name} is not base64")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error as exc:
        raise _fail(f"the receipt's {name} is not base64") from exc


def verify_receipt(
    receipt: Mapping[str, object], public_keys: Iterable[Ed25519PublicKey]
) -> VerifiedReceipt:
    """
    Check a receipt offline against the log's public key(s).

    Accepts a receipt file from ``prove`` and a ``ToolResult`` receipt's JSON alike
    (the latter carries no record bytes, so it proves the leaf, not its contents).

    Raises:
        VerificationFailed: Naming the first part that does not verify.
    """
    keys = list(public_keys)
    if "format" in receipt and receipt["format"] != RECEIPT_FORMAT:
        raise _fail(f"the receipt format is not {RECEIPT_FORMAT}")
    seq = _int_field(receipt, "seq")
    tree_size = _int_field(receipt, "tree_size")
    note = _str_field(receipt, "checkpoint")
    record_hash = _hex_hash(receipt.get("record_hash"), "record_hash")
    leaf = _hex_hash(receipt.get("leaf_hash"), "leaf_hash")
    proof_value = receipt.get("inclusion_proof")
    if not isinstance(proof_value, list) or len(proof_value) > _MAX_PROOF_HASHES:
        raise _fail("the receipt's inclusion_proof is not a list of hashes")
    proof = [_hex_hash(node, f"inclusion_proof[{i}]") for i, node in enumerate(proof_value)]
    checkpoint = open_checkpoint(note, keys)
    if checkpoint.size != tree_size:
        raise _fail(
            f"the receipt says tree size {tree_size} but its checkpoint signs {checkpoint.size}"
        )
    record_checked = False
    if "record" in receipt or "signature" in receipt:
        _check_record(receipt, seq, record_hash, leaf, keys)
        record_checked = True
    verify_inclusion(seq - 1, tree_size, leaf, proof, checkpoint.root)
    return VerifiedReceipt(
        seq=seq,
        record_hash=record_hash.hex(),
        origin=checkpoint.origin,
        tree_size=tree_size,
        root_hash=checkpoint.root.hex(),
        record_checked=record_checked,
    )


def _check_record(
    receipt: Mapping[str, object],
    seq: int,
    record_hash: bytes,
    leaf: bytes,
    keys: list[Ed25519PublicKey],
) -> None:
    data = _b64(receipt.get("record"), "record")
    signature = _b64(receipt.get("signature"), "signature")
    if hashlib.sha256(data).digest() != record_hash:
        raise _fail("the receipt's record_hash is not the SHA-256 of its record bytes")
    if leaf_hash(data) != leaf:
        raise _fail("the receipt's leaf_hash is not the leaf hash of its record bytes")
    key_id = receipt.get("key_id")
    key = next((k for k in keys if key_id_of(k) == key_id), None)
    if key is None:
        raise _fail(f"the record is signed under key id {key_id}, which is not a key given")
    try:
        key.verify(signature, data)
    except InvalidSignature:
        raise _fail("the record's signature does not verify with the public key") from None
    try:
        signed = STRICT_DECODER.decode(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise _fail("the receipt's record bytes are not a JSON object") from exc
    if not isinstance(signed, dict) or signed.get("seq") != seq:
        raise _fail(f"the signed record is not record {seq}")


def _checkpoint_of(
    conn: ReadConnection, which: int | str, keys: list[Ed25519PublicKey]
) -> Checkpoint:
    """A stored checkpoint by tree size, or a checkpoint file (e.g. a witness's)."""
    if isinstance(which, int):
        found = _stored_checkpoint(conn, "SELECT size, note FROM checkpoints WHERE size = ?",
                                   which)
        if found is None:
            raise ConfigurationError(f"the log has no checkpoint of tree size {which}")
        note: str = found[1]
    else:
        try:
            note = Path(which).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigurationError(f"cannot read checkpoint file {which}") from exc
    return open_checkpoint(note, keys)


def consistency(
    db_path_or_url: AuditSource,
    old: int | str,
    new: int | str,
    public_keys: Iterable[Ed25519PublicKey],
) -> dict[str, JSONValue]:
    """
    Prove, and check, that the log at checkpoint ``old`` is a prefix of it at ``new``.

    Args:
        db_path_or_url: An ``audit.db``, or a fleet's store.
        old: A stored checkpoint's tree size, or the path of a checkpoint file.
        new: Likewise.

    Returns:
        The two signed checkpoints and the proof, as a reviewer can re-check them.

    Raises:
        ConfigurationError: A checkpoint is not stored or cannot be read.
        VerificationFailed: A checkpoint is not signed by a key given, or the proof
            fails: the log was rewritten or rolled back between them.
    """
    keys = list(public_keys)
    conn = _open(db_path_or_url)
    try:
        first = _checkpoint_of(conn, old, keys)
        second = _checkpoint_of(conn, new, keys)
        if first.origin != second.origin:
            raise _fail(f"the checkpoints name two logs: {first.origin} and {second.origin}")
        if first.size > second.size:
            raise _fail(
                f"checkpoint {first.size} is larger than checkpoint {second.size}: "
                "the log was rolled back"
            )
        try:
            (count,) = conn.execute("SELECT count(*) FROM merkle_nodes WHERE level = 0").fetchone()
            if int(count) < second.size:
                raise _fail(
                    f"the log holds {count} records, fewer than checkpoint {second.size} "
                    "signed: the log was rolled back or truncated"
                )
            proof = consistency_path(_tree(conn), first.size, second.size)
            if root_at(_tree(conn), second.size) != second.root:
                raise _fail(
                    f"the log's tree at size {second.size} is not the one its checkpoint signed"
                )
        except MissingNode as exc:
            raise _fail(f"the stored Merkle tree is damaged ({exc})") from exc
    finally:
        conn.close()
    verify_consistency(first.size, second.size, first.root, second.root, proof)
    return {
        "format": CONSISTENCY_FORMAT,
        "old": first.note,
        "new": second.note,
        "old_size": first.size,
        "new_size": second.size,
        "proof": [node.hex() for node in proof],
    }


__all__ = [
    "CONSISTENCY_FORMAT",
    "RECEIPT_FORMAT",
    "VerifiedReceipt",
    "consistency",
    "prove",
    "verify_receipt",
]
