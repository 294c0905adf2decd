"""Every ToolResult carries a receipt that proves its record offline (real log, real keys)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from callward.audit import consistency, verify, verify_receipt


class TestReceipts:
    @pytest.mark.parametrize(
        "text",
        [
            'call function("square", [3], 9)',  # allowed: call.completed
            'call function("nope", [])',  # unknown tool: call.denied
            "call function(",  # malformed: call.rejected
        ],
    )
    def test_every_result_carries_a_provable_receipt(self, gateway, signer, text):
        """Allowed, denied and malformed results all carry an inclusion proof that verifies."""
        (result,) = gateway.handle_text(text, principal="alice")

        verified = verify_receipt(result.to_json()["receipt"], [signer.public_key()])

        assert result.receipt.proof is not None
        assert (result.receipt.seq, result.receipt.seq) == (verified.seq, verified.tree_size)
        assert result.receipt.record_hash == verified.record_hash

    def test_receipts_stay_valid_as_the_log_grows(self, gateway, signer, tmp_path):
        """An early receipt is consistent with the log's later checkpoints."""
        (first,) = gateway.handle_text('call function("square", [2], 4)', principal="alice")
        for _ in range(5):
            gateway.handle_text('call function("square", [3], 9)', principal="alice")
        gateway.audit.close()

        held = tmp_path / "receipt.checkpoint"
        held.write_text(first.receipt.proof.checkpoint)

        verified = verify(tmp_path / "audit.db", signer.public_key())
        proof = consistency(tmp_path / "audit.db", str(held), verified.records,
                            [signer.public_key()])

        assert (first.receipt.seq, verified.records) == (proof["old_size"], proof["new_size"])

    def test_cli_checks_a_tool_result_as_printed(self, gateway, signer, tmp_path):
        """`audit verify-receipt` accepts a ToolResult as `callward call` prints it."""
        (result,) = gateway.handle_text('call function("square", [3], 9)', principal="alice")
        printed = tmp_path / "result.json"
        printed.write_text(json.dumps(result.to_json()))
        public_key = tmp_path / "keys" / "audit-ed25519.pub"

        done = subprocess.run(
            [sys.executable, "-m", "callward.core.cli", "--home", str(tmp_path), "audit",
             "verify-receipt", str(printed), "--public-key", str(public_key)],
            capture_output=True, text=True, timeout=120, check=False,
        )

        assert 0 == done.returncode, done.stdout + done.stderr
        assert (result.receipt.seq, False) == (json.loads(done.stdout)["seq"],
                                               json.loads(done.stdout)["record_checked"])
