"""
Ed25519 keys for the audit log, and the ``Signer`` protocol the store signs with.

Invariants:

- The private key file is created with mode 0600 in one ``open`` (``O_CREAT | O_EXCL``)
  and appears under its final name only once it is complete (a hard link from a
  temporary file), so no reader ever sees a partial or world-readable key.
- A private key file whose mode lets group or others in is refused, never repaired.
- The key id is the first 16 hex digits of SHA-256 over the raw 32-byte public key, so
  anyone holding only the public key can compute it.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

import structlog
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from callward.core.errors import ConfigurationError
from callward.core.types import KeyId

log = structlog.get_logger()

PRIVATE_KEY_NAME: Final = "audit-ed25519.key"
PUBLIC_KEY_NAME: Final = "audit-ed25519.pub"
_PRIVATE_MODE: Final = 0o600
_PUBLIC_MODE: Final = 0o644
_MAX_KEY_FILE_BYTES: Final = 16 * 1024


class Signer(Protocol):
    """Signs audit records. One module per key backend (file, HSM, KMS)."""

    @property
    def key_id(self) -> KeyId:
        """The id verifiers use to pick the public key: ``key_id_of(public key)``."""
        ...

    def sign(self, data: bytes) -> bytes:
        """Return the 64-byte Ed25519 signature of ``data``."""
        ...

    def public_key_pem(self) -> bytes:
        """The public key as SubjectPublicKeyInfo PEM."""
        ...


def public_key_of(signer: Signer) -> Ed25519PublicKey:
    """
    The Ed25519 public key ``signer`` signs for.

    Raises:
        ConfigurationError: Its public key is not Ed25519.
    """
    key = serialization.load_pem_public_key(signer.public_key_pem())
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigurationError("the audit signer's public key is not Ed25519")
    return key


def key_id_of(public_key: Ed25519PublicKey) -> KeyId:
    """First 16 hex digits of SHA-256 over the raw 32-byte public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return KeyId(hashlib.sha256(raw).hexdigest()[:16])


def load_public_key(path: Path) -> Ed25519PublicKey:
    """
    Read an Ed25519 public key from a SubjectPublicKeyInfo PEM file.

    Raises:
        ConfigurationError: The file is missing, unreadable or not an Ed25519 public key.
    """
    try:
        data = _read_bounded(path)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigurationError(f"cannot read public key {path}: {reason}") from exc
    return _public_key_from_pem(data, path)


class FileSigner:
    """
    An Ed25519 key pair kept as two PEM files in a directory.

    Use ``FileSigner.load_or_create(keys_dir)``; the constructor takes a key already
    in memory (tests, or a key from elsewhere).
    """

    __slots__ = ("_key_id", "_private_key", "_public_pem")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        public_key = private_key.public_key()
        self._key_id = key_id_of(public_key)
        self._public_pem = _public_pem(public_key)

    @classmethod
    def load_or_create(cls, keys_dir: Path) -> FileSigner:
        """
        Load the audit key pair from ``keys_dir``, creating it on first use.

        Creates ``keys_dir`` (mode 0700) if missing, then ``audit-ed25519.key``
        (PKCS8 PEM, 0600) and ``audit-ed25519.pub`` (SubjectPublicKeyInfo PEM, 0644).
        Safe when several processes start at once: exactly one key wins.

        Raises:
            ConfigurationError: The private key file lets group or others read it, is
                not an Ed25519 PKCS8 PEM key, or the public key file does not match it;
                or the directory cannot be written.
        """
        private_path = keys_dir / PRIVATE_KEY_NAME
        public_path = keys_dir / PUBLIC_KEY_NAME
        try:
            keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            private_key = _load_private_key(private_path)
            if private_key is None:
                private_key = _create_private_key(private_path)
            signer = cls(private_key)
            _ensure_public_key(public_path, signer.public_key_pem())
        except OSError as exc:
            raise ConfigurationError(
                f"cannot use audit keys in {keys_dir}: {exc.strerror or type(exc).__name__}",
                remediation="make the keys directory writable by this user only",
            ) from exc
        log.info("audit_key_loaded", key_id=signer.key_id, keys_dir=str(keys_dir))
        return signer

    @property
    def key_id(self) -> KeyId:
        return self._key_id

    def sign(self, data: bytes) -> bytes:
        return self._private_key.sign(data)

    def public_key_pem(self) -> bytes:
        return self._public_pem

    def public_key(self) -> Ed25519PublicKey:
        return self._private_key.public_key()


def _public_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _public_key_from_pem(data: bytes, path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigurationError(f"{path} is not a PEM public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigurationError(f"{path} is not an Ed25519 public key")
    return key


def _read_bounded(path: Path) -> bytes:
    with path.open("rb") as file:
        data = file.read(_MAX_KEY_FILE_BYTES + 1)
    if len(data) > _MAX_KEY_FILE_BYTES:
        raise ConfigurationError(f"{path} is too large to be a key file")
    return data


def _load_private_key(path: Path) -> Ed25519PrivateKey | None:
    """The key in ``path``, or None if there is no such file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as file:
        # Check the mode of the file we opened, not of the name: no race with a swap.
        mode = stat.S_IMODE(os.fstat(file.fileno()).st_mode)
        if mode & 0o077:
            raise ConfigurationError(
                f"private key {path} has mode {mode:04o}; group and others must have no access",
                remediation=f"run `chmod 600 {path}` if only this user ever read it; "
                "otherwise treat the key as leaked and rotate it",
            )
        data = file.read(_MAX_KEY_FILE_BYTES + 1)
    if len(data) > _MAX_KEY_FILE_BYTES:
        raise ConfigurationError(f"{path} is too large to be a key file")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigurationError(f"{path} is not an unencrypted PKCS8 PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigurationError(f"{path} is not an Ed25519 private key")
    return key


def _write_new(path: Path, data: bytes, mode: int, *, widen_past_umask: bool = False) -> bool:
    """
    Make ``path`` hold ``data``, created with ``mode``, unless it already exists.

    The bytes go to a fresh temporary file opened ``O_CREAT | O_EXCL`` with ``mode``
    (so a private key is never readable by others, not even for an instant), are
    fsynced, and are then hard-linked to ``path``, which fails if ``path`` exists:
    readers see either no file or the whole file.

    Args:
        widen_past_umask: Set ``mode`` exactly even where the umask narrowed it
            (public files only).

    Returns:
        True if this call created ``path``, False if another already had.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as file:
            if widen_past_umask:
                os.fchmod(file.fileno(), mode)
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
    finally:
        tmp.unlink()
    _fsync_dir(path.parent)
    return True


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_private_key(path: Path) -> Ed25519PrivateKey:
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    if _write_new(path, pem, _PRIVATE_MODE):
        log.info("audit_key_created", path=str(path))
        return key
    # Another process created the key first; use theirs.
    existing = _load_private_key(path)
    if existing is None:
        raise ConfigurationError(f"private key {path} vanished while it was being created")
    return existing


def _ensure_public_key(path: Path, pem: bytes) -> None:
    try:
        existing = _read_bounded(path)
    except FileNotFoundError:
        # 0644 whatever the umask: a reviewer's account must be able to read it.
        _write_new(path, pem, _PUBLIC_MODE, widen_past_umask=True)
        existing = _read_bounded(path)
    if _public_pem(_public_key_from_pem(existing, path)) != pem:
        raise ConfigurationError(
            f"public key {path} does not belong to the private key beside it",
            remediation="remove the public key file; callward writes it again from the private key",
        )


if TYPE_CHECKING:

    def _is_a_signer(signer: FileSigner) -> Signer:
        """mypy proves FileSigner satisfies the protocol the store signs with."""
        return signer


__all__ = ["FileSigner", "Signer", "key_id_of", "load_public_key"]
