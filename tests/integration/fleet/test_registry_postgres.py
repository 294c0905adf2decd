"""
The fleet's live tool registry and MCP pins in one real PostgreSQL: two stores on one
database stand for two replicas. A change made through one is in force through the
other before its next call; concurrent changers lose nothing; a database that goes
away fails closed and serves again once it is back, without reopening.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from callward.audit import FileSigner, SQLiteAuditStore
from callward.core import ConfigurationError, ToolCall, ToolRegistry
from callward.core._postgres import StoreUrl
from callward.core.gateway import Gateway
from callward.core.mcp._pins import Pins, PinStore
from callward.core.mcp._pins_postgres import PostgresPinStore
from callward.core.registry import LiveRegistry, LiveStore, PostgresRegistryStore, RegistryStore
from callward.core.registry._files import read_tool_file
from callward.core.testing import StubRunner, ok_execution
from callward.policies import Policy

ALLOW_ALL = "version: 1\ndefault: deny\nrules:\n  - {id: anyone, effect: allow, " \
            "principals: ['*'], tools: ['*']}\n"


def tool_file(directory: Path, version: str, returns: str = "x * 2") -> Path:
    """A tool file defining ``double`` at ``version``."""
    path = directory / f"double_{version.replace('.', '_')}.py"
    path.write_text(
        "from callward.core import tool\n\n"
        f"@tool(version={version!r}, parameters={{'type': 'object', 'properties': "
        "{'x': {'type': 'integer'}}, 'required': ['x']})\n"
        "def double(x: int) -> int:\n"
        f'    """Version {version}."""\n'
        f"    return {returns}\n"
    )
    return path


@pytest.fixture(name="replica")
def _replica(postgres_url: str):
    """Opens registry stores on the test's database, as separate replicas would."""
    opened: list[PostgresRegistryStore] = []

    def open_(url: str = postgres_url, timeout: float = 5.0) -> PostgresRegistryStore:
        store = PostgresRegistryStore(StoreUrl.parse(url), timeout=timeout)
        store.open()
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


@pytest.fixture(name="audit")
def _audit(tmp_path: Path):
    store = SQLiteAuditStore(tmp_path / "audit.db", FileSigner.load_or_create(tmp_path / "keys"))
    store.open()
    yield store
    store.close()


class TestTwoReplicas:
    def test_a_change_through_one_is_in_the_others_next_read(self, replica, tmp_path):
        """put_version + set_active through A: B's generation and state show it at once."""
        a, b = replica(), replica()
        (spec,) = read_tool_file(tool_file(tmp_path, "1.0.0")).specs
        before = b.generation()

        with a.change() as tx:
            tx.put_version(spec, source_path="/tools/double.py", file_text="text",
                           file_sha256="00" * 32)
            tx.set_active("double", "1.0.0", previous=None, action="activated")

        state = b.state()
        assert (before + 1, ("double", "1.0.0", spec.digest), {"double": "1.0.0"}) == (
            b.generation(), *((v.spec.name, v.spec.version, v.spec.digest)
                              for v in state.versions), dict(state.active))
        assert spec == state.versions[0].spec
        assert "text" == b.file_text("double", "1.0.0")
        assert [("double", "1.0.0", None, "activated")] == [
            (e.name, e.version, e.previous, e.action) for e in b.history("double")]

    def test_a_rolled_back_change_is_seen_nowhere(self, replica, tmp_path):
        """An exception inside change() keeps the writes and the generation bump out."""
        a, b = replica(), replica()
        (spec,) = read_tool_file(tool_file(tmp_path, "1.0.0")).specs
        before = b.generation()

        def change_that_fails() -> None:
            with a.change() as tx:
                tx.put_version(spec, source_path="p", file_text="t", file_sha256="00" * 32)
                raise RuntimeError("audit failed")

        with pytest.raises(RuntimeError, match="audit failed"):
            change_that_fails()

        assert (before, ()) == (b.generation(), b.state().versions)

    def test_concurrent_changers_lose_no_update(self, replica):
        """
        Eight threads over two replicas each read the active version inside a change
        and activate the next number: with changers serialized, the count is exact.
        """
        stores = (replica(), replica())
        rounds, threads = 10, 8
        start = stores[0].generation()

        def bump(store: PostgresRegistryStore) -> None:
            for _ in range(rounds):
                with store.change() as tx:
                    current = int(store.state().active.get("counter", "0"))
                    tx.set_active("counter", str(current + 1), previous=str(current),
                                  action="activated")

        workers = [threading.Thread(target=bump, args=(stores[i % 2],)) for i in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()

        total = rounds * threads
        assert (str(total), start + total, total) == (
            stores[1].state().active["counter"], stores[1].generation(),
            len(stores[0].history("counter")))

    def test_one_version_one_digest_across_replicas(self, replica, tmp_path, audit):
        """name@version loaded through A with one digest is refused through B with another."""
        a, b = replica(), replica()
        registry_a, registry_b = ToolRegistry(), ToolRegistry()
        registry_a.attach(a)
        registry_b.attach(b)
        LiveRegistry(registry_a, a, audit).load(tool_file(tmp_path, "1.0.0"))
        other = tmp_path / "other"
        other.mkdir()

        with pytest.raises(ConfigurationError, match="already known with another digest"):
            LiveRegistry(registry_b, b, audit).load(tool_file(other, "1.0.0", returns="x * 3"))

    def test_stores_satisfy_the_protocol(self, replica, tmp_path):
        """Both stores are LiveStores, so LiveRegistry.of accepts either."""
        sqlite = RegistryStore(tmp_path / "registry.db")
        stores: tuple[LiveStore, ...] = (replica(), sqlite)

        assert all(isinstance(store, LiveStore) for store in stores)


class TestGatewaysOnOneRegistry:
    def test_a_tool_loaded_on_a_is_called_on_b_at_its_next_call(self, replica, tmp_path,
                                                                 audit):
        """
        Gateway B serves a version loaded, then rolled back, through replica A: each
        change is in force on B's very next call, with no refresh of B's own.
        """
        a, b = replica(), replica()
        registry_a, registry_b = ToolRegistry(), ToolRegistry()
        registry_a.attach(a)
        registry_b.attach(b)
        live_a = LiveRegistry(registry_a, a, audit)
        audit_b = SQLiteAuditStore(tmp_path / "audit-b.db",
                                   FileSigner.load_or_create(tmp_path / "keys-b"))
        audit_b.open()
        runner = StubRunner(lambda spec, call, limits: ok_execution(spec.version))
        gateway_b = Gateway(registry=registry_b, policy=Policy.from_text(ALLOW_ALL),
                            runner=runner, audit=audit_b)

        def call_b() -> tuple[str, object]:
            result = gateway_b.handle(ToolCall.create(id=f"c{time.monotonic_ns()}",
                                                      name="double", arguments={"x": 2},
                                                      dialect="api"), principal="alice")
            return result.kind, json.loads(result.content_json)

        try:
            unknown = call_b()
            live_a.load(tool_file(tmp_path, "1.0.0"))
            first = call_b()
            live_a.load(tool_file(tmp_path, "2.0.0"))
            second = call_b()
            live_a.rollback("double")
            rolled_back = call_b()
        finally:
            gateway_b.close()

        assert "unknown_tool" == unknown[0]
        assert [("ok", "1.0.0"), ("ok", "2.0.0"), ("ok", "1.0.0")] == [
            first, second, rolled_back]
        assert ["1.0.0", "2.0.0", "1.0.0"] == [spec.version for spec in runner.specs]


class TestFailClosed:
    def test_a_stopped_server_fails_closed_and_a_started_one_serves(self, private_postgres,
                                                                    tmp_path, audit):
        """
        The server stopped: reads raise ConfigurationError and the registry resolves
        nothing; started again: the same store, never reopened, serves again.
        """
        store = PostgresRegistryStore(StoreUrl.parse(private_postgres.url), timeout=2.0)
        store.open()
        try:
            registry = ToolRegistry()
            registry.attach(store)
            LiveRegistry(registry, store, audit).load(tool_file(tmp_path, "1.0.0"))
            assert registry.get("double") is not None

            private_postgres.stop()
            with pytest.raises(ConfigurationError, match="registry database cannot be read"):
                store.generation()
            with pytest.raises(ConfigurationError, match="cannot be written"), \
                    store.change():
                pass
            refreshed = registry.refresh()
            gone = registry.get("double")

            private_postgres.start()
            private_postgres.wait_until_answers()
            deadline = time.monotonic() + 30
            while not registry.refresh() and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            store.close()

        assert (False, None) == (refreshed, gone)
        assert "1.0.0" == registry.require("double").version


class TestPins:
    def test_a_pin_on_one_replica_is_seen_by_the_other(self, postgres_url):
        """Pinned through A, read through B; re-pinned through B, read through A."""
        url = StoreUrl.parse(postgres_url)
        a: Pins = PostgresPinStore(url)
        b: Pins = PostgresPinStore(url)
        try:
            before = b.get("files", "read")
            a.pin("files", "read", "11" * 32)
            pinned = b.get("files", "read")
            b.pin("files", "read", "22" * 32)
            b.pin("files", "write", "33" * 32)
            repinned = a.load()
        finally:
            for store in (a, b):
                assert isinstance(store, PostgresPinStore)
                store.close()

        assert (None, "11" * 32) == (before, pinned)
        assert {"files": {"read": "22" * 32, "write": "33" * 32}} == repinned

    def test_both_pin_stores_are_pins(self, tmp_path, postgres_url):
        stores: tuple[Pins, ...] = (PinStore(tmp_path / "pins.json"),
                                    PostgresPinStore(StoreUrl.parse(postgres_url)))
        assert 2 == len(stores)

    def test_pins_fail_closed(self, private_postgres):
        """The server stopped: reading a pin raises ConfigurationError (the tool stays blocked)."""
        store = PostgresPinStore(StoreUrl.parse(private_postgres.url), timeout=2.0)
        try:
            store.pin("files", "read", "11" * 32)
            private_postgres.stop()
            with pytest.raises(ConfigurationError, match="pin table cannot be read"):
                store.get("files", "read")
            private_postgres.start()
            private_postgres.wait_until_answers()
            deadline = time.monotonic() + 30
            while True:
                try:
                    found = store.get("files", "read")
                    break
                except ConfigurationError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
        finally:
            store.close()

        assert "11" * 32 == found
