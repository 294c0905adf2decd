"""
The policy's state and the anomaly state in a fleet's PostgreSQL, on a real server
with real processes: a limit holds for all replicas together, an approval is used
once, labels and anomalies are shared, and a database that goes away denies and
comes back without a restart.
"""

from __future__ import annotations

import multiprocessing
import random
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest

from callward.core import CallContext, ToolCall, ToolRegistry, tool
from callward.core._postgres import StoreUrl
from callward.core.errors import StateUnavailable
from callward.policies import (
    Anomaly,
    AnomalyStateUnavailable,
    AnomalyStore,
    Policy,
    PolicyState,
    PolicyStateStore,
    PostgresAnomalyState,
    PostgresPolicyState,
    Proposal,
)
from callward.policies._state import RateCharge

NOW = 1_800_000_000.0
REPLICAS = 4
CALLS_EACH = 50
LIMIT = 30
SPAWN = multiprocessing.get_context("spawn")


def _store(url: str) -> StoreUrl:
    return StoreUrl.parse(url)


# -- workers, run in spawned processes (each its own replica) -------------------


def _charge_worker(url: str, algorithm: str, key: str, barrier: Any, results: Any) -> None:
    """A replica: one state of its own, 50 charges from 4 threads once all are ready."""
    state = PostgresPolicyState(_store(url), pool_size=4)
    charge = RateCharge(rule="shared-limit", key=key, algorithm=algorithm,  # type: ignore[arg-type]
                        limit=LIMIT, window_seconds=60.0)
    state.session_labels("warm-up")  # connected and migrated before the race
    barrier.wait()
    with ThreadPoolExecutor(max_workers=4) as threads:
        taken = list(threads.map(lambda _: state.charge([charge], NOW) is None,
                                 range(CALLS_EACH)))
    state.close()
    results.put(taken)


def _approval_worker(url: str, name: str, ids: list[str], barrier: Any, results: Any) -> None:
    """A replica racing the other for each approval in turn."""
    state = PostgresPolicyState(_store(url), pool_size=1)
    state.session_labels("warm-up")
    won: dict[str, bool] = {}
    for proposal_id in ids:
        barrier.wait()
        won[proposal_id] = state.use_approval(proposal_id, f"{name}-{proposal_id}", NOW)
    state.close()
    results.put(won)


def _run(target: Any, args_of: list[tuple[Any, ...]], barrier: Any, results: Any
         ) -> list[Any]:
    processes = [SPAWN.Process(target=target, args=(*args, barrier, results))
                 for args in args_of]
    for process in processes:
        process.start()
    found = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=30)
        assert 0 == process.exitcode
    return found


# -- fixtures --------------------------------------------------------------------


@pytest.fixture(name="states")
def _states(postgres_url: str):
    """Two replicas' policy states on one database."""
    first, second = (PostgresPolicyState(_store(postgres_url)) for _ in range(2))
    yield first, second
    first.close()
    second.close()


def _proposal(proposal_id: str, *, expires: float = NOW + 600) -> Proposal:
    return Proposal(id=proposal_id, rule_id="refunds-need-approval", call_id="c1",
                    principal="ana", session="s1", tool="refund", tool_digest="ab" * 32,
                    arguments_sha256=proposal_id.rjust(64, "0")[-64:], created=NOW,
                    expires=expires, status="proposed", decided_by=None, approval=None,
                    signature=None, key_id=None, used_call_id=None)


def _approve(state: PostgresPolicyState, proposal_id: str) -> None:
    state.propose(_proposal(proposal_id))
    assert state.decide_proposal(proposal_id, status="approved", by="bob", now=NOW,
                                 approval=b"{}", signature=b"sig", key_id="k1")


# -- the tests -------------------------------------------------------------------


class TestProtocols:
    def test_both_stores_satisfy_their_protocols(self, postgres_url):
        """The Postgres classes are what the evaluator and the detector type against."""
        policy_state: PolicyStateStore = PostgresPolicyState(_store(postgres_url))
        anomalies: AnomalyStore = PostgresAnomalyState(_store(postgres_url))

        assert (None, None) == (policy_state.path, anomalies.path)  # type: ignore[attr-defined]
        policy_state.close()
        anomalies.close()

    def test_importing_policies_loads_no_psycopg(self):
        """psycopg is loaded by the first use of a store, never by the import."""
        code = ("import sys, callward.policies; "
                "print(sorted(m for m in ('psycopg', 'psycopg_pool') if m in sys.modules))")
        loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                check=True).stdout.strip()

        assert "[]" == loaded


class TestSharedLimit:
    @pytest.mark.parametrize("algorithm", ["sliding_window", "token_bucket"])
    def test_four_replicas_racing_take_exactly_the_limit(self, postgres_url, algorithm):
        """4 processes x 50 charges at once against a limit of 30: exactly 30 pass."""
        barrier, results = SPAWN.Barrier(REPLICAS), SPAWN.Queue()
        key = f"limit-{uuid.uuid4().hex}"

        found = _run(_charge_worker, [(postgres_url, algorithm, key)] * REPLICAS, barrier,
                     results)

        taken = [ok for replica in found for ok in replica]
        assert (REPLICAS * CALLS_EACH, LIMIT) == (len(taken), sum(taken))

    def test_a_check_without_commit_takes_nothing(self, states):
        """charge(commit=False) answers for the fleet but consumes nothing."""
        first, second = states
        charge = RateCharge(rule="one", key="k", algorithm="sliding_window",  # type: ignore[arg-type]
                            limit=1, window_seconds=60.0)

        assert first.charge([charge], NOW, commit=False) is None
        assert second.charge([charge], NOW) is None
        assert "one" == first.charge([charge], NOW, commit=False)
        assert first.charge([charge], NOW + 61) is None  # the window moved on


class TestChargeMatchesTheFile:
    @pytest.mark.parametrize("algorithm", ["sliding_window", "token_bucket"])
    def test_the_same_charges_get_the_same_answers_as_the_sqlite_state(self, states,
                                                                         algorithm):
        """
        One round trip per charge in PostgreSQL, the arithmetic of the SQLite state:
        a few hundred charges at uneven times, one and two limits at once, answer alike.
        """
        first, _ = states
        local = PolicyState()
        rng = random.Random(16)  # noqa: S311 - a fixed sequence of times, not a secret
        small = RateCharge(rule="small", key=f"small-{algorithm}", algorithm=algorithm,  # type: ignore[arg-type]
                           limit=3, window_seconds=7.5)
        large = RateCharge(rule="large", key=f"large-{algorithm}", algorithm=algorithm,  # type: ignore[arg-type]
                           limit=5, window_seconds=20.0)
        now = NOW
        answers: list[tuple[object, object]] = []
        for _ in range(300):
            now += rng.choice((0.0, 0.1, 0.7, 1.3, 2.5, 6.0))
            charges = rng.choice(([small], [large], [small, large], [large, small]))
            commit = rng.random() > 0.2
            answers.append((first.charge(charges, now, commit=commit),
                            local.charge(charges, now, commit=commit)))

        assert [b for _, b in answers] == [a for a, _ in answers]
        assert {"small", "large", None} == {a for a, _ in answers}

    def test_two_limits_are_all_or_nothing(self, states):
        """The second limit exhausted: the first is not charged either."""
        first, second = states
        roomy = RateCharge(rule="roomy", key="roomy", algorithm="token_bucket",  # type: ignore[arg-type]
                           limit=2, window_seconds=600.0)
        tight = RateCharge(rule="tight", key="tight", algorithm="sliding_window",  # type: ignore[arg-type]
                           limit=1, window_seconds=600.0)
        assert second.charge([tight], NOW) is None

        assert "tight" == first.charge([roomy, tight], NOW)
        assert first.charge([roomy], NOW) is None
        assert first.charge([roomy], NOW) is None  # both of its two tokens were still there
        assert "roomy" == first.charge([roomy], NOW)


class TestBrokenConnections:
    def test_connections_the_server_ended_are_replaced_without_a_failure(self, postgres_url,
                                                                          states):
        """
        The server ends every idle connection (as a restart does): the next read and the
        next charge run on fresh connections, with no failure and nothing lost.
        """
        first, _ = states
        one = RateCharge(rule="one-only", key="k", algorithm="sliding_window",  # type: ignore[arg-type]
                         limit=1, window_seconds=600.0)
        first.add_session_labels("s1", frozenset({"secret"}), "c1", NOW)
        assert first.charge([one], NOW) is None

        with psycopg.connect(postgres_url, autocommit=True) as admin:
            ended = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "AND application_name = 'callward policy state'").fetchone()
        assert ended is not None
        assert int(str(ended[0])) >= 1
        time.sleep(0.2)

        assert frozenset({"secret"}) == first.session_labels("s1")
        assert "one-only" == first.charge([one], NOW + 1)


class TestApprovals:
    def test_two_replicas_racing_use_each_approval_once(self, postgres_url, states):
        """20 approvals, two processes racing for each: exactly one wins every time."""
        first, _ = states
        ids = [f"p{n:02d}-{uuid.uuid4().hex[:8]}" for n in range(20)]
        for proposal_id in ids:
            _approve(first, proposal_id)
        barrier, results = SPAWN.Barrier(2), SPAWN.Queue()

        found = _run(_approval_worker, [(postgres_url, name, ids) for name in ("a", "b")],
                     barrier, results)

        assert [1] * len(ids) == [found[0][i] + found[1][i] for i in ids]
        assert {"executed"} == {first.proposal(i).status for i in ids}  # type: ignore[union-attr]

    def test_a_proposal_made_on_one_replica_is_decided_on_another(self, states):
        """Propose on one, find the open one from the other, approve there, use here."""
        first, second = states
        made = first.propose(_proposal("x1"))
        again = second.propose(replace(_proposal("x2"), arguments_sha256=made.arguments_sha256))

        assert "x1" == again.id
        assert second.decide_proposal("x1", status="approved", by="bob", now=NOW,
                                      approval=b"a", signature=b"s", key_id="k")
        assert not first.decide_proposal("x1", status="rejected", by="eve", now=NOW,
                                         approval=None, signature=None, key_id=None)
        approved = first.approved_for("ana", "refund", made.arguments_sha256, NOW)
        assert approved is not None
        assert (b"a", b"s") == (approved.approval, approved.signature)
        assert first.use_approval("x1", "c9", NOW)
        assert not second.use_approval("x1", "c10", NOW)
        assert "c9" == second.proposal("x1").used_call_id  # type: ignore[union-attr]

    def test_an_expired_approval_is_named(self, states):
        first, second = states
        first.propose(_proposal("old", expires=NOW + 10))
        first.decide_proposal("old", status="approved", by="bob", now=NOW, approval=None,
                              signature=None, key_id=None)
        digest = _proposal("old").arguments_sha256

        assert "old" == second.expired_approval("ana", "refund", digest, NOW + 11)
        assert second.approved_for("ana", "refund", digest, NOW + 11) is None
        assert not second.use_approval("old", "c1", NOW + 11)
        assert ["old"] == [p.id for p in second.proposals()]


class TestSharedLabels:
    def test_labels_added_on_one_replica_are_seen_on_another(self, states):
        """session_labels, call_labels and unattributed_labels read across replicas."""
        first, second = states
        first.add_session_labels("s1", frozenset({"secret"}), "c1", NOW)
        first.add_session_labels("s1", frozenset({"pii"}), "c2", NOW, per_call=True)
        first.add_session_labels("s1", frozenset(), "c3", NOW, per_call=True)

        assert frozenset({"secret", "pii"}) == second.session_labels("s1")
        assert frozenset({"secret"}) == second.unattributed_labels("s1")
        assert {"c2": frozenset({"pii"}), "c3": frozenset()} == second.call_labels(
            "s1", ["c2", "c3", "c4", "c2"])
        assert frozenset() == second.session_labels("s2")


def _anomaly(anomaly_id: str, principal: str = "ana") -> Anomaly:
    return Anomaly(id=anomaly_id, principal=principal, tool="refund", metric="call_rate",
                   evidence={"observed": 40, "baseline": 4.0}, detected_at=NOW,
                   last_seen=NOW)


class TestSharedAnomalies:
    def test_an_anomaly_opened_on_one_replica_gates_another(self, postgres_url):
        """add on one, open_for on the other; resolve on the other, closed for the first."""
        first = PostgresAnomalyState(_store(postgres_url), quiet_seconds=900)
        second = PostgresAnomalyState(_store(postgres_url), quiet_seconds=900)
        first.add(_anomaly("an1"))

        assert ["an1"] == [a.id for a in second.open_for("ana", NOW + 60)]
        assert {"observed": 40, "baseline": 4.0} == dict(second.open_for("ana", NOW)[0].evidence)
        assert () == second.open_for("ana", NOW + 901)  # quiet
        second.seen("an1", NOW + 800)
        second.seen("an1", NOW + 5)  # never backwards
        assert ["an1"] == [a.id for a in first.open_for("ana", NOW + 901)]
        resolved = second.resolve("an1", by="alice", at=NOW + 10)
        assert resolved is not None
        assert ("resolved", "alice") == (resolved.status, resolved.resolved_by)
        assert first.resolve("an1", by="bob", at=NOW + 11) is None
        assert () == first.open_for("ana", NOW + 60)
        assert () == first.all_open()
        assert ["an1"] == [a.id for a in first.listing(status="resolved")]
        assert ["an1"] == [a.id for a in first.listing()]
        assert first.get("nope") is None
        first.add_first_use("ana", "refund", NOW, 3)
        second.add_first_use("ana", "refund", NOW + 1, 9)  # the first one stays
        assert {("ana", "refund"): 3} == second.first_uses()
        first.close()
        second.close()


class TestFailClosed:
    def test_a_stopped_database_denies_and_the_same_objects_recover(self, private_postgres):
        """
        Server stopped: every read and write raises StateUnavailable (kind
        state_unavailable); started again: the same objects serve, and what was
        counted before is still counted.
        """
        url = _store(private_postgres.url)
        state = PostgresPolicyState(url, timeout=1.0)
        anomalies = PostgresAnomalyState(url, timeout=1.0)
        one = RateCharge(rule="one-only", key="k", algorithm="sliding_window",  # type: ignore[arg-type]
                         limit=1, window_seconds=600.0)
        assert state.charge([one], NOW) is None
        _approve(state, "p1")
        anomalies.add(_anomaly("an1"))

        private_postgres.stop()
        failures = []
        for attempt in (lambda: state.charge([one], NOW + 1),
                        lambda: state.use_approval("p1", "c1", NOW + 1),
                        lambda: state.session_labels("s1"),
                        lambda: state.add_session_labels("s1", frozenset({"x"}), "c", NOW)):
            with pytest.raises(StateUnavailable) as caught:
                attempt()
            failures.append(caught.value)
        with pytest.raises(AnomalyStateUnavailable) as anomaly_failure:
            anomalies.open_for("ana", NOW)
        failures.append(anomaly_failure.value)

        assert {"state_unavailable"} == {failure.kind for failure in failures}
        assert all("cannot be reached" in failure.message for failure in failures)
        private_postgres.start()
        private_postgres.wait_until_answers()
        started = time.monotonic()
        assert "one-only" == _eventually(lambda: state.charge([one], NOW + 2))
        assert state.use_approval("p1", "c1", NOW + 2)
        assert ["an1"] == [a.id for a in _eventually(lambda: anomalies.open_for("ana", NOW))]
        assert time.monotonic() - started < 15
        state.close()
        anomalies.close()

    def test_a_closed_state_refuses(self, postgres_url):
        state = PostgresPolicyState(_store(postgres_url))
        state.close()

        with pytest.raises(StateUnavailable):
            state.session_labels("s1")


def _eventually(attempt: Any, seconds: float = 15.0) -> Any:
    """The answer of ``attempt`` once the pool has reconnected (it does so by itself)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return attempt()
        except StateUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


# -- end to end: two Policy objects as two replicas --------------------------------

POLICY = """
version: 1
default: deny
principals:
  ana: {roles: [agent]}
rules:
  - {id: agents-use-everything, effect: allow, roles: [agent], tools: ["*"]}
tools:
  read_file:
    output_labels: [secret]
rate_limits:
  - {id: posts-per-minute, tools: [http_post], limit: 3, window_seconds: 60}
flows:
  - {id: no-secret-egress, from: [secret], to: [egress]}
anomalies:
  - {id: stop-anomalous, effect: deny, tools: [read_file], roles: [agent]}
"""


@tool(version="1.0.0", parameters={
    "type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"],
    "additionalProperties": False})
def read_file(path: str) -> str:
    return path


@tool(version="1.0.0", parameters={
    "type": "object", "properties": {"url": {"type": "string"}}, "required": ["url"],
    "additionalProperties": False}, labels=("egress",))
def http_post(url: str) -> str:
    return url


class TestTwoReplicasDecide:
    @pytest.fixture(name="replicas")
    def _replicas(self, postgres_url, tmp_path: Path):
        path = tmp_path / "policy.yaml"
        path.write_text(POLICY)
        made = [Policy.from_file(path, state=PostgresPolicyState(_store(postgres_url)),
                                 anomalies=PostgresAnomalyState(_store(postgres_url)),
                                 clock=lambda: NOW) for _ in range(2)]
        yield made
        for policy in made:
            policy.state.close()
            policy.anomalies.close()  # type: ignore[union-attr]

    @pytest.fixture(name="registry")
    def _registry(self) -> ToolRegistry:
        registry = ToolRegistry()
        registry.register(read_file)
        registry.register(http_post)
        return registry

    def test_a_rate_limit_holds_across_both(self, replicas, registry):
        """Calls alternate between the replicas: 3 allowed in all, then rate_limit."""
        spec = registry.get("http_post")
        decisions = [replicas[n % 2].decide(
            ToolCall.create(id=f"c{n}", name="http_post", arguments={"url": "https://x"},
                            dialect="api"), spec, CallContext("ana", f"s{n}"))
            for n in range(6)]

        assert ["allow"] * 3 + ["deny"] * 3 == [d.effect for d in decisions]
        assert {"rate_limit"} == {d.kind for d in decisions[3:]}

    def test_labels_from_one_replica_deny_egress_on_the_other(self, replicas, registry):
        """A secret read through replica A taints the session for replica B."""
        first, second = replicas
        context = CallContext("ana", "shared-session")
        read = ToolCall.create(id="r1", name="read_file", arguments={"path": "a"},
                               dialect="api")
        assert "allow" == first.decide(read, registry.get("read_file"), context).effect
        first.observe_result(read, registry.get("read_file"), context, b'"AKIA"')
        post = ToolCall.create(id="p1", name="http_post", arguments={"url": "https://x"},
                               dialect="api")

        decision = second.decide(post, registry.get("http_post"), context)

        assert ("deny", "flow", ("no-secret-egress",)) == (decision.effect, decision.kind,
                                                           decision.reasons)

    def test_an_anomaly_opened_through_one_replica_gates_the_other(self, replicas, registry):
        """The detector of replica A opens an anomaly; replica B denies, until resolved."""
        first, second = replicas
        opened_by_a: PostgresAnomalyState = first.anomalies  # type: ignore[assignment]
        spec = registry.get("read_file")

        def read() -> Any:
            return second.decide(ToolCall.create(id="r", name="read_file",
                                                 arguments={"path": "a"}, dialect="api"),
                                 spec, CallContext("ana", "s"))

        assert "allow" == read().effect
        opened_by_a.add(_anomaly("an-x"))
        denied = read()
        assert ("deny", "permission", ("stop-anomalous", "anomaly.an-x")) == (
            denied.effect, denied.kind, denied.reasons)
        opened_by_a.resolve("an-x", by="alice", at=NOW)
        assert "allow" == read().effect
