"""
Rotating the file key of an audit log, crash-safely.

Order, so that a crash at any step leaves a state the next run finishes:

1. A new key pair is created in ``keys/next/`` (or the one already there is reused).
2. The store appends ``key.rotated``, signed by the current key, naming the new key;
   from then on the log accepts only the new key.
3. The old pair moves to ``keys/retired/<key id>.{key,pub}`` and the new pair takes
   the standard names. Reviewers keep every ``.pub``: ``verify`` needs only the first
   key, since each rotation record vouches for the next, but any of them is accepted.
"""

from __future__ import annotations

import os
from pathlib import Path

import structlog

from callward.audit._sqlite import SQLiteAuditStore
from callward.audit.signer import PRIVATE_KEY_NAME, PUBLIC_KEY_NAME, FileSigner
from callward.core.types import KeyId

log = structlog.get_logger()


def rotate_file_key(keys_dir: Path, db_path: Path) -> tuple[KeyId, KeyId]:
    """
    Hand the log at ``db_path`` from the key in ``keys_dir`` to a new one.

    Returns:
        The old and the new key ids.

    Raises:
        ConfigurationError: A key file is unusable.
        AuditUnavailable: The rotation record could not be written; the old key stays.
    """
    next_dir = keys_dir / "next"
    retired = keys_dir / "retired"
    new = FileSigner.load_or_create(next_dir)
    current = FileSigner.load_or_create(keys_dir)
    store = SQLiteAuditStore(db_path, current)
    store.open()
    try:
        if not store.rotated_to(new.key_id):
            store.rotate_key(new)
    finally:
        store.close()
    retired.mkdir(mode=0o700, exist_ok=True)
    for name, suffix in ((PRIVATE_KEY_NAME, "key"), (PUBLIC_KEY_NAME, "pub")):
        os.replace(keys_dir / name, retired / f"{current.key_id}.{suffix}")
    for name in (PRIVATE_KEY_NAME, PUBLIC_KEY_NAME):
        os.replace(next_dir / name, keys_dir / name)
    next_dir.rmdir()
    _fsync_dir(keys_dir)
    log.info("audit_key_file_rotated", previous=current.key_id, new=new.key_id)
    return current.key_id, new.key_id


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["rotate_file_key"]
