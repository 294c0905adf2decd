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

from callward.audit._query import read_records
from callward.audit._sqlite import SQLiteAuditStore
from callward.audit.signer import FileSigner, Signer, key_id_of, load_public_key
from callward.audit.verify import VerifiedLog, verify

__all__ = [
    "FileSigner",
    "SQLiteAuditStore",
    "Signer",
    "VerifiedLog",
    "key_id_of",
    "load_public_key",
    "read_records",
    "verify",
]
