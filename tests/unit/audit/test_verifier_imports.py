"""
The offline verifier never loads the audit writer: a reviewer's ``verify`` runs on
``callward.audit`` without the code that appends, and the writer's names load on use.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import callward.audit
from callward.audit import FileSigner, SQLiteAuditStore
from callward.audit._rotation import rotate_file_key
from callward.audit._sqlite import SQLiteAuditStore as WriterStore

#: The modules that write a log: the store, what only it uses, and the key rotation.
WRITER_MODULES = (
    "callward.audit._group_commit",
    "callward.audit._pending_calls",
    "callward.audit._rotation",
    "callward.audit._sqlite",
    "callward.audit._sqlite_connection",
    "callward.audit._writer_lock",
)


def loaded_after(code: str) -> list[str]:
    """The writer modules loaded after running ``code`` in a fresh interpreter."""
    probe = (
        f"{code}\nimport sys\n"
        f"print('loaded:' + ','.join(m for m in {WRITER_MODULES!r} if m in sys.modules))"
    )
    stdout = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    # structlog's default output (the verifier logs its verdict) shares stdout.
    (line,) = [line for line in stdout.splitlines() if line.startswith("loaded:")]
    return [name for name in line.removeprefix("loaded:").split(",") if name]


@pytest.fixture(name="signed_log")
def _signed_log(tmp_path: Path, db: Path, signer: FileSigner) -> tuple[Path, Path]:
    """A log of three records, and the public key file that verifies it."""
    with SQLiteAuditStore(db, signer) as store:
        authorized = store.append("call.authorized", {"call": {"id": "c1"}})
        store.append("call.completed", {"call_id": "c1", "authorized_seq": authorized.seq})
        store.append("call.denied", {"call_id": "c2", "kind": "schema"})
    public_key = tmp_path / "audit-ed25519.pub"
    public_key.write_bytes(signer.public_key_pem())
    return db, public_key


class TestVerifierImports:
    def test_importing_the_face_loads_no_writer(self):
        """`import callward.audit` loads none of the modules that write a log."""
        assert [] == loaded_after("import callward.audit")

    def test_verifying_a_log_loads_no_writer(self, signed_log):
        """
        Verifying a log, reading it, proving a record and checking its receipt, and
        rendering the review page (what `callward audit verify`, `show`, `prove` and
        `report` run) loads no writer module.
        """
        db, public_key = signed_log
        code = (
            "from pathlib import Path\n"
            "from callward.audit import (load_public_key, prove, read_records, render_report,\n"
            "    verify, verify_receipt)\n"
            f"db, key = Path({str(db)!r}), load_public_key(Path({str(public_key)!r}))\n"
            "assert verify(db, key).records == 3\n"
            "assert len(list(read_records(db))) == 3\n"
            "assert verify_receipt(prove(db, 2), [key]).seq == 2\n"
            "assert 'Verification OK' in render_report(db, [key])\n"
        )

        assert [] == loaded_after(code)

    def test_writer_names_load_on_first_use(self):
        """The first use of SQLiteAuditStore loads the writer, and not the key rotation."""
        code = "import callward.audit\ncallward.audit.SQLiteAuditStore"

        expected = [name for name in WRITER_MODULES if name != "callward.audit._rotation"]
        assert expected == loaded_after(code)

    def test_lazy_names_are_the_writers_own(self):
        """The names the face serves lazily are the writer's, not copies or wrappers."""
        expected = (WriterStore, rotate_file_key)
        assert expected == (callward.audit.SQLiteAuditStore, callward.audit.rotate_file_key)

    def test_unknown_name_is_an_attribute_error(self):
        """A name the face neither binds nor serves lazily is an AttributeError."""
        with pytest.raises(AttributeError, match="no attribute 'NoSuchStore'"):
            callward.audit.NoSuchStore  # noqa: B018 - the attribute access is the test


class TestTheVerifyCommand:
    def test_the_audit_commands_load_no_writer(self):
        """`callward audit verify` and its siblings import the read side only."""
        expected: list[str] = []
        assert expected == loaded_after("import callward.core.cli._audit")
