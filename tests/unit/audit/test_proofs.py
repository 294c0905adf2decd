"""Receipts and consistency proofs, checked offline with only the public key."""

from __future__ import annotations

import base64
import copy
import shutil

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from callward.audit import (
    DirectoryWitness,
    FileSigner,
    SQLiteAuditStore,
    consistency,
    prove,
    verify_receipt,
)
from callward.core import ConfigurationError, VerificationFailed


@pytest.fixture(name="log")
def _log(db, signer):
    """A closed log of 20 records with checkpoints at 8, 16 and 20."""
    with SQLiteAuditStore(db, signer, checkpoint_every=8) as store:
        for i in range(20):
            store.append("call.completed", {"call_id": f"c{i}", "i": i})
    return db


def _flip_char(text: str, i: int) -> str:
    replacement = "A" if text[i] != "A" else "B"
    return text[:i] + replacement + text[i + 1 :]


class TestReceipts:
    def test_receipt_file_verifies_with_only_the_public_key(self, log, signer):
        """`prove` gives a receipt under the first checkpoint covering the record."""
        receipt = prove(log, 11)

        verified = verify_receipt(receipt, [signer.public_key()])

        assert (11, 16, True) == (verified.seq, verified.tree_size, verified.record_checked)

    @pytest.mark.parametrize("seq", [1, 8, 9, 16, 17, 20])
    def test_every_position_proves(self, log, signer, seq):
        """First, last, boundary and tail records all prove."""
        verify_receipt(prove(log, seq), [signer.public_key()])

    def test_any_changed_field_is_detected(self, log, signer):
        """Changing any character of any field of a receipt makes it fail to verify."""
        receipt = prove(log, 11)
        accepted = []
        for field in ("record_hash", "leaf_hash", "checkpoint", "record", "signature"):
            text = receipt[field]
            for i in range(0, len(text), 3):
                changed = dict(receipt, **{field: _flip_char(text, i)})
                try:
                    verified = verify_receipt(changed, [signer.public_key()])
                except VerificationFailed:
                    continue
                if verified.record_hash != receipt["record_hash"]:
                    accepted.append((field, i))
        for i in range(len(receipt["inclusion_proof"])):
            changed = copy.deepcopy(receipt)
            changed["inclusion_proof"][i] = _flip_char(changed["inclusion_proof"][i], 0)
            with pytest.raises(VerificationFailed):
                verify_receipt(changed, [signer.public_key()])
        for field, value in (("seq", 12), ("tree_size", 20), ("key_id", "0" * 16)):
            with pytest.raises(VerificationFailed):
                verify_receipt(dict(receipt, **{field: value}), [signer.public_key()])

        assert [] == accepted

    def test_record_from_another_seq_is_refused(self, log, signer):
        """A genuine record and signature presented as another seq is refused."""
        other = prove(log, 12)
        receipt = dict(prove(log, 11), record=other["record"], signature=other["signature"],
                       record_hash=other["record_hash"], leaf_hash=other["leaf_hash"])

        with pytest.raises(VerificationFailed):
            verify_receipt(receipt, [signer.public_key()])

    def test_other_key_is_refused(self, log):
        """A receipt does not verify under a key that did not sign the log."""
        with pytest.raises(VerificationFailed, match="no trusted key"):
            verify_receipt(prove(log, 3), [Ed25519PrivateKey.generate().public_key()])

    def test_record_not_yet_checkpointed_says_what_to_do(self, db, signer):
        """Proving a record no checkpoint covers names the command that fixes it."""
        with SQLiteAuditStore(db, signer) as store:
            store.append("call.completed", {})
            store.append("call.completed", {})
            store.checkpoint()
            store.append("call.completed", {})

            with pytest.raises(ConfigurationError, match="no stored checkpoint covers record 3"):
                prove(db, 3)

    def test_tool_result_receipt_proves_its_leaf(self, db, signer):
        """The receipt a ToolResult carries verifies without the record bytes."""
        with SQLiteAuditStore(db, signer) as store:
            record = store.append("call.completed", {"call_id": "c1"})
            receipt = store.receipt_for(record).to_json()

        verified = verify_receipt(receipt, [signer.public_key()])

        assert (1, False) == (verified.seq, verified.record_checked)

    def test_proof_grows_with_the_log_height(self, log, signer):
        """A receipt under a checkpoint of 16 records carries log2(16) = 4 hashes."""
        receipt = prove(log, 11)

        verified = verify_receipt(receipt, [signer.public_key()])

        assert (4, 11) == (len(receipt["inclusion_proof"]), verified.seq)


class TestConsistency:
    def test_checkpoints_of_one_log_are_consistent(self, log, signer):
        """The proof between two stored checkpoints verifies."""
        proof = consistency(log, 8, 20, [signer.public_key()])

        assert (8, 20) == (proof["old_size"], proof["new_size"])

    def test_witness_checkpoint_file_against_the_latest(self, tmp_path, db, signer):
        """A checkpoint a witness holds can be proved against the log's latest."""
        witness = DirectoryWitness(tmp_path / "w")
        with SQLiteAuditStore(db, signer, witnesses=[witness]) as store:
            store.append("call.completed", {})
            held = witness.path_for(store.origin)
            kept = tmp_path / "old.checkpoint"
        shutil.copy(held, kept)
        with SQLiteAuditStore(db, signer, witnesses=[witness]) as store:
            for i in range(5):
                store.append("call.completed", {"i": i})

        assert 6 == consistency(db, str(kept), 6, [signer.public_key()])["new_size"]

    def test_rewritten_history_is_not_consistent(self, tmp_path, db, signer):
        """A log rebuilt with the same key after a checkpoint was taken fails."""
        with SQLiteAuditStore(db, signer, witnesses=[DirectoryWitness(tmp_path / "w")]) as s:
            for i in range(3):
                s.append("call.completed", {"i": i})
            old = DirectoryWitness(tmp_path / "w").path_for(s.origin)
        saved = tmp_path / "old.checkpoint"
        shutil.copy(old, saved)
        db.unlink()
        with SQLiteAuditStore(db, signer) as store:
            for i in range(6):
                store.append("call.completed", {"i": i, "forged": True})

        with pytest.raises(VerificationFailed):
            consistency(db, str(saved), 6, [signer.public_key()])

    def test_rolled_back_log_is_reported(self, tmp_path, db, signer):
        """A newer checkpoint than the log holds is reported as a rollback."""
        with SQLiteAuditStore(db, signer) as store:
            store.append("call.completed", {})
        backup = tmp_path / "backup.db"
        shutil.copy(db, backup)
        witness = DirectoryWitness(tmp_path / "w")
        with SQLiteAuditStore(db, signer, witnesses=[witness]) as store:
            store.append("call.completed", {})
            newer = witness.path_for(store.origin)
        shutil.copy(backup, db)

        with pytest.raises(VerificationFailed, match="rolled back"):
            consistency(db, 1, str(newer), [signer.public_key()])

    def test_checkpoint_signed_by_another_key_is_refused(self, tmp_path, log, signer):
        """A checkpoint file not signed by the log's key is not evidence."""
        attacker = FileSigner(Ed25519PrivateKey.generate())
        other_db = tmp_path / "other.db"
        with SQLiteAuditStore(other_db, attacker) as store:
            store.append("call.completed", {})
        note = prove(other_db, 1)["checkpoint"]
        forged = tmp_path / "forged.checkpoint"
        forged.write_text(note)

        with pytest.raises(VerificationFailed, match="no trusted key"):
            consistency(log, str(forged), 20, [signer.public_key()])

    def test_base64_of_a_record_is_its_bytes(self, log):
        """The receipt's record field is the exact signed bytes, base64-encoded."""
        receipt = prove(log, 2)

        assert base64.b64decode(receipt["record"]).startswith(b'{"body":')
