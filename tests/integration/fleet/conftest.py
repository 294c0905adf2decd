"""
Fleet fixtures: callward's own real PostgreSQL server (scripts/ensure-postgres.sh),
a fresh database per test, and a private throwaway server for tests that stop one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests._net import free_port

REPO = Path(__file__).resolve().parents[3]
PASSFILE = "/var/lib/callward-postgres/callward.pgpass"


@pytest.fixture(scope="session", name="postgres_server")
def _postgres_server() -> str:
    """The URL of callward's own server (started if it is not), with PGPASSFILE set."""
    done = subprocess.run([str(REPO / "scripts" / "ensure-postgres.sh")], capture_output=True,
                          text=True, check=False, timeout=600)
    if done.returncode != 0:  # pragma: no cover - make test starts it
        pytest.fail(f"no PostgreSQL: scripts/ensure-postgres.sh said {done.stderr.strip()}")
    os.environ.setdefault("PGPASSFILE", PASSFILE)
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture(name="postgres_url")
def _postgres_url(postgres_server: str) -> Iterator[str]:
    """A fresh, empty database on the real server, dropped after the test."""
    name = f"cwt_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    yield postgres_server.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(postgres_server, autocommit=True) as admin:
        for attempt in range(20):
            try:
                admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
                break
            except psycopg.errors.InsufficientPrivilege:
                # An autovacuum worker (the server's own, not ours to end) is in it.
                if attempt == 19:
                    raise
                time.sleep(0.5)


class PrivateServer:
    """
    A PostgreSQL server of one test's own (initdb in a temporary directory, run as the
    postgres user, trust on loopback for the role ``callward``): the test may stop and
    start it without touching the shared server.
    """

    def __init__(self, root: Path) -> None:
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
        if not found:  # pragma: no cover - ensure-postgres.sh installs it
            pytest.fail("no PostgreSQL binaries under /usr/lib/postgresql")
        self.bin = found[-1].parent
        self.root = root
        self.data = root / "data"
        self.port = free_port()
        self.url = f"postgresql://callward@127.0.0.1:{self.port}/callward"
        shutil.chown(root, "postgres", "postgres")
        self._as_postgres("initdb", "-D", str(self.data), "-U", "callward", "--auth=trust",
                          "--encoding=UTF8", "--locale=C.UTF-8")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                       f"unix_socket_directories = '{root}'\nmax_connections = 100\n")
        self.start()
        self._as_postgres("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U",
                          "callward", "callward")

    def _as_postgres(self, tool: str, *args: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", str(self.bin / tool), *args],
                       check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self._as_postgres("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"),
                          "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._as_postgres("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def wait_until_answers(self, seconds: float = 30.0) -> None:
        deadline = time.monotonic() + seconds
        while True:
            try:
                with psycopg.connect(self.url, connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


@pytest.fixture(name="private_postgres")
def _private_postgres(postgres_server: str) -> Iterator[PrivateServer]:
    """A PostgreSQL server of this test's own, stopped and removed after it."""
    root = Path(tempfile.mkdtemp(prefix="cw-pg-"))
    root.chmod(0o755)
    server = PrivateServer(root)
    yield server
    if server.running():
        with contextlib.suppress(subprocess.CalledProcessError):
            server.stop("immediate")
    shutil.rmtree(root, ignore_errors=True)
