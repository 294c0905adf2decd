"""The record format: the bytes hashed and signed, sealing, and checking one record."""



from __future__ import annotations

import dataclasses
import hashlib
from datetime import UTC, datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from callward.audit import FileSigner
from callward.audit._chain import (
    GENESIS_PREV,
    MAX_RECORD_BYTES,
    canonical_body,
    check_record,
    format_ts,
    is_record_kind,
    record_bytes,
    seal,
)
from callward.core import VerificationFailed, canonical_bytes

TS = "2026-11-25T08:00:00.123456Z"
SIGNER = FileSigner(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))

bodies = st.dictionaries(
    st.text(max_size=8),
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**53 - 1), max_value=2**53 - 1)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=8),
        lambda children: st.lists(children, max_size=3)
        | st.dictionaries(st.text(max_size=8), children, max_size=3),
        max_leaves=10,
    ),
    max_size=5,
)


def _check(record, *, expected_seq=1, prev=GENESIS_PREV, not_before=None):
    check_record(
        record,
        public_key=SIGNER.public_key(),
        key_id=SIGNER.key_id,
        expected_seq=expected_seq,
        prev=prev,
        not_before=not_before,
    )


def _seal(seq=1, prev=GENESIS_PREV, ts=TS, kind="call.completed", body=None):
    return seal(
        seq=seq,
        ts=ts,
        kind=kind,
        prev=prev,
        body_json=canonical_body(body if body is not None else {"call_id": "c1"}),
        signer=SIGNER,
    )


class TestRecordBytes:
    @given(bodies, st.integers(min_value=1, max_value=2**53 - 1))
    def test_record_bytes_are_the_canonical_encoding_of_the_six_members(self, body, seq):
        """The bytes built around a canonical body equal canonical_bytes of the whole record."""
        expected = canonical_bytes(
            {
                "seq": seq,
                "ts": TS,
                "kind": "call.completed",
                "prev": GENESIS_PREV,
                "key_id": SIGNER.key_id,
                "body": body,
            }
        )

        actual = record_bytes(
            seq=seq,
            ts=TS,
            kind="call.completed",
            prev=GENESIS_PREV,
            key_id=SIGNER.key_id,
            body_json=canonical_body(body),
        )

        assert expected == actual

    @given(
        st.integers(min_value=1, max_value=2**53 - 1),
        st.text(max_size=30),
        st.text(max_size=20),
        st.text(max_size=70),
        st.text(max_size=20),
    )
    def test_record_bytes_match_canonical_bytes_for_any_text(self, seq, ts, kind, prev, key_id):
        """Whatever the member strings hold (quotes, controls, non-ASCII), the bytes are JCS."""
        expected = canonical_bytes(
            {"seq": seq, "ts": ts, "kind": kind, "prev": prev, "key_id": key_id, "body": {}}
        )

        actual = record_bytes(
            seq=seq, ts=ts, kind=kind, prev=prev, key_id=key_id, body_json=b"{}"
        )

        assert expected == actual

    def test_layout_of_one_record(self):
        """The members appear sorted, without whitespace, body first."""
        expected = (
            b'{"body":{"a":1},"key_id":"k","kind":"call.denied","prev":"'
            + b"0" * 64
            + b'","seq":1,"ts":"2026-11-25T08:00:00.123456Z"}'
        )

        assert expected == record_bytes(
            seq=1, ts=TS, kind="call.denied", prev=GENESIS_PREV, key_id="k", body_json=b'{"a":1}'
        )


class TestSeal:
    def test_sealed_record_hashes_and_signs_its_bytes(self):
        """record_hash is SHA-256 of record_bytes, and the signature verifies over them."""
        record = _seal()

        assert hashlib.sha256(record.record_bytes).hexdigest() == record.record_hash
        assert None is SIGNER.public_key().verify(record.signature, record.record_bytes)
        assert SIGNER.key_id == record.key_id
        assert {"call_id": "c1"} == record.body

    def test_second_record_chains_to_the_first(self):
        """prev of record 2 is the hash of record 1; record 1 starts from the genesis value."""
        first = _seal()
        second = _seal(seq=2, prev=first.record_hash)

        assert "0" * 64 == first.prev
        assert first.record_hash == second.prev
        assert None is _check(second, expected_seq=2, prev=first.record_hash, not_before=first.ts)

    @pytest.mark.parametrize(
        "kind",
        ["call", "Call.completed", "call.completed ", "call..completed", "call.1", ".call", ""],
    )
    def test_malformed_kind_is_refused(self, kind):
        """Kinds are dotted lower-case names; anything else is a programming error."""
        with pytest.raises(ValueError, match="kind"):
            _seal(kind=kind)

    @pytest.mark.parametrize("kind", ["call.authorized", "call.rejected", "key.rotated_out"])
    def test_well_formed_kinds_are_accepted(self, kind):
        """Dotted lower-case kinds with underscores after the first dot are valid."""
        assert is_record_kind(kind)

    @pytest.mark.parametrize(
        "ts", ["2026-11-25T08:00:00Z", "2026-11-25 08:00:00.000000Z", "2026-13-25T08:00:00.000000Z"]
    )
    def test_malformed_ts_is_refused(self, ts):
        """Only fixed-width RFC 3339 UTC with microseconds, and a real date, is a record ts."""
        with pytest.raises(ValueError, match="ts"):
            _seal(ts=ts)

    def test_oversized_record_is_refused(self):
        """A record over MAX_RECORD_BYTES is refused, so verifiers can bound what they read."""
        with pytest.raises(ValueError, match="at most"):
            _seal(body={"blob": "x" * MAX_RECORD_BYTES})

    def test_body_must_be_an_object(self):
        """A record body is a JSON object."""
        with pytest.raises(TypeError, match="object"):
            canonical_body([1, 2])  # type: ignore[arg-type]


class TestFormatTs:
    def test_utc_with_microseconds(self):
        """Timestamps are fixed-width RFC 3339 in UTC with six fractional digits."""
        assert "2026-11-25T08:00:00.000000Z" == format_ts(datetime(2026, 11, 25, 8, tzinfo=UTC))

    def test_other_zones_are_converted_to_utc(self):
        """A time in another zone is written as the same instant in UTC."""
        paris = timezone(timedelta(hours=1))

        assert "2026-11-25T08:00:00.500000Z" == format_ts(
            datetime(2026, 11, 25, 9, 0, 0, 500000, tzinfo=paris)
        )

    def test_naive_datetime_is_refused(self):
        """A naive datetime has no instant, so it cannot be recorded."""
        with pytest.raises(ValueError, match="timezone-aware"):
            format_ts(datetime(2026, 11, 25, 8))


class TestCheckRecord:
    def test_untouched_record_passes(self):
        """A sealed record checks against its own key and chain position."""
        assert None is _check(_seal())

    @pytest.mark.parametrize(
        ("change", "message"),
        [
            ({"kind": "call.denied"}, "the kind column differs"),
            ({"ts": "2026-11-25T08:00:00.999999Z"}, "the ts column differs"),
            ({"body_json": b'{"call_id":"c2"}'}, "the body column differs"),
            ({"prev": "f" * 64}, "the prev column differs"),
            ({"key_id": "0123456789abcdef"}, "the key_id column differs"),
            ({"record_hash": "e" * 64}, "stored hash"),
            ({"signature": bytes(64)}, "signature does not verify"),
        ],
    )
    def test_each_column_must_agree_with_the_signed_bytes(self, change, message):
        """Changing any one stored field of a record fails at its seq, naming the field."""
        record = dataclasses.replace(_seal(), **change)

        with pytest.raises(VerificationFailed, match=message) as caught:
            _check(record)

        assert 1 == caught.value.seq

    def test_wrong_position_in_the_chain_fails(self):
        """A valid record 1 offered as record 2 fails: its prev and seq are record 1's."""
        record = _seal()

        with pytest.raises(VerificationFailed, match="out of order") as caught:
            _check(record, expected_seq=2, prev=record.record_hash)

        assert 1 == caught.value.seq

    def test_ts_going_backwards_fails(self):
        """A validly signed record whose ts is before its predecessor's fails."""
        with pytest.raises(VerificationFailed, match="goes back") as caught:
            _check(_seal(), not_before="2026-11-25T08:00:01.000000Z")

        assert 1 == caught.value.seq
