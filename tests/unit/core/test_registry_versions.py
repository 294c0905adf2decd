"""
The live registry: versions, activation, rollback, unloading and snapshots, with a
real SQLite registry database, a real signed audit log and real Ed25519 keys.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from pathlib import Path

import pytest

from callward.audit import FileSigner, SQLiteAuditStore, verify
from callward.core import (
    AuditRecord,
    AuditUnavailable,
    ConfigurationError,
    JSONValue,
    ToolRegistry,
)
from callward.core._canonical import canonical_bytes
from callward.core.gateway import Gateway
from callward.core.registry import LiveRegistry, RegistryStore
from callward.core.registry._files import read_tool_file
from callward.core.registry._spec import spec_from_preimage, spec_preimage
from callward.core.testing import StubRunner
from callward.policies import Policy


def tool_file(directory: Path, version: str, returns: str = "x * 2", name: str = "double",
              filename: str | None = None) -> Path:
    """A tool file defining one tool ``name`` at ``version`` that returns ``returns``."""
    path = directory / (filename or f"{name}_{version.replace('.', '_')}.py")
    path.write_text(
        "from callward.core import tool\n\n"
        f"@tool(version={version!r}, parameters={{'type': 'object', 'properties': "
        "{'x': {'type': 'integer'}}, 'required': ['x']})\n"
        f"def {name}(x: int) -> int:\n"
        f'    """Version {version}."""\n'
        f"    return {returns}\n"
    )
    return path


class CountingStore(RegistryStore):
    """A real registry store that counts full reads of its state."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.full_reads = 0

    def state(self):
        self.full_reads += 1
        return super().state()


class StubFailingAuditLog:
    """A real audit store whose appends fail from the Nth on, like a disk that fills."""

    def __init__(self, store: SQLiteAuditStore, fail_on: int) -> None:
        self._store = store
        self._fail_on = fail_on
        self.appends = 0

    def append(self, kind: str, body: Mapping[str, JSONValue]) -> AuditRecord:
        self.appends += 1
        if self.appends >= self._fail_on:
            raise AuditUnavailable("injected: the disk is full")
        return self._store.append(kind, body)


@pytest.fixture(name="audit")
def _audit(tmp_path: Path):
    store = SQLiteAuditStore(tmp_path / "audit.db", FileSigner.load_or_create(tmp_path / "keys"))
    store.open()
    yield store
    store.close()


@pytest.fixture(name="open_registry")
def _open_registry(tmp_path: Path):
    """Opens registries on one registry.db, as separate processes would."""
    opened: list[RegistryStore] = []

    def open_(base: tuple[Path, ...] = (), store_type=RegistryStore):
        registry = ToolRegistry()
        for path in base:
            registry.load(path)
        store = store_type(tmp_path / "registry.db")
        store.open()
        opened.append(store)
        registry.attach(store)
        return registry, store

    yield open_
    for store in opened:
        store.close()


@pytest.fixture(name="live")
def _live(open_registry, audit) -> LiveRegistry:
    registry, store = open_registry()
    return LiveRegistry(registry, store, audit)


def kinds(audit: SQLiteAuditStore) -> list[str]:
    return [record.kind for record in audit.records()]


class TestToolFile:
    def test_snapshot_is_what_was_read(self, tmp_path):
        """The spec comes from the text read once; editing the file later changes nothing."""
        path = tool_file(tmp_path, "1.0.0")
        snapshot = read_tool_file(path)
        path.write_text(path.read_text().replace("x * 2", "x * 3"))

        (spec,) = snapshot.specs
        assert "return x * 2" in spec.source
        assert "x * 2" in snapshot.text
        assert spec.digest == read_tool_file(tool_file(tmp_path, "1.0.0",
                                                       filename="copy.py")).specs[0].digest

    def test_preimage_round_trips_and_checks_the_digest(self, tmp_path):
        """A stored preimage rebuilds the same spec; a changed one is refused."""
        (spec,) = read_tool_file(tool_file(tmp_path, "1.0.0")).specs
        preimage = canonical_bytes(spec_preimage(spec))
        changed = preimage.replace(b"x * 2", b"x * 9")

        assert spec == spec_from_preimage(preimage, spec.digest)
        with pytest.raises(ConfigurationError, match="does not have the digest"):
            spec_from_preimage(changed, spec.digest)


    def test_declared_secrets_are_stored_and_digested(self, tmp_path):
        """The names of a tool's secrets survive the snapshot and are part of its digest."""
        path = tool_file(tmp_path, "1.0.0")
        path.write_text(path.read_text().replace("'required': ['x']})",
                                                 "'required': ['x']}, secrets=('API_TOKEN',))"))
        (spec,) = read_tool_file(path).specs
        (plain,) = read_tool_file(tool_file(tmp_path, "1.0.0", filename="plain.py")).specs

        assert ("API_TOKEN",) == spec_from_preimage(canonical_bytes(spec_preimage(spec)),
                                                    spec.digest).secrets
        assert spec.digest != plain.digest


class TestLoadAndActivate:
    def test_load_makes_the_new_version_active_and_audits_it(self, live, audit, tmp_path):
        """Loading v1 then v2 leaves v2 active, both callable by ref, each change audited."""
        live.load(tool_file(tmp_path, "1.0.0"))
        changes = live.load(tool_file(tmp_path, "2.0.0", "x * 20"))
        registry = live.registry

        assert "2.0.0" == registry.require("double").version
        assert "1.0.0" == registry.require("double@1.0.0").version
        assert ["tool.loaded", "tool.activated"] * 2 == kinds(audit)
        assert ("double@2.0.0", "double@1.0.0") == (changes[1].ref, changes[1].previous)
        record = audit.last()
        assert {"name": "double", "version": "2.0.0", "ref": "double@2.0.0",
                "digest": registry.require("double").digest} == record.body["tool"]

    def test_inactive_load_keeps_the_active_version(self, live, tmp_path):
        """--inactive adds a version that only an explicit name@version reaches."""
        live.load(tool_file(tmp_path, "1.0.0"))
        live.load(tool_file(tmp_path, "2.0.0", "x * 20"), activate=False)

        assert "1.0.0" == live.registry.require("double").version
        assert [("1.0.0", True), ("2.0.0", False)] == [
            (entry.spec.version, entry.active) for entry in live.registry.versions("double")]

    def test_same_version_with_another_digest_is_refused(self, live, audit, tmp_path):
        """name@version is immutable: a changed tool needs a new version number."""
        live.load(tool_file(tmp_path, "1.0.0"))
        before = kinds(audit)

        with pytest.raises(ConfigurationError, match="another digest"):
            live.load(tool_file(tmp_path, "1.0.0", "x * 3", filename="changed.py"))
        assert before == kinds(audit)
        assert "x * 2" in live.registry.require("double").source

    def test_loading_the_same_file_again_changes_nothing(self, live, audit, tmp_path):
        """Reloading an identical version writes no record."""
        path = tool_file(tmp_path, "1.0.0")
        live.load(path)
        before = kinds(audit)

        assert () == live.load(path)
        assert before == kinds(audit)

    def test_activate_an_unknown_version_is_refused(self, live, tmp_path):
        """Activating a version nobody loaded is an error; a plain name is not a ref."""
        live.load(tool_file(tmp_path, "1.0.0"))

        with pytest.raises(ConfigurationError, match="no version double@9"):
            live.activate("double@9")
        with pytest.raises(ConfigurationError, match="names no version"):
            live.activate("double")

    def test_activate_an_already_active_version_records_nothing(self, live, audit, tmp_path):
        """Activation is idempotent."""
        live.load(tool_file(tmp_path, "1.0.0"))
        before = kinds(audit)

        assert live.activate("double@1.0.0") is None
        assert before == kinds(audit)


class TestRollback:
    def test_rollback_walks_back_through_activations(self, live, audit, tmp_path):
        """v1 → v2 → v3, then rollback twice gives v2, then v1; a third has nowhere to go."""
        for number in (1, 2, 3):
            live.load(tool_file(tmp_path, f"{number}.0.0", f"x * {number}"))

        first = live.rollback("double")
        second = live.rollback("double")

        assert ("double@2.0.0", "double@3.0.0") == (first.ref, first.previous)
        assert ("double@1.0.0", "double@2.0.0") == (second.ref, second.previous)
        assert "1.0.0" == live.registry.require("double").version
        assert "tool.rolled_back" == audit.last().kind
        with pytest.raises(ConfigurationError, match="no earlier active version"):
            live.rollback("double")

    def test_rollback_returns_to_the_configuration_version(self, open_registry, audit, tmp_path,
                                                           examples):
        """A version loaded over the configuration's rolls back to the configuration's."""
        registry, store = open_registry((examples / "tools.py",))
        live = LiveRegistry(registry, store, audit)
        live.load(tool_file(tmp_path, "2.0.0", "x * x * 1", name="square"))

        assert "2.0.0" == registry.require("square").version
        assert "square@1.0.0" == live.rollback("square").ref
        assert "config" == registry.versions("square")[0].origin


class TestUnload:
    def test_unload_an_inactive_version(self, live, audit, tmp_path):
        """An inactive version is removed, audited, and no longer resolves."""
        live.load(tool_file(tmp_path, "1.0.0"))
        live.load(tool_file(tmp_path, "2.0.0", "x * 20"), activate=False)

        (change,) = live.unload("double@2.0.0")

        assert ("tool.unloaded", "double@2.0.0") == (change.kind, change.ref)
        assert live.registry.get("double@2.0.0") is None
        assert "1.0.0" == live.registry.require("double").version

    def test_active_version_needs_force(self, live, audit, tmp_path):
        """Unloading the active version is refused; with force the previous one takes over."""
        live.load(tool_file(tmp_path, "1.0.0"))
        live.load(tool_file(tmp_path, "2.0.0", "x * 20"))

        with pytest.raises(ConfigurationError, match="is the active version"):
            live.unload("double@2.0.0")
        live.unload("double@2.0.0", force=True)

        assert "1.0.0" == live.registry.require("double").version
        assert {"forced": True, "was_active": True,
                "active_after": "double@1.0.0"}.items() <= audit.last().body.items()

    def test_forced_unload_of_the_only_version_leaves_no_tool(self, live, tmp_path):
        """With nothing to fall back to, the name resolves to nothing (denied as unknown)."""
        live.load(tool_file(tmp_path, "1.0.0"))

        live.unload("double@1.0.0", force=True)

        assert live.registry.get("double") is None
        assert [] == list(live.registry)

    def test_configuration_versions_cannot_be_unloaded(self, open_registry, audit, examples):
        """The base set changes only with the configuration."""
        registry, store = open_registry((examples / "tools.py",))

        with pytest.raises(ConfigurationError, match="comes from the configuration"):
            LiveRegistry(registry, store, audit).unload("square@1.0.0")


class TestAcrossProcesses:
    def test_another_registry_on_the_same_file_sees_changes(self, live, open_registry, tmp_path):
        """A second registry (a running gateway) picks a change up at its next refresh."""
        gateway_registry, _ = open_registry(store_type=CountingStore)
        live.load(tool_file(tmp_path, "1.0.0"))

        assert gateway_registry.get("double") is None
        assert gateway_registry.refresh()
        assert "1.0.0" == gateway_registry.require("double").version

    def test_refresh_without_a_change_does_not_reread(self, open_registry, live, tmp_path):
        """Without a change, a refresh is one generation read, not a full read."""
        live.load(tool_file(tmp_path, "1.0.0"))
        registry, store = open_registry(store_type=CountingStore)
        reads = store.full_reads

        for _ in range(5):
            registry.refresh()

        assert reads == store.full_reads

    def test_a_failed_audit_write_rolls_the_change_back(self, open_registry, audit, tmp_path):
        """No record, no change: a gateway never sees a version whose load is not audited."""
        registry, store = open_registry()
        failing = LiveRegistry(registry, store, StubFailingAuditLog(audit, fail_on=2))

        with pytest.raises(AuditUnavailable):
            failing.load(tool_file(tmp_path, "1.0.0"))

        other, _ = open_registry()
        assert (None, []) == (other.get("double@1.0.0"), list(other.versions()))

    def test_a_tampered_snapshot_fails_closed(self, live, open_registry, tmp_path):
        """A snapshot changed outside callward: a new reader refuses to start; a running one
        keeps running the snapshot it verified, never the changed bytes."""
        live.load(tool_file(tmp_path, "1.0.0"))
        running, _ = open_registry()
        with sqlite3.connect(tmp_path / "registry.db") as db:
            db.execute("UPDATE versions SET "
                       "preimage = CAST(replace(preimage, 'x * 2', 'x * 7') AS BLOB)")
            db.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")

        assert running.refresh()
        assert "return x * 2" in running.require("double").source
        with pytest.raises(ConfigurationError, match="cannot be read"):
            open_registry()

    def test_an_unreadable_store_resolves_nothing(self, live, open_registry, tmp_path):
        """If the registry database cannot be read, every name is unknown until it can."""
        live.load(tool_file(tmp_path, "1.0.0"))
        running, store = open_registry()
        store.close()

        assert running.refresh() is False
        assert (None, []) == (running.get("double"), list(running))

    def test_every_change_is_in_a_verifiable_log(self, live, audit, tmp_path):
        """Loads, activations, rollbacks and unloads are signed records the log verifies."""
        live.load(tool_file(tmp_path, "1.0.0"))
        live.load(tool_file(tmp_path, "2.0.0", "x * 20"))
        live.rollback("double")
        live.unload("double@2.0.0")

        verified = verify(tmp_path / "audit.db", tmp_path / "keys" / "audit-ed25519.pub")

        assert ["tool.loaded", "tool.activated", "tool.loaded", "tool.activated",
                "tool.rolled_back", "tool.unloaded"] == kinds(audit)
        assert 6 == verified.records


class TestLoadIsAllOrNothing:
    def test_a_conflict_in_a_file_writes_nothing(self, live, audit, tmp_path):
        """A file whose second tool conflicts loads none of its tools and writes no record."""
        live.load(tool_file(tmp_path, "1.0.0", name="second"))
        before = kinds(audit)
        both = tmp_path / "both.py"
        both.write_text(tool_file(tmp_path, "1.0.0", name="first").read_text()
                        + "\n\n" + tool_file(tmp_path, "1.0.0", "x * 5", name="second",
                                             filename="x.py").read_text().split("\n", 2)[2])

        with pytest.raises(ConfigurationError, match="another digest"):
            live.load(both)

        assert before == kinds(audit)
        assert live.registry.get("first") is None


class TestPythonApi:
    def test_live_registry_of_a_gateway(self, open_registry, audit, tmp_path):
        """LiveRegistry.of(gateway) changes what that gateway resolves, audited in its log."""
        registry, _ = open_registry()
        policy = Policy.from_text("version: 1\ndefault: deny\nrules: []\n")
        gateway = Gateway(registry=registry, policy=policy, runner=StubRunner(), audit=audit)
        plain = Gateway(registry=ToolRegistry(), policy=policy, runner=StubRunner(), audit=audit)

        LiveRegistry.of(gateway).load(tool_file(tmp_path, "1.0.0"))

        assert "1.0.0" == gateway.registry.require("double").version
        assert "tool.activated" == audit.last().kind
        with pytest.raises(TypeError, match="no registry database"):
            LiveRegistry.of(plain)


class TestListeners:
    def test_a_running_registry_reports_added_and_removed_versions(self, live, open_registry,
                                                                   tmp_path):
        """A refresh tells listeners which versions came and went (e.g. to stop a worker)."""
        running, _ = open_registry()
        deltas = []
        running.on_change(lambda delta: deltas.append(
            ([s.ref for s in delta.added], [s.ref for s in delta.removed])))
        running.on_change(lambda _delta: 1 / 0)  # a failing listener is only logged
        live.load(tool_file(tmp_path, "1.0.0"))
        running.refresh()
        live.load(tool_file(tmp_path, "2.0.0", "x * 20"), activate=False)
        running.refresh()
        live.unload("double@2.0.0")
        running.refresh()
        running.refresh()  # nothing changed: no call

        assert [(["double@1.0.0"], []), (["double@2.0.0"], []), ([], ["double@2.0.0"])] == deltas
        assert "1.0.0" == running.require("double").version
