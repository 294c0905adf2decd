"""
The ``constraints`` section of a tool in the policy document: its JSON Schema, and
the ``ArgumentConstraint`` values its entries mean (see ``_argument_constraints``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

from callward.core import RuleId
from callward.policies._argument_constraints import (
    ARGUMENT_PATTERN,
    ArgumentConstraint,
    Check,
    EmailCheck,
    HostCheck,
    NumberCheck,
    StringCheck,
    UrlCheck,
    ip_address_of,
    normalized_host,
)

_NAMES: Final = {"type": "array", "uniqueItems": True, "maxItems": 256,
                 "items": {"type": "string", "minLength": 1, "maxLength": 253}}
_WHO: Final = {"type": "array", "uniqueItems": True, "maxItems": 256,
               "items": {"type": "string", "minLength": 1, "maxLength": 128}}

#: ``tools.<name>.constraints`` in the policy document (JSON Schema 2020-12).
CONSTRAINTS_SCHEMA: Final = {
    "type": "array",
    "maxItems": 64,
    "items": {
        "type": "object",
        "additionalProperties": False,
        "required": ["id", "argument"],
        "oneOf": [{"required": [kind]} for kind in ("url", "host", "email", "number", "string")],
        "properties": {
            "id": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"},
            "argument": {"type": "string", "pattern": ARGUMENT_PATTERN, "maxLength": 256},
            "principals": _WHO,
            "roles": _WHO,
            "groups": _WHO,
            "url": {
                "type": "object", "additionalProperties": False, "required": ["hosts"],
                "properties": {
                    "schemes": {"type": "array", "minItems": 1, "uniqueItems": True,
                                "items": {"type": "string", "pattern": "^[a-z][a-z0-9+.-]*$"}},
                    "hosts": _NAMES,
                    "ports": {"type": "array", "uniqueItems": True, "minItems": 1,
                              "items": {"type": "integer", "minimum": 1, "maximum": 65535}},
                    "ip_literals": _NAMES,
                    "path_prefixes": {"type": "array", "uniqueItems": True, "minItems": 1,
                                      "items": {"type": "string", "pattern": "^/"}},
                },
            },
            "host": {
                "type": "object", "additionalProperties": False, "required": ["names"],
                "properties": {"names": _NAMES, "ip_literals": _NAMES},
            },
            "email": {
                "type": "object", "additionalProperties": False, "required": ["domains"],
                "properties": {"domains": _NAMES},
            },
            "number": {
                "type": "object", "additionalProperties": False, "minProperties": 1,
                "properties": {"minimum": {"type": "number"}, "maximum": {"type": "number"},
                               "integer": {"type": "boolean"}},
            },
            "string": {
                "type": "object", "additionalProperties": False, "minProperties": 1,
                "properties": {
                    "min_length": {"type": "integer", "minimum": 0},
                    "max_length": {"type": "integer", "minimum": 0},
                    "pattern": {"type": "string", "maxLength": 1024},
                    "one_of": {"type": "array", "uniqueItems": True, "minItems": 1,
                               "items": {"type": "string"}},
                },
            },
        },
    },
}


def parse_constraints(entries: list[Mapping[str, object]]) -> tuple[ArgumentConstraint, ...]:
    """
    The constraints of one tool, from entries already valid against ``CONSTRAINTS_SCHEMA``.

    Raises:
        ValueError: An entry is valid JSON Schema but means nothing sound: a host that
            is no host name, an IP literal that is no address, a minimum above its
            maximum, a pattern that does not compile.
    """
    return tuple(_constraint(entry) for entry in entries)


def _constraint(entry: Mapping[str, object]) -> ArgumentConstraint:
    rule = RuleId(str(entry["id"]))
    return ArgumentConstraint(
        id=rule,
        argument=str(entry["argument"]),
        check=_check(rule, entry),
        principals=_strings(entry.get("principals")),
        roles=_strings(entry.get("roles")),
        groups=_strings(entry.get("groups")),
    )


def _check(rule: RuleId, entry: Mapping[str, object]) -> Check:
    try:
        if isinstance(url := entry.get("url"), dict):
            return UrlCheck(
                schemes=_strings(url.get("schemes")) or ("https",),
                hosts=tuple(normalized_host(h) for h in _strings(url.get("hosts"))),
                ports=tuple(int(p) for p in url.get("ports", ())),
                ip_literals=_ip_literals(url.get("ip_literals")),
                path_prefixes=_strings(url.get("path_prefixes")),
            )
        if isinstance(host := entry.get("host"), dict):
            return HostCheck(names=tuple(normalized_host(h) for h in _strings(host.get("names"))),
                             ip_literals=_ip_literals(host.get("ip_literals")))
        if isinstance(email := entry.get("email"), dict):
            return EmailCheck(domains=tuple(normalized_host(d)
                                            for d in _strings(email.get("domains"))))
        if isinstance(number := entry.get("number"), dict):
            return _number_check(number)
        string = entry.get("string")
        if isinstance(string, dict):
            return _string_check(string)
    except ValueError as exc:
        raise ValueError(f"constraint {rule}: {exc}") from exc
    raise ValueError(f"constraint {rule}: no check (url, host, email, number or string)")


def _number_check(number: Mapping[str, object]) -> NumberCheck:
    minimum, maximum = number.get("minimum"), number.get("maximum")
    check = NumberCheck(minimum=None if minimum is None else float(str(minimum)),
                        maximum=None if maximum is None else float(str(maximum)),
                        integer=bool(number.get("integer", False)))
    if check.minimum is not None and check.maximum is not None and check.minimum > check.maximum:
        raise ValueError("minimum is above maximum")
    return check


def _string_check(string: Mapping[str, object]) -> StringCheck:
    pattern = string.get("pattern")
    if pattern is not None:
        try:
            re.compile(str(pattern))
        except re.error as exc:
            raise ValueError(f"the pattern does not compile ({exc.msg})") from exc
    max_length = string.get("max_length")
    check = StringCheck(min_length=int(str(string.get("min_length", 0))),
                        max_length=None if max_length is None else int(str(max_length)),
                        pattern=None if pattern is None else str(pattern),
                        one_of=_strings(string.get("one_of")))
    if check.max_length is not None and check.min_length > check.max_length:
        raise ValueError("min_length is above max_length")
    return check


def _ip_literals(value: object) -> tuple[str, ...]:
    literals = _strings(value)
    for literal in literals:
        if ip_address_of(literal) is None:
            raise ValueError(f"{literal!r} is not an IP address")
    return literals


def _strings(value: object) -> tuple[str, ...]:
    return tuple(str(item) for item in value) if isinstance(value, list) else ()
