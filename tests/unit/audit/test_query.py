"""Reading records for review (callward audit show), read-only and filtered."""



from __future__ import annotations

import doctest
import io
import json

import pytest
from structlog.testing import capture_logs

import callward.audit
from callward.audit import (
    CallFilter,
    SQLiteAuditStore,
    export_records,
    query_calls,
    read_records,
)
from callward.core import ConfigurationError


@pytest.fixture(name="filled")
def _filled(store, fill):
    """A log of 10 records alternating call.authorized and call.completed."""
    fill(10)
    return store.path


class TestReadRecords:
    def test_all_records_in_seq_order(self, filled, store):
        """With no filter, every record is read in seq order, as the store holds it."""
        assert list(store.records()) == list(read_records(filled))

    def test_start_last_and_kind_filter(self, filled):
        """start skips earlier seqs, kind keeps one kind, last keeps the newest N in order."""
        assert [7, 8, 9, 10] == [record.seq for record in read_records(filled, start=7)]
        assert [2, 4, 6, 8, 10] == [
            record.seq for record in read_records(filled, kind="call.completed")
        ]
        assert [8, 9, 10] == [record.seq for record in read_records(filled, last=3)]
        assert [7, 9] == [
            record.seq for record in read_records(filled, kind="call.authorized", last=2)
        ]

    def test_missing_database_is_a_configuration_error(self, tmp_path):
        """Pointing at a file that does not exist is bad input, refused before reading."""
        with pytest.raises(ConfigurationError, match="does not exist"):
            read_records(tmp_path / "absent.db")

    def test_malformed_kind_is_refused(self, filled):
        """A kind filter must itself be a record kind."""
        with pytest.raises(ValueError, match="kind"):
            read_records(filled, kind="call.completed' OR 1=1 --")


class TestPackage:
    def test_docstring_example_runs(self):
        """The example in callward.audit's docstring runs as written."""
        with capture_logs():
            results = doctest.testmod(callward.audit, verbose=False)

        assert (0, 5) == (results.failed, results.attempted)


class TestQueryAndExport:
    @pytest.fixture(name="calls")
    def _calls(self, db, signer):
        with SQLiteAuditStore(db, signer) as store:
            for i, principal in enumerate(("alice", "bob", "alice")):
                authorized = store.append("call.authorized", {
                    "call": {"id": f"c{i}", "name": "square" if i else "add"},
                    "principal": principal, "session_id": f"s{i}"})
                store.append("call.completed", {"call_id": f"c{i}",
                                                "authorized_seq": authorized.seq,
                                                "outcome": "ok" if i else "timeout"})
            store.append("call.denied", {"call": {"id": "d", "name": "rm"}, "principal": "eve",
                                         "session_id": "", "decision": {
                                             "kind": "permission", "reasons": ["no-rm"]}})
        return db

    def test_completion_carries_the_principal_and_tool_of_its_call(self, calls):
        """A call.completed is found by the principal and tool its call.authorized named."""
        rows = list(query_calls(calls, CallFilter(principal="alice", kind="call.completed")))

        assert [("c0", "add", "timeout"), ("c2", "square", "ok")] == [
            (r["call_id"], r["tool"], r["outcome"]) for r in rows]

    @pytest.mark.parametrize(
        ("selected", "seqs"),
        [
            (CallFilter(tool="rm"), [7]),
            (CallFilter(outcome="permission"), [7]),
            (CallFilter(session="s1"), [3, 4]),
            (CallFilter(call_id="c2"), [5, 6]),
            (CallFilter(since="2000-01-01T00:00:00Z", until="2000-01-02T00:00:00Z"), []),
        ],
    )
    def test_each_filter_selects(self, calls, selected, seqs):
        """Every filter narrows the records to those that match it."""
        assert seqs == [r["seq"] for r in query_calls(calls, selected)]

    def test_malformed_time_is_a_configuration_error(self):
        """A --since that is not RFC 3339 is refused before reading."""
        with pytest.raises(ConfigurationError, match="RFC 3339"):
            CallFilter(since="yesterday")

    def test_jsonl_export_holds_every_record_with_its_signature(self, calls):
        """JSON Lines export writes one line per record with hash, key id and signature."""
        out = io.StringIO()

        count = export_records(calls, out)
        lines = [json.loads(line) for line in out.getvalue().splitlines()]

        assert 7 == count == len(lines)
        assert {"seq", "ts", "kind", "prev", "hash", "key_id", "signature", "body"} == set(
            lines[0])

    def test_ocsf_export_is_api_activity(self, calls):
        """OCSF export gives API Activity events (class 6003) with actor and operation."""
        out = io.StringIO()

        export_records(calls, out, format="ocsf")
        events = [json.loads(line) for line in out.getvalue().splitlines()]
        denied = events[-1]

        assert {6003} == {e["class_uid"] for e in events}
        assert {600399} == {e["type_uid"] for e in events}
        assert ("eve", "rm", "Failure", "permission") == (
            denied["actor"]["user"]["name"], denied["api"]["operation"], denied["status"],
            denied["status_detail"])
        assert all(isinstance(e["time"], int) and e["metadata"]["uid"] for e in events)
