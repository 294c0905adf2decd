"""
The fleet's database out of space, for real: a PostgreSQL server of the test's own whose
data directory is a small tmpfs, filled up while a replica appends. Appends fail closed
as ``audit_unavailable`` saying so, nothing reported written is lost, and the same store
appends again once there is space.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from callward.audit import FileSigner, PostgresAuditStore, verify
from callward.core._postgres import StoreUrl
from callward.core.errors import AuditUnavailable
from tests.integration.fleet.conftest import PrivateServer

# Room for initdb (~40 MiB), a few WAL segments and the test's records.
_TMPFS_MIB = 192
_LEFT_FREE = 256 * 1024


@pytest.fixture(name="small_disk_postgres")
def _small_disk_postgres(postgres_server: str) -> Iterator[PrivateServer]:
    root = Path(tempfile.mkdtemp(prefix="cw-pg-full-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={_TMPFS_MIB}m,mode=0755", "tmpfs",
                    str(root)], check=True, capture_output=True, timeout=30)
    try:
        server = PrivateServer(root)
        yield server
        if server.running():
            with contextlib.suppress(subprocess.CalledProcessError):
                server.stop("immediate")
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False, capture_output=True,
                       timeout=30)
        shutil.rmtree(root, ignore_errors=True)


def _fill(root: Path) -> Path:
    """A file that takes all but ``_LEFT_FREE`` bytes of the tmpfs."""
    filler = root / "filler"
    stat = os.statvfs(root)
    free = stat.f_bavail * stat.f_frsize
    with filler.open("wb") as out:
        os.posix_fallocate(out.fileno(), 0, max(0, free - _LEFT_FREE))
    return filler


def test_a_full_disk_fails_appends_closed_and_the_store_recovers(small_disk_postgres,
                                                                tmp_path):
    server = small_disk_postgres
    signer = FileSigner.load_or_create(tmp_path / "keys")
    store = PostgresAuditStore(StoreUrl.parse(server.url), signer, checkpoint_every=10_000)
    store.open()
    written = [store.append("test.before", {"n": n}).record_hash for n in range(5)]
    filler = _fill(server.root)
    failure: AuditUnavailable | None = None
    body = {"padding": "x" * 3000}
    for n in range(5000):
        try:
            written.append(store.append("test.filling", {**body, "n": n}).record_hash)
        except AuditUnavailable as exc:
            failure = exc
            break
    assert failure is not None, "the disk never filled"
    assert failure.kind == "audit_unavailable"
    assert "out of space" in failure.message or "cannot be reached" in failure.message \
        or "shutting down" in failure.message, failure.message

    filler.unlink()
    if not server.running():  # PostgreSQL may stop itself when it cannot write its WAL
        server.start()
    server.wait_until_answers()
    deadline = time.monotonic() + 60
    while True:
        try:
            written.append(store.append("test.after", {"n": 1}).record_hash)
            break
        except AuditUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    store.close()

    log = verify(server.url, [tmp_path / "keys" / "audit-ed25519.pub"])
    from callward.audit import read_records

    stored = [record.record_hash for record in read_records(server.url)]
    # Every record reported written is in the log, in order, and the log verifies.
    assert [h for h in stored if h in set(written)] == written
    assert log.records == len(stored)
