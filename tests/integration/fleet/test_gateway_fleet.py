"""
Gateways built from one configuration with a ``store`` section: replicas of one fleet.

Real PostgreSQL, real Docker Engine, real keys: the gateways share one log, one rate
limit and one registry, register as replicas, name themselves in their records, fail
closed while the database is away and serve again when it is back.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from callward.audit import verify
from callward.core._postgres import StoreUrl
from callward.core.errors import CallwardError
from callward.core.gateway import Gateway
from callward.core.gateway._replicas import replicas

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = REPO / "core" / "examples"
SQUARE = '<tool_call>{"name": "square", "arguments": {"x": 3}}</tool_call>'
POLICY = """\
version: 1
default: deny
principals:
  alice: {roles: [analyst]}
rules:
  - {id: analysts-calculate, effect: allow, roles: [analyst], tools: [square, add]}
rate_limits:
  - {id: fleet-squares, tools: [square], per: [tool], limit: LIMIT, window_seconds: 600}
"""
TOOL_V2 = '''
from callward.core import tool


@tool(version="2.0.0", parameters={
    "type": "object", "properties": {"x": {"type": "integer"}},
    "required": ["x"], "additionalProperties": False})
def square(x: int) -> int:
    """Return x squared, plus one (version 2)."""
    return x * x + 1
'''


def _fleet(tmp_path: Path, url: str, *, limit: int = 3) -> Path:
    (tmp_path / "tools.py").write_text((EXAMPLES / "tools.py").read_text())
    (tmp_path / "policy.yaml").write_text(POLICY.replace("LIMIT", str(limit)))
    config = tmp_path / "callward.yaml"
    config.write_text(
        "tools: [tools.py]\npolicy: policy.yaml\n"
        "sandbox: {runtime: runc, pool: {size: 0}}\n"
        f"store: {{url: '{url}', lease_seconds: 3, heartbeat_seconds: 1}}\n")
    return config


def _kinds(gateway: Gateway, text: str = SQUARE) -> list[str]:
    """Each call's result kind; the error's kind when the gateway raised (no receipt)."""
    try:
        return [result.kind for result in gateway.handle_text(text, principal="alice")]
    except CallwardError as exc:
        return [exc.kind]


def _public_keys(tmp_path: Path, names: list[str]) -> list[Path]:
    return [tmp_path / name / "keys" / "audit-ed25519.pub" for name in names]


def _records(url: str, kind: str) -> list[dict[str, object]]:
    from callward.audit import read_records

    return [record.body for record in read_records(url, kind=kind)]


def test_two_replicas_share_one_limit_one_log_and_the_replica_table(
        tmp_path, postgres_url, engine, leftover_containers):
    config = _fleet(tmp_path, postgres_url, limit=3)
    url = StoreUrl.parse(postgres_url)
    a = Gateway.from_config(config, home=tmp_path / "a")
    b = Gateway.from_config(config, home=tmp_path / "b")
    try:
        kinds = [kind for i in range(6) for kind in _kinds(a if i % 2 == 0 else b)]
        members = {member.replica_id: member for member in replicas(url)}
    finally:
        a.close()
        b.close()

    assert sorted(kinds) == ["ok"] * 3 + ["rate_limit"] * 3
    assert kinds[:3] == ["ok"] * 3
    started = _records(postgres_url, "gateway.started")
    assert len(started) == 2
    assert len({body["replica"] for body in started}) == 2
    assert set(members) == {body["replica"] for body in started}
    assert all(member.alive for member in members.values())
    assert len({member.policy_digest for member in members.values()}) == 1
    assert all(member.image_digest for member in members.values())
    # The one log holds both replicas' records, each signed by its own key.
    log = verify(postgres_url, _public_keys(tmp_path, ["a", "b"]))
    assert len(log.key_ids) == 2
    assert log.records == 2 + 3 * 2 + 3
    assert not leftover_containers()
    # Stopped replicas are no longer alive.
    assert not any(member.alive for member in replicas(url))


def test_a_replica_names_itself_in_a_policy_reload_and_the_fleet_sees_its_digest(
        tmp_path, postgres_url, engine):
    config = _fleet(tmp_path, postgres_url, limit=100)
    url = StoreUrl.parse(postgres_url)
    with Gateway.from_config(config, home=tmp_path / "a") as gateway:
        assert _kinds(gateway) == ["ok"]
        before = {member.policy_digest for member in replicas(url)}
        policy = tmp_path / "policy.yaml"
        policy.write_text(policy.read_text().replace("limit: 100", "limit: 50"))
        time.sleep(1.1)  # the policy file is polled at most once a second
        assert _kinds(gateway) == ["ok"]
        reloaded = _records(postgres_url, "policy.reloaded")
        deadline = time.monotonic() + 5
        while {m.policy_digest for m in replicas(url)} == before and time.monotonic() < deadline:
            time.sleep(0.1)
        after = {member.policy_digest for member in replicas(url)}
        digest = str(gateway.policy.digest)
    (started,) = _records(postgres_url, "gateway.started")
    assert len(reloaded) == 1
    assert reloaded[0]["replica"] == started["replica"]
    assert after != before
    assert after == {digest} == {reloaded[0]["digest"]}


def test_a_tool_loaded_from_one_replica_is_in_force_on_the_other_at_its_next_call(
        tmp_path, postgres_url, engine):
    config = _fleet(tmp_path, postgres_url, limit=100)
    with Gateway.from_config(config, home=tmp_path / "b") as other:
        assert other.handle_text(SQUARE, principal="alice")[0].content_json == b"9"
        (tmp_path / "tools_v2.py").write_text(TOOL_V2)
        loaded = subprocess.run(
            [str(REPO / ".venv" / "bin" / "callward"), "--home", str(tmp_path / "a"), "tools",
             "load", str(tmp_path / "tools_v2.py"), "--config", str(config)],
            capture_output=True, text=True, timeout=120, check=False, env=os.environ.copy())
        assert loaded.returncode == 0, loaded.stderr[-2000:]
        (result,) = other.handle_text(SQUARE, principal="alice")
    assert result.kind == "ok"
    assert result.content_json == b"10"
    assert [body["tool"]["ref"] for body in _records(postgres_url, "tool.loaded")] == [  # type: ignore[index]
        "square@2.0.0"]


def test_while_the_database_is_away_calls_fail_closed_and_the_same_replica_heals(
        tmp_path, private_postgres, engine, leftover_containers):
    config = _fleet(tmp_path, private_postgres.url, limit=100)
    with Gateway.from_config(config, home=tmp_path / "a") as gateway:
        assert _kinds(gateway) == ["ok"]
        private_postgres.stop("immediate")
        down = [kind for _ in range(2) for kind in _kinds(gateway)]
        private_postgres.start()
        private_postgres.wait_until_answers()
        deadline = time.monotonic() + 60
        healed = _kinds(gateway)
        while healed != ["ok"] and time.monotonic() < deadline:
            time.sleep(0.5)
            healed = _kinds(gateway)
    # Nothing ran without its authorization on record, and nothing was lost.
    assert set(down) <= {"audit_unavailable", "state_unavailable"}, down
    assert healed == ["ok"]
    log = verify(private_postgres.url, _public_keys(tmp_path, ["a"]))
    authorized = _records(private_postgres.url, "call.authorized")
    completed = _records(private_postgres.url, "call.completed")
    assert {b["call"]["id"] for b in authorized} == {  # type: ignore[index]
        b["call_id"] for b in completed}
    assert log.records >= 1 + 2 * 2
    assert not leftover_containers()


def _open_every_store(url: str, home: str, start: multiprocessing.synchronize.Event) -> None:
    """One replica starting: every store of the fleet opens (and migrates) at once."""
    from callward.audit import FileSigner, PostgresAuditStore
    from callward.core.gateway._replicas import ReplicaRegistry
    from callward.core.mcp._pins_postgres import PostgresPinStore
    from callward.core.registry._store_postgres import PostgresRegistryStore
    from callward.policies import PostgresAnomalyState, PostgresPolicyState

    store_url = StoreUrl.parse(url)
    start.wait()
    audit = PostgresAuditStore(store_url, FileSigner.load_or_create(Path(home) / "keys"))
    audit.open()
    audit.append("test.started", {"home": home})
    audit.close()
    with PostgresRegistryStore(store_url) as registry:
        registry.generation()
    state = PostgresPolicyState(store_url)
    state.session_labels("s")
    state.close()
    anomalies = PostgresAnomalyState(store_url)
    anomalies.all_open()
    anomalies.close()
    with PostgresPinStore(store_url) as pins:
        pins.load()
    replica = ReplicaRegistry(store_url, replica_id=home, version="test", policy_digest="p",
                              image_digest="i")
    replica.start()
    replica.stop()


def test_replicas_that_start_at_once_migrate_once_each(tmp_path, postgres_url):
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    processes = [context.Process(target=_open_every_store,
                                 args=(postgres_url, str(tmp_path / f"r{i}"), start))
                 for i in range(4)]
    for process in processes:
        process.start()
    time.sleep(1.0)  # let every interpreter reach the start line
    start.set()
    for process in processes:
        process.join(120)
    assert [process.exitcode for process in processes] == [0] * 4
    with psycopg.connect(postgres_url) as conn:
        versions = dict(conn.execute("SELECT component, version FROM callward_schema"))
    assert set(versions) >= {"audit", "policy_state", "anomalies", "registry", "mcp_pins",
                             "replicas"}
    assert all(version >= 1 for version in versions.values())
    log = verify(postgres_url, _public_keys(tmp_path, [f"r{i}" for i in range(4)]))
    assert log.records == 4
    assert len(replicas(StoreUrl.parse(postgres_url))) == 4


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
