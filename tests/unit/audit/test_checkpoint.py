"""Signed checkpoints: the C2SP tlog-checkpoint body in a C2SP signed note."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from callward.audit import FileSigner
from callward.audit._checkpoint import (
    note_key_hash,
    open_checkpoint,
    read_unverified,
    sign_checkpoint,
    verifier_key,
)
from callward.core import VerificationFailed

# The verifier key and signed note of the example in golang.org/x/mod/sumdb/note, the
# reference implementation the C2SP signed-note spec describes.
GO_VERIFIER_KEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_TEXT = (
    b"If you think cryptography is the answer to your problem,\n"
    b"then you don't know what your problem is.\n"
)
GO_SIGNATURE = (
    "x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM="
)
ORIGIN = "callward.audit/0123456789abcdef"
ROOT = bytes(range(32))


@pytest.fixture(name="signer")
def _signer() -> FileSigner:
    return FileSigner(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))


def _sign(signer: FileSigner, size: int = 42, root: bytes = ROOT) -> str:
    key_hash = note_key_hash(ORIGIN, signer.public_key())
    return sign_checkpoint(ORIGIN, size, root, signer=signer, key_hash=key_hash).note


class TestNoteKeys:
    def test_key_hash_matches_the_reference_vector(self) -> None:
        """The key hash is SHA-256(name || 0x0A || 0x01 || key)[:4], as Go's note package."""
        name, key_hash, encoded = GO_VERIFIER_KEY.split("+")
        key = Ed25519PublicKey.from_public_bytes(base64.b64decode(encoded)[1:])

        assert key_hash == note_key_hash(name, key).hex()
        assert GO_VERIFIER_KEY == verifier_key(name, key)

    def test_reference_signature_is_over_the_note_text(self) -> None:
        """The reference signature is the key hash then Ed25519 over exactly the text."""
        _, key_hash, encoded = GO_VERIFIER_KEY.split("+")
        key = Ed25519PublicKey.from_public_bytes(base64.b64decode(encoded)[1:])
        blob = base64.b64decode(GO_SIGNATURE)

        key.verify(blob[4:], GO_TEXT)
        assert key_hash == blob[:4].hex()


class TestCheckpoints:
    def test_checkpoint_reads_as_the_c2sp_format(self, signer: FileSigner) -> None:
        """Origin, size and base64 root, a blank line, then '— origin base64(hash||sig)'."""
        note = _sign(signer)
        lines = note.split("\n")

        assert [ORIGIN, "42", base64.b64encode(ROOT).decode(), ""] == lines[:4]
        assert lines[4].startswith(f"\u2014 {ORIGIN} ")
        assert "" == lines[5]

    def test_signed_checkpoint_opens_with_the_public_key(self, signer: FileSigner) -> None:
        """A checkpoint signed by the key opens and says what was signed."""
        checkpoint = open_checkpoint(_sign(signer), [signer.public_key()], origin=ORIGIN)

        assert (ORIGIN, 42, ROOT) == (checkpoint.origin, checkpoint.size, checkpoint.root)

    def test_every_single_byte_change_is_detected(self, signer: FileSigner) -> None:
        """Changing any one byte of a checkpoint makes it fail to open."""
        note = _sign(signer).encode()
        accepted = []
        for i in range(len(note)):
            for replacement in {note[i] ^ 0x01, ord("A") if note[i] != ord("A") else ord("B")}:
                changed = note[:i] + bytes([replacement]) + note[i + 1 :]
                try:
                    checkpoint = open_checkpoint(changed, [signer.public_key()], origin=ORIGIN)
                except VerificationFailed:
                    continue
                if (checkpoint.size, checkpoint.root) != (42, ROOT):
                    accepted.append(i)

        assert [] == accepted

    def test_unknown_key_is_not_trusted(self, signer: FileSigner) -> None:
        """A checkpoint signed only by a key not given is rejected."""
        other = Ed25519PrivateKey.generate().public_key()

        with pytest.raises(VerificationFailed, match="no trusted key signed"):
            open_checkpoint(_sign(signer), [other])

    def test_other_log_is_refused(self, signer: FileSigner) -> None:
        """A checkpoint of another origin is not this log's."""
        with pytest.raises(VerificationFailed, match="is for log"):
            open_checkpoint(_sign(signer), [signer.public_key()], origin="callward.audit/other")

    def test_forged_signature_from_a_known_key_rejects_the_note(self, signer: FileSigner) -> None:
        """A signature line with the known key's hash but a wrong signature fails the note."""
        note = _sign(signer)
        text, _, line = note.rstrip("\n").rpartition("\n")
        blob = base64.b64decode(line.rsplit(" ", 1)[1])
        forged = base64.b64encode(blob[:4] + bytes(64)).decode()
        changed = f"{text}\n\u2014 {ORIGIN} {forged}\n"

        with pytest.raises(VerificationFailed, match="does not verify"):
            open_checkpoint(changed, [signer.public_key()])

    @pytest.mark.parametrize(
        ("note", "message"),
        [
            ("", "not a signed note"),
            (f"{ORIGIN}\n42\n\n\u2014 x AAAA\n", "root hash"),
            (f"{ORIGIN}\n042\n{base64.b64encode(ROOT).decode()}\n\n\u2014 x AAAAAA==\n", "size"),
            (f"{ORIGIN}\n42\n{base64.b64encode(ROOT).decode()}\n\n- x AAAAAA==\n", "signature"),
            (f"{ORIGIN}\n42\n{base64.b64encode(ROOT).decode()}\x07\n\n\u2014 x AA==\n", "control"),
        ],
    )
    def test_malformed_notes_are_refused(self, note: str, message: str) -> None:
        """Malformed checkpoints fail with a message saying which part is wrong."""
        with pytest.raises(VerificationFailed, match=message):
            open_checkpoint(note, [Ed25519PrivateKey.generate().public_key()])

    def test_read_unverified_gives_the_claimed_size(self, signer: FileSigner) -> None:
        """Before checking signatures a verifier can read which size a checkpoint claims."""
        assert 7 == read_unverified(_sign(signer, size=7)).size
