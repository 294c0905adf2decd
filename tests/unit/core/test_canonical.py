"""RFC 8785 canonical JSON and strict parsing: the bytes callward hashes and signs."""

from __future__ import annotations

import json
import math
import struct

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from callward.core._canonical import (
    MAX_JSON_BYTES,
    MAX_JSON_DEPTH,
    CanonicalizationError,
    canonical_bytes,
    canonical_loads,
    elide_large_values,
    non_ijson_path,
    sha256_hex,
    strict_loads,
)

SAFE_INTEGER = 2**53 - 1

# The test data of the RFC's authors (cyberphone/json-canonicalization, testdata/):
# each input, parsed, must canonicalize to exactly the output file's bytes.
TESTDATA = {
    "arrays": (
        '[\n  56,\n  {\n    "d": true,\n    "10": null,\n    "1": [ ]\n  }\n]',
        '[56,{"1":[],"10":null,"d":true}]',
    ),
    "french": (
        '{\n  "peach": "This sorting order",\n  "péché": "is wrong according to French",\n'
        '  "pêche": "but canonicalization MUST",\n  "sin":   "ingnore locale"\n}\n',
        '{"peach":"This sorting order","péché":"is wrong according to French",'
        '"pêche":"but canonicalization MUST","sin":"ingnore locale"}',
    ),
    "structures": (
        '{\n  "1": {"f": {"f": "hi","F": 5} ,"\\n": 56.0},\n  "10": { },\n  "": "empty",\n'
        '  "a": { },\n  "111": [ { } ],\n  "A": { }\n}',
        '{"":"empty","1":{"\\n":56,"f":{"F":5,"f":"hi"}},"10":{},"111":[{}],"A":{},"a":{}}',
    ),
    "unicode": (
        '{\n  "Unnormalized Unicode":"\\u1e0d\\u0307"\n}\n',
        '{"Unnormalized Unicode":"\u1e0d\u0307"}',
    ),
    "values": (
        '{\n  "numbers": [1E30, 4.50, 333333333.33333329, 2e-3, 0.000000000000000000000000001],\n'
        '  "escaping": "\\u20ac$\\u000F\\u000aA\'\\u0042\\u0022\\u005c\\\\\\"\\/",\n'
        '  "literals": [null, true, false]\n}',
        '{"escaping":"\u20ac$\\u000f\\nA\'B\\"\\\\\\\\\\"/","literals":[null,true,false],'
        '"numbers":[1e+30,4.5,333333333.3333333,0.002,1e-27]}',
    ),
    "weird": (
        '{\n  "\\u20ac": "Euro Sign",\n  "1": "One",\n  "\\u0080": "Control\\u007f",\n'
        '  "\\ud83d\\ude02": "Smiley",\n  "\\u00f6": "Latin Small Letter O With Diaeresis",\n'
        '  "\\ufb33": "Hebrew Letter Dalet With Dagesh",\n  "</script>": "Browser Challenge"\n}\n',
        '{"1":"One","</script>":"Browser Challenge","\u0080":"Control\u007f",'
        '"\u00f6":"Latin Small Letter O With Diaeresis","\u20ac":"Euro Sign",'
        '"\U0001f602":"Smiley","\ufb33":"Hebrew Letter Dalet With Dagesh"}',
    ),
}

# RFC 8785 Appendix B: IEEE 754 bit patterns and their canonical text.
APPENDIX_B = [
    ("0000000000000000", "0"),
    ("8000000000000000", "0"),
    ("0000000000000001", "5e-324"),
    ("8000000000000001", "-5e-324"),
    ("7fefffffffffffff", "1.7976931348623157e+308"),
    ("ffefffffffffffff", "-1.7976931348623157e+308"),
    ("4340000000000000", "9007199254740992"),
    ("c340000000000000", "-9007199254740992"),
    ("4430000000000000", "295147905179352830000"),
    ("44b52d02c7e14af5", "9.999999999999997e+22"),
    ("44b52d02c7e14af6", "1e+23"),
    ("44b52d02c7e14af7", "1.0000000000000001e+23"),
    ("444b1ae4d6e2ef4e", "999999999999999700000"),
    ("444b1ae4d6e2ef4f", "999999999999999900000"),
    ("444b1ae4d6e2ef50", "1e+21"),
    ("3eb0c6f7a0b5ed8c", "9.999999999999997e-7"),
    ("3eb0c6f7a0b5ed8d", "0.000001"),
    ("41b3de4355555553", "333333333.3333332"),
    ("41b3de4355555554", "333333333.33333325"),
    ("41b3de4355555555", "333333333.3333333"),
    ("41b3de4355555556", "333333333.3333334"),
    ("41b3de4355555557", "333333333.33333343"),
    ("becbf647612f3696", "-0.0000033333333333333333"),
    ("43143ff3c1cb0959", "1424953923781206.2"),
]


def _float(bits: str) -> float:
    value: float = struct.unpack(">d", bytes.fromhex(bits))[0]
    return value


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-SAFE_INTEGER, max_value=SAFE_INTEGER)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(), children, max_size=5),
    max_leaves=30,
)


def _has_float_beyond_safe_integers(value: object) -> bool:
    """Whether ``value`` holds an integral float that JCS writes as an unsafe integer."""
    if isinstance(value, float):
        return value.is_integer() and abs(value) > SAFE_INTEGER and abs(value) < 1e21
    if isinstance(value, list):
        return any(_has_float_beyond_safe_integers(item) for item in value)
    if isinstance(value, dict):
        return any(_has_float_beyond_safe_integers(item) for item in value.values())
    return False


class TestRfc8785Vectors:
    @pytest.mark.parametrize("name", sorted(TESTDATA))
    def test_reference_testdata(self, name):
        """Each input of the reference test data canonicalizes to its output, byte for byte."""
        text, output = TESTDATA[name]

        assert output.encode("utf-8") == canonical_bytes(json.loads(text))

    def test_section_3_2_2_example(self):
        """The RFC's own example (3.2.2 input, 3.2.3 output) matches; € is raw UTF-8."""
        text = (
            '{"numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],'
            ' "string": "\\u20ac$\\u000F\\u000aA\'\\u0042\\u0022\\u005c\\\\\\"\\/",'
            ' "literals": [null, true, false]}'
        )
        expected = (
            '{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
            '"string":"\u20ac$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}'
        ).encode()

        actual = canonical_bytes(json.loads(text))

        assert expected == actual
        assert bytes.fromhex("22e282ac24") in actual

    def test_property_sorting_example(self):
        """Members sort by UTF-16 code units, not by code point or locale (RFC 3.2.3)."""
        value = {
            "\u20ac": "Euro Sign",
            "\r": "Carriage Return",
            "\ufb33": "Hebrew Letter Dalet With Dagesh",
            "1": "One",
            "\U0001f600": "Emoji: Grinning Face",
            "\u0080": "Control",
            "\u00f6": "Latin Small Letter O With Diaeresis",
        }

        expected = [
            "Carriage Return",
            "One",
            "Control",
            "Latin Small Letter O With Diaeresis",
            "Euro Sign",
            "Emoji: Grinning Face",
            "Hebrew Letter Dalet With Dagesh",
        ]

        assert expected == list(json.loads(canonical_bytes(value)).values())

    @pytest.mark.parametrize(("bits", "text"), APPENDIX_B)
    def test_appendix_b_numbers(self, bits, text):
        """Every number of Appendix B serializes to the RFC's text."""
        expected = text.encode()

        assert expected == canonical_bytes(_float(bits))

    @pytest.mark.parametrize("bits", ["7fffffffffffffff", "7ff0000000000000", "fff0000000000000"])
    def test_appendix_b_nan_and_infinity_are_refused(self, bits):
        """NaN and the infinities have no JSON form, so canonicalizing them fails."""
        with pytest.raises(CanonicalizationError):
            canonical_bytes(_float(bits))


class TestCanonicalBytes:
    @pytest.mark.parametrize(
        "value",
        [2**53, -(2**53), 10**30, "\ud800", {1: "non-string key"}, {"a": {1, 2}}],
        ids=["2**53", "-2**53", "10**30", "lone-surrogate", "int-key", "set"],
    )
    def test_non_i_json_values_are_refused(self, value):
        """Integers past ±(2**53 - 1), lone surrogates, non-str keys and sets are refused."""
        with pytest.raises(CanonicalizationError):
            canonical_bytes(value)

    def test_sha256_hex_uses_the_domain_prefix(self):
        """A domain prefix changes the digest, so two kinds of thing never collide."""
        assert sha256_hex(b"x") != sha256_hex(b"x", domain=b"callward.test\x00")
        assert sha256_hex(b"callward.test\x00x") == sha256_hex(b"x", domain=b"callward.test\x00")

    @given(json_values)
    def test_json_loads_round_trip(self, value):
        """
        For any JSON value, canonical bytes parsed back with json.loads canonicalize to
        the same bytes (integral floats past 2**53 excepted: see the next test).
        """
        if _has_float_beyond_safe_integers(value):
            return
        data = canonical_bytes(value)

        assert data == canonical_bytes(json.loads(data))

    @given(json_values)
    def test_canonical_loads_round_trip(self, value):
        """With canonical_loads the round trip holds for every finite float too."""
        data = canonical_bytes(value)

        assert data == canonical_bytes(canonical_loads(data))

    def test_integral_float_past_safe_range_needs_canonical_loads(self):
        """
        JCS writes 1e20 as 100000000000000000000, which json.loads reads as an int
        that canonical_bytes must refuse; canonical_loads reads it back as the float.
        """
        expected = b"100000000000000000000"

        data = canonical_bytes(1e20)

        assert expected == data
        assert data == canonical_bytes(canonical_loads(data))
        with pytest.raises(CanonicalizationError):
            canonical_bytes(json.loads(data))

    @given(json_values)
    def test_canonical_bytes_are_strict_json(self, value):
        """Canonical bytes always pass strict_loads, which reads them as json.loads does."""
        data = canonical_bytes(value)

        assert json.loads(data) == strict_loads(data)


class TestStrictLoads:
    @pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", '{"a": [1, NaN]}'])
    def test_nan_and_infinity_are_refused(self, text):
        """NaN and Infinity, which json.loads accepts, are not JSON and are refused."""
        with pytest.raises(ValueError, match="not JSON"):
            strict_loads(text)

    def test_duplicate_keys_are_refused(self):
        """An object naming one key twice is refused instead of keeping the last value."""
        with pytest.raises(ValueError, match="duplicate key"):
            strict_loads('{"path": "/tmp/x", "path": "/etc/passwd"}')

    def test_nesting_at_the_limit_is_accepted(self):
        """Exactly MAX_JSON_DEPTH levels of nesting parse."""
        text = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
        expected: list[object] = []
        for _ in range(MAX_JSON_DEPTH - 1):
            expected = [expected]

        assert expected == strict_loads(text)

    def test_nesting_past_the_limit_is_refused(self):
        """One level past MAX_JSON_DEPTH is refused before parsing."""
        text = "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)

        with pytest.raises(ValueError, match="nested deeper"):
            strict_loads(text)

    def test_brackets_inside_strings_do_not_count_as_nesting(self):
        """Depth counts structure, not bracket characters inside strings."""
        brackets = "[" * (MAX_JSON_DEPTH + 10)

        assert [brackets] == strict_loads(f'["{brackets}"]')

    def test_input_past_the_size_limit_is_refused(self):
        """Text over MAX_JSON_BYTES (counted in UTF-8) is refused before parsing."""
        text = '"' + "é" * (MAX_JSON_BYTES // 2) + '"'

        with pytest.raises(ValueError, match="bytes"):
            strict_loads(text)

    def test_bytes_input_is_utf8(self):
        """Bytes are decoded as UTF-8 and parse like the equivalent text."""
        expected = {"π": math.pi}

        assert expected == strict_loads('{"π": 3.141592653589793}'.encode())


def _rfc8785_or_error(value: object) -> bytes | None:
    """What the reference implementation writes, or None when it refuses the value."""
    try:
        return rfc8785.dumps(value)  # type: ignore[arg-type]
    except (rfc8785.CanonicalizationError, TypeError, ValueError, RecursionError):
        return None


def _callward_or_error(value: object) -> bytes | None:
    try:
        return canonical_bytes(value)
    except CanonicalizationError:
        return None


class _Text(str):
    """A str subclass: the fast path leaves it to rfc8785."""


# Floats of every magnitude (both sides of 1e-4 and 1e16, integral and not, -0.0),
# keys past U+FFFF (UTF-16 order differs from code point order there), lone
# surrogates, integers past the safe range, tuples, subclasses and non-str keys.
any_floats = st.floats() | st.sampled_from(
    [0.0, -0.0, 1e-4, 9.999999999999999e-05, 1e16, 9999999999999998.0, 2.0**53, 1e21, 0.5]
)
wide_text = st.text() | st.sampled_from(
    ["\U0001f600", "\ufb33", "\ud800", "\udfff", "a\x00\x1f\x7f"]
)
wide_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**60), max_value=2**60)
    | any_floats
    | wide_text
    | st.builds(_Text, st.text())
)
wide_values = st.recursive(
    wide_scalars,
    lambda children: st.lists(children, max_size=5)
    | st.lists(children, max_size=3).map(tuple)
    | st.dictionaries(wide_text, children, max_size=5)
    | st.dictionaries(st.integers(0, 3), children, min_size=1, max_size=2),
    max_leaves=30,
)


class TestSameBytesAsRfc8785:
    """canonical_bytes writes most values with the C encoder: byte for byte rfc8785's."""

    @settings(max_examples=3000)
    @given(wide_values)
    def test_any_value(self, value):
        """Same bytes as rfc8785.dumps for any value, or both refuse it."""
        assert _rfc8785_or_error(value) == _callward_or_error(value)

    @settings(max_examples=3000)
    @given(any_floats)
    def test_any_float(self, value):
        """Every float, in every range, is written as rfc8785 writes it."""
        assert _rfc8785_or_error(value) == _callward_or_error(value)
        assert _rfc8785_or_error([value, {"f": value}]) == _callward_or_error([value, {"f": value}])

    @pytest.mark.parametrize(("bits", "text"), APPENDIX_B)
    def test_appendix_b_inside_containers(self, bits, text):
        """Appendix B's numbers inside an object and an array, where the fast path runs."""
        expected = f'{{"n":[{text}]}}'.encode()

        assert expected == canonical_bytes({"n": [_float(bits)]})

    def test_deep_and_circular_values(self):
        """Past the fast path's depth rfc8785 decides; a cycle is refused, not looped on."""
        deep: list[object] = []
        for _ in range(300):
            deep = [deep]
        cycle: list[object] = []
        cycle.append(cycle)

        assert _rfc8785_or_error(deep) == canonical_bytes(deep)
        with pytest.raises(CanonicalizationError):
            canonical_bytes(cycle)

    def test_a_gateway_body(self):
        """A call.completed-like body, floats and all, is rfc8785's bytes."""
        body = {
            "call_id": "call_1", "authorized_seq": 7, "expected_matched": None,
            "durations_ms": {"parse": 0.041, "policy": 0.0, "audit_authorized": 1.5,
                             "sandbox": 12.0},
            "usage": {"cpu_seconds": 3e-05, "peak_memory_bytes": 0},
            "result_rules": [], "message": "caf\u00e9 \u2028 \"quoted\"\n",
        }

        assert rfc8785.dumps(body) == canonical_bytes(body)


class TestNonIJsonPath:
    @pytest.mark.parametrize(("value", "expected"), [
        ({"x": 3, "y": [1, 2.5, "a", None, True]}, None),
        ({"x": 2**53}, "$.x"),
        ({"x": [1, {"y": -(2**60)}]}, "$.x[1].y"),
        ({"a b": {"c": float("nan")}}, '$["a b"].c'),
        ({"s": "\ud800"}, "$.s"),
        ([0, 2**53 - 1, -(2**53 - 1)], None),
    ])
    def test_names_the_first_value_i_json_cannot_hold(self, value, expected):
        """The path of the first integer, float or string outside I-JSON, else None."""
        assert expected == non_ijson_path(value)


class TestElideLargeValues:
    def test_values_within_the_bound_are_kept_whole(self):
        """Nothing over the bound: the same value, nothing elided."""
        value = {"a": "x" * 100, "b": [1, 2, 3]}

        expected = (value, ())
        assert expected == elide_large_values(value, 256)

    def test_a_long_string_inside_is_the_only_thing_elided(self):
        """The object keeps its other parts; only the long string becomes its digest."""
        long = "y" * 5000
        value = {"keep": 1, "nested": {"long": long, "short": "s"}}

        bounded, paths = elide_large_values(value, 256)

        expected = (("$.nested.long",), 1, "s", sha256_hex(canonical_bytes(long)))
        assert expected == (paths, bounded["keep"], bounded["nested"]["short"],
                            bounded["nested"]["long"]["$elided"]["sha256"])

    def test_many_small_items_are_elided_as_one(self):
        """An array too large by its count of small items is elided whole."""
        value = {"items": list(range(10_000))}

        bounded, paths = elide_large_values(value, 256)

        expected = (("$.items",), sha256_hex(canonical_bytes(list(range(10_000)))))
        assert expected == (paths, bounded["items"]["$elided"]["sha256"])

    @settings(max_examples=300)
    @given(json_values)
    def test_whatever_the_value_the_result_is_bounded(self, value):
        """
        The bounded value is never larger than the bound or one digest (its 64-character
        prefix escaped at worst), and it is the value itself exactly when that fits.
        """
        bounded, paths = elide_large_values(value, 256)

        fits = len(canonical_bytes(value)) <= 256
        assert len(canonical_bytes(bounded)) <= 600
        assert fits == (not paths)
        assert (bounded == value) or not fits
