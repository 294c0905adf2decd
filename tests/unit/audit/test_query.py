"""Reading records for review (callward audit show), read-only and filtered."""



from __future__ import annotations

import doctest

import pytest
from structlog.testing import capture_logs

import callward.audit
from callward.audit import read_records
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
