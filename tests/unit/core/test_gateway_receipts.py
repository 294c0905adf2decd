"""Every ToolResult carries a receipt that proves its record offline (real log, real keys)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from callward.audit import (
    FileSigner,
    SQLiteAuditStore,
    consistency,
    verify,
    verify_receipt,
)
from callward.core import (
    Execution,
    ResourceLimits,
    Sha256Hex,
    ToolCall,
    ToolRegistry,
    ToolSpec,
    Usage,
    canonical_bytes,
)
from callward.core.gateway import Gateway
from callward.core.gateway._config import example_config_path
from callward.policies import Policy


class StubRunner:
    """Squares x at once: the sandbox itself is not what these tests are about."""

    @property
    def image_digest(self) -> Sha256Hex:
        return Sha256Hex("ab" * 32)

    def run(self, spec: ToolSpec, call: ToolCall, limits: ResourceLimits) -> Execution:
        x = call.arguments.get("x", 0)
        return Execution("ok", canonical_bytes(x * x), "", Usage(1.0, 0, 10))


@pytest.fixture(name="signer")
def _signer(tmp_path: Path) -> FileSigner:
    return FileSigner.load_or_create(tmp_path / "keys")


@pytest.fixture(name="gateway")
def _gateway(tmp_path: Path, signer: FileSigner):
    examples = example_config_path().parent
    registry = ToolRegistry()
    registry.load(str(examples / "tools.py"))
    store = SQLiteAuditStore(tmp_path / "audit.db", signer)
    store.open()
    yield Gateway(registry=registry, policy=Policy.from_file(examples / "policy.yaml"),
                  runner=StubRunner(), audit=store)
    store.close()


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
