"""What the command prints when something fails: the kind and what to do, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def callward(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "callward.core.cli", "--home", str(home), *args],
                          capture_output=True, text=True, timeout=120, check=False)


class TestCommandErrors:
    def test_an_unreadable_anomaly_state_is_one_error_with_its_kind(self, tmp_path):
        """`anomalies list` on a corrupt state file prints state_unavailable, exit 1."""
        (tmp_path / "anomaly-state.db").write_bytes(b"not a database, not at all" * 40)

        finished = callward(tmp_path, "anomalies", "list")

        expected = (1, "[state_unavailable] anomaly state: DatabaseError", False)
        assert expected == (finished.returncode, finished.stderr.splitlines()[0],
                            "Traceback" in finished.stderr)

    def test_an_unreadable_policy_state_is_one_error_with_its_kind(self, tmp_path):
        """`policy approvals` on a corrupt policy state prints state_unavailable, never a trace."""
        (tmp_path / "policy-state.db").write_bytes(b"not a database, not at all" * 40)

        finished = callward(tmp_path, "policy", "approvals")

        expected = (False, True)
        assert expected == ("Traceback" in finished.stderr,
                            finished.stderr.startswith("[state_unavailable]"))
