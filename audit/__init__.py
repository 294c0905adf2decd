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

Reading and verifying a log never loads a writer: ``SQLiteAuditStore``,
``PostgresAuditStore`` (and with it psycopg) and ``rotate_file_key`` are imported
on first use.
"""

from __future__ import annotations

import typing

from callward.audit._checkpoint import Checkpoint, open_checkpoint
from callward.audit._proofs import VerifiedReceipt, consistency, prove, verify_receipt
from callward.audit._query import CallFilter, export_records, query_calls, read_records
from callward.audit._report import render_report
from callward.audit._witness import (
    CommandWitness,
    DirectoryWitness,
    StoreSettings,
    Witness,
    store_settings,
)
from callward.audit.signer import FileSigner, Signer, key_id_of, load_public_key
from callward.audit.verify import VerifiedLog, verify

if typing.TYPE_CHECKING:  # the real types for mypy; at run time ``__getattr__`` loads them
    from callward.audit._postgres import PostgresAuditStore
    from callward.audit._rotation import rotate_file_key
    from callward.audit._sqlite import SQLiteAuditStore

__all__ = [
    "CallFilter",
    "Checkpoint",
    "CommandWitness",
    "DirectoryWitness",
    "FileSigner",
    "PostgresAuditStore",
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

# The writer's names, loaded on first use: the offline verifier never needs them.
_WRITER: dict[str, str] = {
    "PostgresAuditStore": "callward.audit._postgres",
    "SQLiteAuditStore": "callward.audit._sqlite",
    "rotate_file_key": "callward.audit._rotation",
}


def __getattr__(name: str) -> object:
    """A writer name, imported on first use; anything else is an AttributeError."""
    module_name = _WRITER.get(name)
    if module_name is None:
        raise AttributeError(f"module 'callward.audit' has no attribute {name!r}")
    import importlib  # noqa: PLC0415 - only when a writer name is first used

    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The face's names, the lazy writer names included (what ``dir()`` shows)."""
    return sorted({*globals(), *_WRITER})
