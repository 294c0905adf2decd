"""
The lock files that tell a live writer from one that is gone.

Each open ``SQLiteAuditStore`` holds an exclusive ``flock`` on its own file in
``<db>.writers/``, named by its writer id. The calls it authorized name that id in
``pending_calls``; another store closes them out as interrupted only once the lock
is free.

Invariants:

- The lock lives exactly as long as the writer's process holds the descriptor: a
  writer that crashed or was killed frees it, so it can be recognised as gone.
- When a writer's state cannot be told (the file cannot be opened or locked for a
  reason other than being held), it counts as alive: a call that may still be
  running is never closed out.
- Lock files are created with mode ``0o600`` in a directory made with ``0o700``, and
  opened with ``O_NOFOLLOW``.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


def writer_lock_path(db: Path, writer_id: str) -> Path:
    """The lock file of writer ``writer_id`` of the database ``db``."""
    return db.with_name(db.name + ".writers") / writer_id


def hold_writer_lock(db: Path, writer_id: str) -> int:
    """
    Create and lock this store's writer file; the lock lives as long as the process
    holds it open, so a crashed or killed writer frees it and can be recognised.

    Returns:
        The locked descriptor, for ``release_writer_lock``.
    """
    directory = db.with_name(db.name + ".writers")
    directory.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(
        writer_lock_path(db, writer_id),
        os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
        0o600,
    )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def release_writer_lock(db: Path, writer_id: str, fd: int) -> None:
    """Remove this store's writer file and free its lock."""
    writer_lock_path(db, writer_id).unlink(missing_ok=True)
    os.close(fd)


def remove_dead_writer_files(db: Path, *, keep: str) -> None:
    """Remove the lock files of writers that are gone and left no call open."""
    directory = db.with_name(db.name + ".writers")
    try:
        names = [entry.name for entry in directory.iterdir()]
    except OSError:
        return
    for name in names:
        if name != keep and not writer_alive(db, name):
            writer_lock_path(db, name).unlink(missing_ok=True)


def writer_alive(db: Path, writer_id: str) -> bool:
    """Whether the writer ``writer_id`` still holds its lock (its process still runs)."""
    try:
        fd = os.open(writer_lock_path(db, writer_id), os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    except OSError:
        return True  # cannot tell: never close out a call that may still be running
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


__all__ = [
    "hold_writer_lock",
    "release_writer_lock",
    "remove_dead_writer_files",
    "writer_alive",
    "writer_lock_path",
]
