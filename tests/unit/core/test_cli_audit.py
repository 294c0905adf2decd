"""`callward audit …` end to end on a real log: prove, verify-receipt, consistency, review."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from callward.audit import FileSigner, SQLiteAuditStore


@pytest.fixture(name="home")
def _home(tmp_path: Path) -> Path:
    """A callward home whose log has 10 records and checkpoints at 4, 8 and 10."""
    home = tmp_path / "home"
    signer = FileSigner.load_or_create(home / "keys")
    with SQLiteAuditStore(home / "audit.db", signer, checkpoint_every=4) as store:
        for i in range(5):
            authorized = store.append("call.authorized", {
                "call": {"id": f"c{i}", "name": "square"}, "principal": "alice",
                "session_id": "s"})
            store.append("call.completed", {"call_id": f"c{i}", "authorized_seq": authorized.seq,
                                            "outcome": "ok"})
    return home


def callward(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "callward.core.cli", "--home", str(home), *args],
        capture_output=True, text=True, timeout=120, check=False,
    )


class TestAuditCommands:
    def test_prove_then_verify_receipt(self, home, tmp_path):
        """`audit prove SEQ` writes a receipt that `audit verify-receipt` accepts."""
        proved = callward(home, "audit", "prove", "6")
        receipt = tmp_path / "receipt.json"
        receipt.write_text(proved.stdout)

        checked = callward(home, "audit", "verify-receipt", str(receipt),
                           "--public-key", str(home / "keys" / "audit-ed25519.pub"))

        assert (0, 0) == (proved.returncode, checked.returncode), checked.stderr
        assert ("OK", 8) == (json.loads(checked.stdout)["verdict"],
                             json.loads(checked.stdout)["tree_size"])

    def test_tampered_receipt_exits_1_and_says_why(self, home, tmp_path):
        """A receipt with a changed record hash fails with exit code 1 and a reason."""
        receipt = json.loads(callward(home, "audit", "prove", "6").stdout)
        receipt["record_hash"] = "0" * 64
        path = tmp_path / "receipt.json"
        path.write_text(json.dumps(receipt))

        checked = callward(home, "audit", "verify-receipt", str(path))

        assert 1 == checked.returncode
        assert "record_hash" in json.loads(checked.stdout)["reason"]

    def test_consistency_between_two_checkpoints(self, home):
        """`audit consistency OLD NEW` proves the log only grew between them."""
        done = callward(home, "audit", "consistency", "4", "10")

        assert 0 == done.returncode, done.stderr
        assert "OK" == json.loads(done.stdout)["verdict"]

    def test_verify_reports_checkpoints(self, home):
        """`audit verify` checks the checkpoints too and says how many."""
        done = callward(home, "audit", "verify")

        assert 0 == done.returncode, done.stderr
        assert (10, 3) == (json.loads(done.stdout)["records"],
                           json.loads(done.stdout)["checkpoints"])

    def test_query_export_and_report(self, home, tmp_path):
        """query, export (both formats) and report run and write what they promise."""
        query = callward(home, "audit", "query", "--principal", "alice", "--kind",
                         "call.completed")
        jsonl = callward(home, "audit", "export")
        ocsf = callward(home, "audit", "export", "--format", "ocsf")
        report = callward(home, "audit", "report", "--output", str(tmp_path / "r.html"))

        assert [0, 0, 0, 0] == [d.returncode for d in (query, jsonl, ocsf, report)]
        assert 5 == len(query.stdout.splitlines())
        assert 10 == len(jsonl.stdout.splitlines()) == len(ocsf.stdout.splitlines())
        assert "Verification OK" in (tmp_path / "r.html").read_text()

    def test_rotate_key_then_verify_with_the_first_key(self, home, tmp_path):
        """After `audit rotate-key` the log verifies from the first key across the boundary."""
        first = tmp_path / "first.pub"
        first.write_bytes((home / "keys" / "audit-ed25519.pub").read_bytes())

        rotated = callward(home, "audit", "rotate-key")
        signer = FileSigner.load_or_create(home / "keys")
        with SQLiteAuditStore(home / "audit.db", signer) as store:
            store.append("call.completed", {"after": "rotation"})
        checked = callward(home, "audit", "verify", "--public-key", str(first))

        assert (0, 0) == (rotated.returncode, checked.returncode), checked.stdout
        assert [json.loads(rotated.stdout)["previous_key_id"], signer.key_id] == json.loads(
            checked.stdout)["key_ids"]
        assert (home / "keys" / "retired").is_dir()
