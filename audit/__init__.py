"""
The audit log: every record RFC 8785 canonical, hash-chained, Ed25519-signed, and
durable in SQLite before ``append`` returns; ``verify`` checks a log offline with
nothing but the file and the public key.

Example::

    >>> import tempfile
    >>> from pathlib import Path
    >>> from callward.audit import FileSigner, SQLiteAuditStore, verify
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     home = Path(tmp)
    ...     signer = FileSigner.load_or_create(home / "keys")
    ...     with SQLiteAuditStore(home / "audit.db", signer) as log:
    ...         record = log.append("call.denied", {"call_id": "c1", "kind": "schema"})
    ...     verified = verify(home / "audit.db", home / "keys" / "audit-ed25519.pub")
    >>> (record.seq, verified.records)
    (1, 1)
"""

from callward.audit._checkpoint import Checkpoint, open_checkpoint
from callward.audit._proofs import VerifiedReceipt, consistency, prove, verify_receipt
from callward.audit._query import CallFilter, export_records, query_calls, read_records
from callward.audit._report import render_report
from callward.audit._rotation import rotate_file_key
from callward.audit._sqlite import SQLiteAuditStore
from callward.audit._witness import (
    CommandWitness,
    DirectoryWitness,
    StoreSettings,
    Witness,
    store_settings,
)
from callward.audit.signer import FileSigner, Signer, key_id_of, load_public_key
from callward.audit.verify import VerifiedLog, verify

__all__ = [
    "CallFilter",
    "Checkpoint",
    "CommandWitness",
    "DirectoryWitness",
    "FileSigner",
    "SQLiteAuditStore",
    "Signer",
    "StoreSettings",
    "VerifiedLog",
    "VerifiedReceipt",
    "Witness",
    "consistency",
    "export_records",
    "key_id_of",
    "load_public_key",
    "open_checkpoint",
    "prove",
    "query_calls",
    "read_records",
    "render_report",
    "rotate_file_key",
    "store_settings",
    "verify",
    "verify_receipt",
]
