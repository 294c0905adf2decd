"""
Signed checkpoints: the C2SP ``tlog-checkpoint`` body in a C2SP ``signed-note``.

A checkpoint reads::

    callward.audit/1f2e3d4c5b6a7988      <- origin: names the log
    1042                                 <- tree size: records 1..1042
    T3yq...base64 root hash...=          <- RFC 9162 root over those records

    — callward.audit/1f2e3d4c5b6a7988 q1w2e3...base64(key hash || signature)...

Invariants:

- The signed bytes are exactly the note text (the three lines, each ending in a
  newline); the signature line carries the 4-byte key hash
  ``SHA-256(name || 0x0A || 0x01 || public key)[:4]`` and the Ed25519 signature.
- A checkpoint is trusted only once a signature by a known key verifies; signatures
  from unknown keys are ignored, a failing signature from a known key rejects the
  whole note (signed-note spec, "Signatures").
- Parsing is strict: UTF-8, no control characters but newline, a bounded size, one
  decimal size without leading zeros, a 32-byte root.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from callward.audit._merkle import HASH_BYTES
from callward.audit.signer import Signer
from callward.core.errors import VerificationFailed

#: The signed-note signature type byte for Ed25519.
ED25519_SIGNATURE_TYPE: Final = b"\x01"
MAX_NOTE_BYTES: Final = 16 * 1024
_EM_DASH: Final = "\u2014"
_NAME = re.compile(r"\A[^\s+]+\Z")
_SIZE = re.compile(r"\A(0|[1-9][0-9]{0,18})\Z")
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")
_MAX_SIGNATURES: Final = 16


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """
    A verified tree head: the log named ``origin`` held ``size`` records with ``root``.

    Attributes:
        note: The whole signed note, as written and as witnesses keep it.
    """

    origin: str
    size: int
    root: bytes
    note: str

    def __post_init__(self) -> None:
        if self.size < 0:
            raise ValueError("a tree size is zero or more")
        if len(self.root) != HASH_BYTES:
            raise ValueError("a root hash is 32 bytes")


def note_key_hash(name: str, public_key: Ed25519PublicKey) -> bytes:
    """The 4-byte key hash of an Ed25519 note key: ``SHA-256(name || 0x0A || 0x01 || key)[:4]``."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(name.encode() + b"\n" + ED25519_SIGNATURE_TYPE + raw).digest()[:4]


def verifier_key(name: str, public_key: Ed25519PublicKey) -> str:
    """The signed-note verifier key string: ``name+hex(key hash)+base64(0x01 || key)``."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    encoded = base64.b64encode(ED25519_SIGNATURE_TYPE + raw).decode()
    return f"{name}+{note_key_hash(name, public_key).hex()}+{encoded}"


def checkpoint_body(origin: str, size: int, root: bytes) -> str:
    """The note text of a checkpoint: origin, size and base64 root, one per line."""
    if not _NAME.match(origin):
        raise ValueError("a checkpoint origin is one word without spaces or '+'")
    if size < 0 or len(root) != HASH_BYTES:
        raise ValueError("a checkpoint has a size of zero or more and a 32-byte root")
    return f"{origin}\n{size}\n{base64.b64encode(root).decode()}\n"


def sign_checkpoint(
    origin: str, size: int, root: bytes, *, signer: Signer, key_hash: bytes
) -> Checkpoint:
    """
    Sign a checkpoint with ``signer`` under the key name ``origin``.

    Args:
        key_hash: ``note_key_hash(origin, signer's public key)``, computed once by the caller.
    """
    text = checkpoint_body(origin, size, root)
    signature = signer.sign(text.encode())
    blob = base64.b64encode(key_hash + signature).decode()
    note = f"{text}\n{_EM_DASH} {origin} {blob}\n"
    return Checkpoint(origin=origin, size=size, root=root, note=note)


def _fail(message: str) -> VerificationFailed:
    return VerificationFailed(message, seq=None)


def open_checkpoint(
    note: str | bytes,
    public_keys: Iterable[Ed25519PublicKey],
    *,
    origin: str | None = None,
) -> Checkpoint:
    """
    Verify a signed checkpoint against trusted keys and return what it says.

    Args:
        public_keys: The keys trusted to sign this log's checkpoints.
        origin: If given, the checkpoint must name this log.

    Raises:
        VerificationFailed: The note is malformed, names another log, carries a
            failing signature from a known key, or no known key signed it.
    """
    note = _note_text(note)
    text, separator, signatures = note.rpartition("\n\n")
    if not separator or not signatures.endswith("\n"):
        raise _fail("the checkpoint is not a signed note (text, blank line, signatures)")
    text += "\n"
    checkpoint = _parse_body(text, note)
    if origin is not None and checkpoint.origin != origin:
        raise _fail(f"the checkpoint is for log {checkpoint.origin!r}, not {origin!r}")
    known = {
        (checkpoint.origin, note_key_hash(checkpoint.origin, key)): key for key in public_keys
    }
    lines = signatures[:-1].split("\n")
    if len(lines) > _MAX_SIGNATURES:
        raise _fail(f"the checkpoint has more than {_MAX_SIGNATURES} signatures")
    verified = False
    for line in lines:
        dash, _, rest = line.partition(" ")
        name, _, blob = rest.partition(" ")
        if dash != _EM_DASH or not _NAME.match(name) or not blob or " " in blob:
            raise _fail("a checkpoint signature line is not '— name base64'")
        try:
            raw = base64.b64decode(blob, validate=True)
        except binascii.Error as exc:
            raise _fail("a checkpoint signature is not base64") from exc
        if len(raw) < 5:  # a 4-byte key hash, then the signature
            raise _fail("a checkpoint signature is too short")
        key = known.get((name, raw[:4]))
        if key is None:
            continue  # the spec: ignore signatures from unknown keys
        try:
            key.verify(raw[4:], text.encode())
        except InvalidSignature:
            raise _fail(
                f"the checkpoint signature by {name} (key hash {raw[:4].hex()}) does not verify"
            ) from None
        verified = True
    if not verified:
        raise _fail("no trusted key signed the checkpoint")
    return checkpoint


def read_unverified(note: str | bytes) -> Checkpoint:
    """
    What a checkpoint *claims*, before any signature is checked: only to decide which
    tree size to compare it at. Call ``open_checkpoint`` before trusting it.

    Raises:
        VerificationFailed: The note is malformed.
    """
    text = _note_text(note)
    body, separator, _ = text.rpartition("\n\n")
    if not separator:
        raise _fail("the checkpoint is not a signed note (text, blank line, signatures)")
    return _parse_body(body + "\n", text)


def _note_text(note: str | bytes) -> str:
    data = note if isinstance(note, bytes) else note.encode("utf-8", "surrogatepass")
    if len(data) > MAX_NOTE_BYTES:
        raise _fail(f"the checkpoint is over {MAX_NOTE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _fail("the checkpoint is not UTF-8") from exc
    if _CONTROL.search(text):
        raise _fail("the checkpoint holds a control character")
    return text


def _parse_body(text: str, note: str) -> Checkpoint:
    lines = text.split("\n")
    if len(lines) < 4:  # origin, size, root, then the final newline
        raise _fail("the checkpoint text is not origin, size and root hash lines")
    origin, size_text, root_text = lines[0], lines[1], lines[2]
    if not _NAME.match(origin):
        raise _fail("the checkpoint origin is not one word without spaces or '+'")
    if not _SIZE.match(size_text):
        raise _fail("the checkpoint tree size is not a decimal number")
    try:
        root = base64.b64decode(root_text, validate=True)
    except binascii.Error as exc:
        raise _fail("the checkpoint root hash is not base64") from exc
    if len(root) != HASH_BYTES or base64.b64encode(root).decode() != root_text:
        raise _fail("the checkpoint root hash is not 32 bytes in canonical base64")
    return Checkpoint(origin=origin, size=int(size_text), root=root, note=note)


__all__ = [
    "ED25519_SIGNATURE_TYPE",
    "MAX_NOTE_BYTES",
    "Checkpoint",
    "checkpoint_body",
    "note_key_hash",
    "open_checkpoint",
    "read_unverified",
    "sign_checkpoint",
    "verifier_key",
]
