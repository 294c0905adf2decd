"""Ed25519 audit keys on disk: creation, permissions, reuse, key ids, signatures."""



from __future__ import annotations

import hashlib
import os
import stat
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from callward.audit import FileSigner, Signer, key_id_of, load_public_key
from callward.core import ConfigurationError


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(name="keys_dir")
def _keys_dir(tmp_path: Path) -> Path:
    return tmp_path / "keys"


class TestLoadOrCreate:
    def test_first_use_creates_the_key_pair_with_tight_modes(self, keys_dir):
        """The private key is created 0600 (PKCS8 PEM), the public key 0644, the dir 0700."""
        FileSigner.load_or_create(keys_dir)

        assert 0o600 == _mode(keys_dir / "audit-ed25519.key")
        assert 0o644 == _mode(keys_dir / "audit-ed25519.pub")
        assert 0o700 == _mode(keys_dir)
        assert (keys_dir / "audit-ed25519.key").read_bytes().startswith(
            b"-----BEGIN PRIVATE KEY-----"
        )
        assert ["audit-ed25519.key", "audit-ed25519.pub"] == sorted(os.listdir(keys_dir))

    def test_private_key_is_0600_even_under_a_permissive_umask(self, keys_dir):
        """The mode is set by the creating open, so a umask of 0 cannot widen it."""
        old = os.umask(0)
        try:
            FileSigner.load_or_create(keys_dir)
        finally:
            os.umask(old)

        assert 0o600 == _mode(keys_dir / "audit-ed25519.key")

    def test_public_key_is_0644_even_under_a_strict_umask(self, keys_dir):
        """Reviewers must be able to read the public key whatever the umask was."""
        old = os.umask(0o077)
        try:
            FileSigner.load_or_create(keys_dir)
        finally:
            os.umask(old)

        assert 0o644 == _mode(keys_dir / "audit-ed25519.pub")

    def test_second_load_reuses_the_key(self, keys_dir):
        """Loading again returns the same key and leaves both files as they were."""
        first = FileSigner.load_or_create(keys_dir)
        private_pem = (keys_dir / "audit-ed25519.key").read_bytes()

        second = FileSigner.load_or_create(keys_dir)

        assert first.key_id == second.key_id
        assert first.sign(b"record") == second.sign(b"record")
        assert private_pem == (keys_dir / "audit-ed25519.key").read_bytes()
        assert first.public_key_pem() == (keys_dir / "audit-ed25519.pub").read_bytes()

    @pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o601])
    def test_private_key_open_to_group_or_others_is_refused(self, keys_dir, mode):
        """A private key file that lets group or others in is refused, not repaired."""
        FileSigner.load_or_create(keys_dir)
        private = keys_dir / "audit-ed25519.key"
        private.chmod(mode)

        with pytest.raises(ConfigurationError, match=f"mode {mode:04o}") as caught:
            FileSigner.load_or_create(keys_dir)

        assert "configuration_invalid" == caught.value.kind
        assert mode == _mode(private)

    def test_owner_only_read_only_key_is_accepted(self, keys_dir):
        """0400 keeps others out, so it loads."""
        key_id = FileSigner.load_or_create(keys_dir).key_id
        (keys_dir / "audit-ed25519.key").chmod(0o400)

        assert key_id == FileSigner.load_or_create(keys_dir).key_id

    def test_missing_public_key_is_written_again(self, keys_dir):
        """The public key is derived from the private key, so a lost one comes back."""
        signer = FileSigner.load_or_create(keys_dir)
        (keys_dir / "audit-ed25519.pub").unlink()

        FileSigner.load_or_create(keys_dir)

        assert signer.public_key_pem() == (keys_dir / "audit-ed25519.pub").read_bytes()

    def test_public_key_of_another_pair_is_refused(self, keys_dir):
        """A public key file that does not match the private key would mislead verifiers."""
        FileSigner.load_or_create(keys_dir)
        other = FileSigner(Ed25519PrivateKey.generate())
        (keys_dir / "audit-ed25519.pub").write_bytes(other.public_key_pem())

        with pytest.raises(ConfigurationError, match="does not belong"):
            FileSigner.load_or_create(keys_dir)

    def test_garbage_private_key_is_refused(self, keys_dir):
        """A private key file that is not PKCS8 PEM is a configuration error."""
        keys_dir.mkdir()
        fd = os.open(keys_dir / "audit-ed25519.key", os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"not a key")
        os.close(fd)

        with pytest.raises(ConfigurationError, match="PKCS8"):
            FileSigner.load_or_create(keys_dir)

    def test_private_key_of_another_algorithm_is_refused(self, keys_dir):
        """Only Ed25519 signs the audit log."""
        from cryptography.hazmat.primitives.asymmetric import ec

        keys_dir.mkdir()
        pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(keys_dir / "audit-ed25519.key", os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, pem)
        os.close(fd)

        with pytest.raises(ConfigurationError, match="not an Ed25519"):
            FileSigner.load_or_create(keys_dir)

    def test_concurrent_first_use_agrees_on_one_key(self, keys_dir):
        """Eight threads creating the key at once all end with the same key, no temp files."""
        key_ids: list[str] = []
        barrier = threading.Barrier(8)

        def load() -> None:
            barrier.wait()
            key_ids.append(FileSigner.load_or_create(keys_dir).key_id)

        threads = [threading.Thread(target=load) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        assert 8 == len(key_ids)
        assert 1 == len(set(key_ids))
        assert ["audit-ed25519.key", "audit-ed25519.pub"] == sorted(os.listdir(keys_dir))


class TestSigning:
    def test_signatures_are_deterministic_and_verify(self):
        """Ed25519 signs deterministically: the same bytes give the same 64-byte signature."""
        signer = FileSigner(Ed25519PrivateKey.generate())

        first = signer.sign(b"record bytes")

        assert first == signer.sign(b"record bytes")
        assert 64 == len(first)
        assert None is signer.public_key().verify(first, b"record bytes")
        assert first != signer.sign(b"record bytes.")

    def test_file_signer_is_a_signer(self):
        """FileSigner provides the Signer protocol's members."""
        signer: Signer = FileSigner(Ed25519PrivateKey.generate())

        assert 16 == len(signer.key_id)
        assert signer.public_key_pem().startswith(b"-----BEGIN PUBLIC KEY-----")


class TestKeyId:
    def test_key_id_is_sha256_of_the_raw_public_key(self):
        """The key id is the first 16 hex digits of SHA-256 over the 32 raw public key bytes."""
        public_key = Ed25519PrivateKey.generate().public_key()
        raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

        expected = hashlib.sha256(raw).hexdigest()[:16]

        assert expected == key_id_of(public_key)
        assert 32 == len(raw)

    def test_key_id_is_stable_across_load_and_files(self, keys_dir):
        """The signer, its public key file and a reload all give the same key id."""
        signer = FileSigner.load_or_create(keys_dir)

        from_file = key_id_of(load_public_key(keys_dir / "audit-ed25519.pub"))

        assert signer.key_id == from_file
        assert signer.key_id == FileSigner.load_or_create(keys_dir).key_id
        assert signer.key_id == key_id_of(signer.public_key())

    def test_known_key_has_known_id(self):
        """A fixed private key has a fixed id, so ids never depend on the run."""
        key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

        expected = hashlib.sha256(raw).hexdigest()[:16]

        assert expected == FileSigner(key).key_id


class TestLoadPublicKey:
    def test_missing_file_is_a_configuration_error(self, tmp_path):
        """A public key path that does not exist is the operator's mistake."""
        with pytest.raises(ConfigurationError, match="cannot read public key"):
            load_public_key(tmp_path / "nope.pub")

    def test_private_key_pem_is_not_a_public_key(self, keys_dir):
        """Passing the private key file where the public one belongs is refused."""
        FileSigner.load_or_create(keys_dir)

        with pytest.raises(ConfigurationError, match="not a PEM public key"):
            load_public_key(keys_dir / "audit-ed25519.key")
