"""
Model tools in the live registry: listed by digest without preparing a model, withdrawn
by ``unload`` and reinstated by ``activate`` from another process, with a real SQLite
registry database, a real signed audit log and real Ed25519 keys (no Docker here; the
engine test is tests/integration/models/test_model_tools_live.py).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from callward.audit import FileSigner, SQLiteAuditStore, verify
from callward.core import ConfigurationError, ToolRegistry, UnknownTool
from callward.core.models._gguf import DEMO_MODEL_ID, DEMO_MODEL_SHA256
from callward.core.models._tools import (
    MODEL_TOOLS_SOURCE,
    ModelToolsSettings,
    model_tool_set,
    model_tool_specs,
)
from callward.core.registry import LiveRegistry, RegistryStore
from callward.core.registry._registry import RegistryDelta
from callward.core.testing import StubRunner
from callward.core.types import MIB
from callward.sandbox import ModelToolRunner, ModelWorkers, WorkerSpec, server_sha256
from tests.unit.core.test_registry_versions import tool_file


@pytest.fixture(scope="module", name="specs")
def _specs():
    """The three model tools of the default configuration (the demo model, not prepared)."""
    return {spec.name: spec for spec in
            model_tool_specs(ModelToolsSettings(), server_sha256=server_sha256())}


@pytest.fixture(name="audit")
def _audit(tmp_path: Path):
    store = SQLiteAuditStore(tmp_path / "audit.db", FileSigner.load_or_create(tmp_path / "keys"))
    store.open()
    yield store
    store.close()


@pytest.fixture(name="open_registry")
def _open_registry(tmp_path: Path, specs):
    """A registry whose base set holds the model tools (and ``double``), as each process has."""
    opened: list[RegistryStore] = []

    def open_(base_specs=None):
        registry = ToolRegistry()
        registry.load(tool_file(tmp_path, "1.0.0"))
        for spec in (specs if base_specs is None else base_specs).values():
            registry.add(spec, source_path=MODEL_TOOLS_SOURCE)
        store = RegistryStore(tmp_path / "registry.db")
        store.open()
        opened.append(store)
        registry.attach(store)
        return registry

    yield open_
    for store in opened:
        store.close()


@pytest.fixture(name="cli_live")
def _cli_live(open_registry, audit) -> LiveRegistry:
    """The registry `callward tools` opens: its own process, its own store."""
    registry = open_registry()
    store = registry.live
    assert isinstance(store, RegistryStore)
    return LiveRegistry(registry, store, audit)


def kinds(audit: SQLiteAuditStore) -> list[str]:
    return [record.kind for record in audit.records()]


class TestSpecsWithoutModels:
    def test_the_demo_model_is_named_by_its_pinned_digest_and_not_prepared(self, specs,
                                                                            tmp_path):
        """summarize/sentiment name the pinned GGUF digest; nothing is converted or read."""
        cache = tmp_path / "models"

        again = model_tool_set(ModelToolsSettings(), model_cache=cache,
                               server_sha256=server_sha256(), prepare=False)

        assert (DEMO_MODEL_ID, "bf16", DEMO_MODEL_SHA256) == (
            specs["summarize"].model.name, specs["summarize"].model.version,
            specs["summarize"].model.sha256)
        assert specs["sentiment"].model == specs["summarize"].model
        assert not cache.exists()
        assert tuple(specs.values()) == again.specs

    def test_embed_search_names_minilm_and_its_file_hashes(self, specs):
        """embed_search's model is all-MiniLM-L6-v2 with the digest of its files."""
        model = specs["embed_search"].model

        assert "all-MiniLM-L6-v2" == model.name
        assert 64 == len(model.sha256)
        assert model.sha256 != DEMO_MODEL_SHA256

    def test_a_configured_directory_gives_the_same_digest_either_way(self, tmp_path):
        """With a generator directory, the cheap specs are the ones a gateway registers."""
        directory = tmp_path / "gen"
        directory.mkdir()
        (directory / "weights.bin").write_bytes(b"\x00" * 1024)
        settings = ModelToolsSettings(tools=("sentiment",), generator_directory=directory)

        cheap = model_tool_specs(settings, server_sha256=server_sha256())
        full = model_tool_set(settings, model_cache=tmp_path / "m",
                              server_sha256=server_sha256()).specs

        assert full == cheap


class TestWithdrawAndReinstate:
    def test_unload_withdraws_a_model_tool_and_audits_its_digest(self, cli_live, audit, specs):
        """No --force needed; tool.unloaded names ref, digest and model; the name is gone."""
        spec = specs["embed_search"]

        (change,) = cli_live.unload("embed_search@1.0.0")

        assert ("tool.unloaded", spec.ref, spec.digest) == (change.kind, change.ref,
                                                            change.digest)
        body = audit.last().body
        assert {"name": "embed_search", "version": "1.0.0", "ref": spec.ref,
                "digest": spec.digest, "model": spec.model.to_json()} == body["tool"]
        assert body["withdrawn"] is True
        registry = cli_live.registry
        assert registry.get("embed_search") is None
        assert registry.get("embed_search@1.0.0") is None
        with pytest.raises(UnknownTool):
            registry.require("embed_search")
        assert [spec.ref] == [e.spec.ref for e in registry.withdrawn()]
        assert registry.get("summarize") is not None

    def test_another_process_sees_it_and_its_listener_hears_the_removal(self, cli_live,
                                                                       open_registry, specs):
        """A running gateway's refresh removes the version and tells its on_change listener."""
        gateway_registry = open_registry()
        heard: list[RegistryDelta] = []
        gateway_registry.on_change(heard.append)

        cli_live.unload("embed_search@1.0.0")
        gateway_registry.refresh()

        assert gateway_registry.get("embed_search") is None
        assert [((), (specs["embed_search"],))] == [(d.added, d.removed) for d in heard]

    def test_activate_reinstates_it_everywhere(self, cli_live, open_registry, audit, specs):
        """activate name@version brings a withdrawn model tool back, audited with its digest."""
        gateway_registry = open_registry()
        heard: list[RegistryDelta] = []
        gateway_registry.on_change(heard.append)
        cli_live.unload("embed_search@1.0.0")
        gateway_registry.refresh()

        change = cli_live.activate("embed_search@1.0.0")
        gateway_registry.refresh()

        spec = specs["embed_search"]
        assert change is not None
        assert ("tool.activated", spec.digest) == (change.kind, change.digest)
        assert audit.last().body["reinstated"] is True
        assert spec == gateway_registry.require("embed_search")
        assert (spec,) == heard[-1].added
        assert () == gateway_registry.withdrawn()
        assert ["unloaded", "activated"] == [
            e.action for e in cli_live._store.history("embed_search")]

    def test_a_withdrawn_tool_stays_withdrawn_across_restarts(self, cli_live, open_registry):
        """A gateway started later (a new process) reads the marker: still unknown."""
        cli_live.unload("sentiment@1.0.0")

        restarted = open_registry()

        assert restarted.get("sentiment") is None
        assert restarted.get("summarize") is not None

    def test_a_marker_for_an_older_digest_does_not_withdraw_a_changed_model(
        self, cli_live, open_registry, specs, tmp_path
    ):
        """The marker names a digest: a configuration whose model changed is served again."""
        cli_live.unload("embed_search@1.0.0")
        changed = model_tool_specs(ModelToolsSettings(tools=("embed_search",),
                                                      collection=_collection(tmp_path)),
                                   server_sha256=server_sha256())

        restarted = open_registry({"embed_search": changed[0]})

        assert changed[0] == restarted.get("embed_search")

    def test_unloading_twice_or_an_unknown_version_is_refused(self, cli_live, audit):
        """A withdrawn version is no longer known; nothing more is recorded."""
        cli_live.unload("summarize@1.0.0")
        before = kinds(audit)

        with pytest.raises(ConfigurationError, match=r"no version summarize@1\.0\.0"):
            cli_live.unload("summarize@1.0.0")
        with pytest.raises(ConfigurationError, match="no version summarize@2"):
            cli_live.activate("summarize@2")
        assert before == kinds(audit)

    def test_a_withdrawn_ref_cannot_be_taken_by_another_tool(self, cli_live, audit, tmp_path):
        """name@version stays immutable while withdrawn: a file reusing it is refused."""
        cli_live.unload("embed_search@1.0.0")
        before = kinds(audit)

        with pytest.raises(ConfigurationError, match="another digest"):
            cli_live.load(tool_file(tmp_path, "1.0.0", name="embed_search"))
        assert before == kinds(audit)
        assert cli_live.registry.get("embed_search") is None

    def test_a_configuration_function_tool_still_cannot_be_unloaded(self, cli_live, audit):
        """Only model tools are withdrawn; a function tool is changed in the configuration."""
        with pytest.raises(ConfigurationError, match="comes from the configuration"):
            cli_live.unload("double@1.0.0")
        assert [] == kinds(audit)

    def test_the_marker_is_not_a_stored_snapshot(self, cli_live, tmp_path):
        """No model tool is ever stored in the versions table: only its marker."""
        cli_live.unload("embed_search@1.0.0")

        with sqlite3.connect(tmp_path / "registry.db") as db:
            stored = db.execute("SELECT count(*) FROM versions").fetchone()[0]
            marks = db.execute("SELECT name, version FROM withdrawn").fetchall()
        assert 0 == stored
        assert [("embed_search", "1.0.0")] == marks

    def test_the_audit_log_verifies(self, cli_live, audit, tmp_path):
        """Unload and reinstate leave a log that verifies."""
        cli_live.unload("embed_search@1.0.0")
        cli_live.activate("embed_search@1.0.0")

        verify(tmp_path / "audit.db", tmp_path / "keys" / "audit-ed25519.pub")


def _collection(directory: Path) -> Path:
    path = directory / "other.jsonl"
    path.write_text('{"id": "a", "title": "t", "text": "another collection"}\n')
    path.chmod(0o644)
    return path


class FakeModelWorkers(ModelWorkers):
    """Real ModelWorkers bookkeeping; unload is recorded instead of reaching an engine."""

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__({name: WorkerSpec(name=name, task="generate", weights_dir=Path("/x"),
                                           digest="0" * 64,  # type: ignore[arg-type]
                                           limits=_LIMITS, collection=None,
                                           load_seconds=1.0)
                          for name in names}, memory_budget_bytes=4096 * MIB)
        self.unloaded: list[str] = []

    def unload(self, name: str) -> int | None:
        self.unloaded.append(name)
        return None


_LIMITS = model_tool_set(ModelToolsSettings(tools=("embed_search",)), model_cache=Path("/x"),
                         server_sha256=server_sha256(), prepare=False).workers["minilm"].limits


class TestWorkersFollowTheRegistry:
    @pytest.fixture(name="runner")
    def _runner(self, specs):
        routes = {name: ("minilm" if name == "embed_search" else "generator", spec.digest)
                  for name, spec in specs.items()}
        return ModelToolRunner(FakeModelWorkers(("generator", "minilm")), routes, StubRunner())

    def test_a_withdrawn_tool_stops_its_worker(self, runner, specs):
        """embed_search removed: the minilm worker is stopped."""
        stopped = runner.tools_removed((specs["embed_search"],), lambda name, digest: False)

        assert ("minilm",) == stopped
        assert ["minilm"] == runner.workers.unloaded

    def test_a_shared_worker_stays_while_another_tool_uses_it(self, runner, specs):
        """summarize removed while sentiment is still known: the generator keeps running."""
        still = {("sentiment", specs["sentiment"].digest)}

        stopped = runner.tools_removed((specs["summarize"],),
                                       lambda name, digest: (name, digest) in still)

        assert () == stopped
        assert [] == runner.workers.unloaded

    def test_a_removed_version_with_another_digest_stops_nothing(self, runner, specs, tmp_path):
        """Only the version a worker was configured for counts (e.g. a live function tool)."""
        (other,) = ToolRegistry().load(tool_file(tmp_path, "9.0.0", name="embed_search"))

        assert () == runner.tools_removed((other,), lambda name, digest: False)
