"""
The fleet's replica registry in one real PostgreSQL: replicas register, beat, update
their policy digest and stop; one that dies stops being alive after its lease, by the
database's clock; ``callward policy status --store`` shows them and warns when the
live ones enforce more than one policy.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from callward.core import StateUnavailable
from callward.core._postgres import StoreUrl
from callward.core.gateway._replicas import (
    Replica,
    ReplicaRegistry,
    policy_digests,
    replicas,
)

REPO = Path(__file__).resolve().parents[3]
D1, D2 = "d1" * 32, "d2" * 32
LEASE = 1.0
BEAT = 0.2
POLICY = "version: 1\ndefault: deny\nrules: []\n"


@pytest.fixture(name="member")
def _member(postgres_url: str) -> Iterator[Callable[..., ReplicaRegistry]]:
    """Starts replicas on the test's database; stops those left running."""
    started: list[ReplicaRegistry] = []

    def start(replica_id: str, policy_digest: str = D1, url: str = postgres_url
              ) -> ReplicaRegistry:
        registry = ReplicaRegistry(StoreUrl.parse(url), replica_id=replica_id,
                                   version="0.test", policy_digest=policy_digest,
                                   image_digest="ee" * 32, heartbeat_seconds=BEAT,
                                   lease_seconds=LEASE)
        registry.start()
        started.append(registry)
        return registry

    yield start
    for registry in started:
        registry.stop()


def by_id(url: str) -> dict[str, Replica]:
    return {member.replica_id: member for member in replicas(StoreUrl.parse(url))}


def wait_for(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("the condition did not hold in time")
        time.sleep(0.1)


def status(url: str, home: Path, policy: Path) -> subprocess.CompletedProcess[str]:
    """``callward policy status --store URL`` as an operator runs it (PGPASSFILE set)."""
    return subprocess.run(
        [str(REPO / ".venv" / "bin" / "callward"), "--home", str(home), "policy", "status",
         "--policy", str(policy), "--store", url],
        capture_output=True, text=True, check=False, timeout=120,
        env={**os.environ, "PGPASSFILE": os.environ["PGPASSFILE"]})


class TestReplicas:
    def test_three_replicas_two_policies(self, member, postgres_url):
        """Three replicas register alive, with their digests; two policies are in force."""
        for replica_id, digest in (("r1", D1), ("r2", D1), ("r3", D2)):
            member(replica_id, digest)

        members = by_id(postgres_url)

        assert {"r1": (True, D1), "r2": (True, D1), "r3": (True, D2)} == {
            key: (m.alive, m.policy_digest) for key, m in members.items()}
        assert (D1, D2) == policy_digests(members.values())
        assert {(os.getpid(), "0.test", "ee" * 32)} == {
            (m.pid, m.version, m.image_digest) for m in members.values()}

    def test_a_heartbeat_keeps_a_replica_alive_past_its_lease(self, member, postgres_url):
        """The heartbeat renews the row: alive after three leases, its heartbeat recent."""
        registry = member("r1")
        first = by_id(postgres_url)["r1"].heartbeat

        time.sleep(3 * LEASE)

        now = by_id(postgres_url)["r1"]
        assert (True, True) == (now.alive, now.heartbeat > first)
        assert now.age_seconds < LEASE
        assert registry.policy_digest == now.policy_digest

    def test_stop_marks_it_stopped_and_not_alive(self, member, postgres_url):
        member("r1")
        stopping = member("r2")

        stopping.stop()

        members = by_id(postgres_url)
        assert {"r1": (True, None)} == {k: (m.alive, m.stopped) for k, m in members.items()
                                        if m.alive}
        assert (False, True) == (members["r2"].alive, members["r2"].stopped is not None)
        assert (D1,) == policy_digests(members.values())

    def test_a_replica_that_dies_is_not_alive_after_its_lease(self, postgres_url, member):
        """A replica killed (no stop) stays alive until its lease runs out, then is not."""
        member("r1")
        child = subprocess.Popen(
            [sys.executable, "-c",
             "import sys, time\n"
             "from callward.core._postgres import StoreUrl\n"
             "from callward.core.gateway._replicas import ReplicaRegistry\n"
             f"r = ReplicaRegistry(StoreUrl.parse({postgres_url!r}), replica_id='doomed',\n"
             f"    version='0.test', policy_digest={D2!r}, image_digest='',\n"
             f"    heartbeat_seconds={BEAT}, lease_seconds={LEASE})\n"
             "r.start(); print('ready', flush=True); time.sleep(600)\n"],
            stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None
            while child.stdout.readline().strip() != "ready":  # after structlog's lines
                pass
            alive_before = by_id(postgres_url)["doomed"].alive
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=10)
            killed = time.monotonic()
            wait_for(lambda: not by_id(postgres_url)["doomed"].alive, seconds=LEASE + 5)
            gone_after = time.monotonic() - killed
        finally:
            child.kill()
            child.wait()

        dead = by_id(postgres_url)["doomed"]
        assert (True, None) == (alive_before, dead.stopped)
        assert gone_after <= LEASE + 1.0
        assert dead.age_seconds >= LEASE
        assert (D1,) == policy_digests(by_id(postgres_url).values())

    def test_update_is_seen_by_the_fleet(self, member, postgres_url):
        """A policy reload on one replica: its row names the new digest at once."""
        registry = member("r1", D1)
        started = time.monotonic()

        registry.update(policy_digest=D2)
        wait_for(lambda: by_id(postgres_url)["r1"].policy_digest == D2)

        assert time.monotonic() - started < BEAT  # written by a wake-up, not the next beat

    def test_no_replica_yet(self, postgres_url):
        """A database no replica ever started on lists none (no table, no error)."""
        assert () == replicas(StoreUrl.parse(postgres_url))

    def test_heartbeat_failures_are_logged_never_raised(self, private_postgres, member):
        """
        The server stopped: update and heartbeats fail quietly; started again, the same
        registry beats again and its row is alive with the digest set meanwhile.
        """
        registry = member("r1", D1, url=private_postgres.url)
        url = StoreUrl.parse(private_postgres.url)

        private_postgres.stop()
        started = time.monotonic()
        registry.update(policy_digest=D2)  # must not raise, nor wait for the database
        update_seconds = time.monotonic() - started
        with pytest.raises(StateUnavailable, match="replicas cannot be read"):
            replicas(url)
        private_postgres.start()
        private_postgres.wait_until_answers()
        wait_for(lambda: replicas(url)[0].policy_digest == D2, seconds=30)

        assert (True, D2) == (replicas(url)[0].alive, replicas(url)[0].policy_digest)
        assert update_seconds < 0.1

    def test_start_on_an_unreachable_server_raises(self, private_postgres):
        private_postgres.stop()
        registry = ReplicaRegistry(StoreUrl.parse(private_postgres.url), replica_id="r1",
                                   version="0.test", policy_digest=D1, image_digest="")

        with pytest.raises(StateUnavailable, match="cannot register"):
            registry.start()

    def test_a_heartbeat_must_be_shorter_than_the_lease(self, postgres_url):
        with pytest.raises(ValueError, match="shorter than the lease"):
            ReplicaRegistry(StoreUrl.parse(postgres_url), replica_id="r1", version="0",
                            policy_digest=D1, image_digest="", heartbeat_seconds=5,
                            lease_seconds=5)


class TestPolicyStatus:
    def test_status_lists_the_replicas_and_warns_of_two_policies(self, member, postgres_url,
                                                                  tmp_path):
        """Three replicas, two policies, one stopped: listed, and a WARNING line."""
        policy = tmp_path / "policy.yaml"
        policy.write_text(POLICY)
        for replica_id, digest in (("r1", D1), ("r2", D1), ("r3", D2)):
            member(replica_id, digest)
        member("r4", D2).stop()

        done = status(postgres_url, tmp_path / "home", policy)

        assert 0 == done.returncode, done.stderr
        section = json.loads(done.stdout)["replicas"]
        assert {"r1": (True, D1[:12]), "r2": (True, D1[:12]), "r3": (True, D2[:12]),
                "r4": (False, D2[:12])} == {
            m["id"]: (m["alive"], m["policy_digest"]) for m in section["members"]}
        assert (3, [D1, D2], False) == (section["live"], section["policy_digests"],
                                        section["same_policy"])
        assert f"WARNING: the 3 live replicas enforce 2 policies: {D1[:12]}, {D2[:12]}" in \
            done.stderr.splitlines()
        assert {"ee" * 6} == {m["image_digest"] for m in section["members"]}
        assert all(m["heartbeat_age_seconds"] < LEASE for m in section["members"]
                   if m["alive"])

    def test_status_says_one_policy_when_the_fleet_agrees(self, member, postgres_url,
                                                          tmp_path):
        policy = tmp_path / "policy.yaml"
        policy.write_text(POLICY)
        member("r1", D1)
        member("r2", D1)

        done = status(postgres_url, tmp_path / "home", policy)

        section = json.loads(done.stdout)["replicas"]
        assert (True, 2) == (section["same_policy"], section["live"])
        assert f"replicas: all 2 live replicas enforce policy {D1[:12]}" in \
            done.stderr.splitlines()
        assert "WARNING" not in done.stderr

    def test_status_without_a_store_is_unchanged(self, tmp_path):
        """No --store and no store in the configuration: no replicas key, no extra line."""
        policy = tmp_path / "policy.yaml"
        policy.write_text(POLICY)

        done = subprocess.run(
            [str(REPO / ".venv" / "bin" / "callward"), "--home", str(tmp_path / "home"),
             "policy", "status", "--policy", str(policy)],
            capture_output=True, text=True, check=False, timeout=120)

        assert (0, False, "") == (done.returncode, "replicas" in json.loads(done.stdout),
                                  done.stderr.strip())
