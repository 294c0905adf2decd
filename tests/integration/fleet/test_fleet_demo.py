"""`callward demo --fleet`: three real replicas on the real PostgreSQL, end to end."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import psycopg


class TestFleetDemo:
    def test_fleet_demo_holds_every_check_and_cleans_up(
        self, postgres_server, engine, leftover_containers, tmp_path
    ):
        """
        The fleet demo ends in `verdict: OK` with the log head: the shared limit allowed
        exactly its 40 calls, the raced approval ran once, the killed replica's call was
        closed as call.interrupted by a survivor, the one log verified with the three
        keys; its database is dropped and no container of its replicas is left.
        """
        done = subprocess.run(
            [sys.executable, "-m", "callward.core.cli", "--home", str(tmp_path / "home"),
             "demo", "--fleet", "--store", postgres_server],
            capture_output=True, text=True, env={**os.environ}, timeout=240, check=False)
        out = done.stdout
        lines = out.strip().splitlines()

        assert 0 == done.returncode, out[-6000:] + done.stderr[-3000:]
        assert re.fullmatch(r"verdict: OK \(log head seq \d+, hash [0-9a-f]{64}\)", lines[-1])
        for replica in ("replica-1", "replica-2", "replica-3"):
            assert re.search(rf"^  {replica}: \d+ decided \(\d+ authorized, \d+ denied\)", out,
                             re.MULTILINE)
        for expected in (
            "[ok] gateway.started names each replica once: replica-1, replica-2, replica-3",
            "[ok] total allowed on add == the limit (40 == 40)",
            "[ok] the approval ran exactly once",
            "the approved call sent to replica-1 and replica-2 at the same moment:",
            "[ok] call.interrupted records: ",
            "[ok] every call.authorized closed exactly once",
            "[ok] replica-1 stopped on SIGINT, exit 0",
            "[ok] replica-2 stopped on SIGINT, exit 0",
            "with the 3 replicas' keys: ",
            "[ok] sandbox containers of the fleet left: 0",
        ):
            assert expected in out
        assert "[FAILED]" not in out
        refused = re.search(r"sent (\d+); ran 40; refused (\d+)", out)
        assert refused is not None
        assert int(refused[1]) - 40 == int(refused[2])
        database = re.search(r"database dropped: \S+/(callward_fleet_demo_\w+)", out)
        assert database is not None
        with psycopg.connect(postgres_server) as conn:
            assert conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                (database[1],)).fetchone() is None
        assert [] == leftover_containers()
