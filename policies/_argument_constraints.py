"""
Declarative argument constraints: URLs, host names, e-mail domains, numbers and strings.

A constraint names one argument (``url``, ``request.url``, ``urls[*]``), one check,
and optionally who it applies to (principals, roles, groups; everyone when none is
given). Every constraint that applies to the caller must hold; a value that breaks
one is denied as ``constraint``, naming the constraint's id and the JSON path of the
value (never the value itself).

Each check parses before it compares, and refuses what parsers disagree on:

- A URL is parsed as the WHATWG URL standard parses it (``ada-url``, as browsers
  and most HTTP stacks do) and as Python's ``urllib.parse`` does, and the raw text
  must say the same thing to both: no whitespace or control character, no
  backslash, ``scheme://`` written out, no userinfo (no ``@`` before the host), no
  percent-encoding, non-ASCII or trailing dot in the host (an internationalized
  name is written in its ``xn--`` form: IDNA2003 and IDNA2008 map some names
  differently), and a host that reads the same to both parsers (``0x7f.1`` or
  ``2130706433`` is 127.0.0.1 to one and a name to the other). The scheme, the
  lowercased host, and the port (the scheme's default when none is written) must
  then be allowed; an IP literal is refused unless listed; with path prefixes the
  path must be written as it is normalized (no ``..``, no ``%2e``/``%2f``) and start
  with one of them.
- A host name is checked as the host of ``https://NAME/`` would be, and must be
  nothing but that host.
- An e-mail address is parsed by ``email-validator`` (no quoted local part, no
  domain literal, no display name), and its ASCII domain must be allowed.
- Host and domain allowlists hold names (``api.example.com``) or wildcards
  (``*.example.com``: any name below it, not the name itself).

The argument paths and the walk over them are written here (a few lines); the
parsers are maintained libraries.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Final

import ada_url
import email_validator

from callward.core import JSONValue, RuleId

DEFAULT_PORTS: Final = {"http": 80, "https": 443, "ws": 80, "wss": 443, "ftp": 21}
_NAME: Final = r"[A-Za-z_][A-Za-z0-9_]*"
ARGUMENT_PATTERN: Final = rf"^{_NAME}(\[\*\])?(\.{_NAME}(\[\*\])?)*$"
_LABEL: Final = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME: Final = re.compile(rf"\A{_LABEL}(\.{_LABEL})*\Z")
_FORBIDDEN_IN_URL: Final = re.compile(r"[\x00-\x20\x7f\\]")
_ENCODED_PATH_TRICKS: Final = re.compile(r"%(2e|2f|5c)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class UrlCheck:
    """An allowed URL: scheme, host (names, wildcards, listed IP literals), port, path."""

    schemes: tuple[str, ...]
    hosts: tuple[str, ...]
    ports: tuple[int, ...] = ()
    ip_literals: tuple[str, ...] = ()
    path_prefixes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class HostCheck:
    """An allowed host name (or a listed IP literal), with nothing around it."""

    names: tuple[str, ...]
    ip_literals: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class EmailCheck:
    """An e-mail address whose domain is allowed."""

    domains: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class NumberCheck:
    """A number within bounds (inclusive), optionally an integer."""

    minimum: float | None = None
    maximum: float | None = None
    integer: bool = False


@dataclass(frozen=True, slots=True)
class StringCheck:
    """A string within length bounds, matching a pattern in full, or one of a list."""

    min_length: int = 0
    max_length: int | None = None
    pattern: str | None = None
    one_of: tuple[str, ...] = ()


Check = UrlCheck | HostCheck | EmailCheck | NumberCheck | StringCheck


@dataclass(frozen=True, slots=True)
class ArgumentConstraint:
    """One constraint on one argument of one tool, for some callers or for all."""

    id: RuleId
    argument: str
    check: Check
    principals: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not re.match(ARGUMENT_PATTERN, self.argument):
            raise ValueError(f"constraint {self.id}: argument must be a path like a.b[*].c")

    def applies_to(self, principal: str, roles: frozenset[str], groups: frozenset[str]) -> bool:
        """Whether the constraint binds this caller (every caller, when it names none)."""
        if not (self.principals or self.roles or self.groups):
            return True
        return (principal in self.principals or bool(roles & set(self.roles))
                or bool(groups & set(self.groups)))


@dataclass(frozen=True, slots=True)
class ConstraintViolation:
    """Which constraint failed, where in the arguments, and why (never the value)."""

    rule: RuleId
    json_path: str
    reason: str


def first_violation(
    constraints: tuple[ArgumentConstraint, ...],
    arguments: Mapping[str, JSONValue],
    *,
    principal: str,
    roles: frozenset[str] = frozenset(),
    groups: frozenset[str] = frozenset(),
) -> ConstraintViolation | None:
    """The first value that breaks a constraint binding the caller, or None."""
    for constraint in constraints:
        if not constraint.applies_to(principal, roles, groups):
            continue
        for json_path, value in values_at(arguments, constraint.argument):
            reason = check_value(constraint.check, value)
            if reason is not None:
                return ConstraintViolation(constraint.id, json_path, reason)
    return None


def values_at(arguments: Mapping[str, JSONValue], path: str) -> Iterator[tuple[str, JSONValue]]:
    """
    Every value at ``path`` with its JSON path; an absent key yields nothing (the
    schema decides what is required), a ``[*]`` over a non-array yields the value
    itself, so that it is checked (and refused) rather than skipped.
    """
    current: list[tuple[str, JSONValue]] = [("$", dict(arguments))]
    for step in path.split("."):
        name, star = (step[:-3], True) if step.endswith("[*]") else (step, False)
        found: list[tuple[str, JSONValue]] = []
        for where, value in current:
            if not isinstance(value, dict):
                found.append((where, value))  # not an object: the check refuses it
                continue
            if name not in value:
                continue
            child, child_path = value[name], f"{where}.{name}"
            if star and isinstance(child, list):
                found.extend((f"{child_path}[{i}]", item) for i, item in enumerate(child))
            else:
                found.append((child_path, child))
        current = found
    yield from current


def check_value(check: Check, value: JSONValue) -> str | None:
    """Why ``value`` breaks ``check``, or None if it holds."""
    if isinstance(check, UrlCheck):
        return _url_problem(check, value)
    if isinstance(check, HostCheck):
        return _host_problem(check, value)
    if isinstance(check, EmailCheck):
        return _email_problem(check, value)
    if isinstance(check, NumberCheck):
        return _number_problem(check, value)
    return _string_problem(check, value)


# -- URLs and hosts ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _ReadUrl:
    """A URL both parsers read the same way: its scheme, host, port and path."""

    scheme: str
    host: str
    port: int | None
    path: str
    raw_path: str


def _url_problem(check: UrlCheck, value: JSONValue) -> str | None:  # noqa: PLR0911 - a reason each
    if not isinstance(value, str):
        return "not a string"
    read = _read_url(value)
    if isinstance(read, str):
        return read
    if read.scheme not in check.schemes:
        return "a scheme the policy does not allow"
    problem = _host_name_problem(read.host, check.hosts, check.ip_literals)
    if problem is not None:
        return problem
    default = DEFAULT_PORTS.get(read.scheme)
    if read.port not in (check.ports or ((default,) if default else ())):
        return "a port the policy does not allow"
    if check.path_prefixes:
        if _ENCODED_PATH_TRICKS.search(read.raw_path) or (read.raw_path or "/") != read.path:
            return "a path that is not written as it is normalized"
        if not any(read.path.startswith(prefix) for prefix in check.path_prefixes):
            return "a path outside the allowed prefixes"
    return None


def _read_url(value: str) -> _ReadUrl | str:  # noqa: PLR0911 - a reason each
    """The URL as both parsers read it, or why the text is ambiguous."""
    if len(value) > 8192 or _FORBIDDEN_IN_URL.search(value) or not value.isascii():
        return "whitespace, a control character, a backslash or non-ASCII text in the URL"
    scheme, separator, rest = value.partition("://")
    if not separator or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
        return "the URL does not start with scheme://"
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    raw_path = re.split(r"[?#]", rest[len(authority):], maxsplit=1)[0]
    if "@" in authority or "%" in authority:
        return "userinfo or percent-encoding in the URL's authority"
    try:
        parsed = ada_url.parse_url(value)
        split = urllib.parse.urlsplit(value)
        split_port = split.port
    except ValueError:
        return "not a URL"
    scheme, host = parsed["protocol"].rstrip(":"), parsed["hostname"]
    port = int(parsed["port"]) if parsed["port"] else DEFAULT_PORTS.get(scheme)
    if parsed["username"] or parsed["password"] or split.username is not None:
        return "userinfo in the URL"
    if (authority.lower() not in {host, f"{host}:{port}"}
            or (split.hostname or "") != host.strip("[]").lower()
            or (split_port is not None and split_port != port)):
        return "a host or port that parsers read differently"
    return _ReadUrl(scheme, host, port, parsed["pathname"], raw_path)


def _host_problem(check: HostCheck, value: JSONValue) -> str | None:
    if not isinstance(value, str):
        return "not a string"
    if (not value or len(value) > 253 or not value.isascii()
            or _FORBIDDEN_IN_URL.search(value) or re.search(r"[/?#@%:]", value.strip("[]"))):
        return "not a bare host name"
    try:
        host = ada_url.parse_url(f"https://{value}/")["hostname"]
    except ValueError:
        return "not a host name"
    if host != value.lower():
        return "a host that parsers read differently"
    return _host_name_problem(host, check.names, check.ip_literals)


def _host_name_problem(host: str, allowed: tuple[str, ...],
                       ip_literals: tuple[str, ...]) -> str | None:
    """Why a parsed, lowercased host is not allowed (names, wildcards, listed IPs)."""
    address = ip_address_of(host)
    if address is not None:
        if any(address == ip_address_of(listed) for listed in ip_literals):
            return None
        return "an IP literal the policy does not list"
    if host.endswith("."):
        return "a host name with a trailing dot"
    if not _HOSTNAME.match(host):
        return "not a host name"
    if not host_allowed(host, allowed):
        return "a host the policy does not allow"
    return None


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """Whether ``host`` is listed, or lies below a listed ``*.suffix``."""
    for entry in allowed:
        if entry.startswith("*."):
            if host.endswith(entry[1:]) and len(host) > len(entry) - 1:
                return True
        elif host == entry:
            return True
    return False


def ip_address_of(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def normalized_host(entry: str) -> str:
    """
    A policy's allowlist entry as hosts are compared: lowercased, in its ASCII (IDNA)
    form, a ``*.`` prefix kept.

    Raises:
        ValueError: The entry is not a host name.
    """
    wildcard, name = ("*.", entry[2:]) if entry.startswith("*.") else ("", entry)
    try:
        host = ada_url.parse_url(f"https://{name}/")["hostname"]
    except ValueError as exc:
        raise ValueError(f"{entry!r} is not a host name") from exc
    if ip_address_of(host) is not None or host.endswith(".") or not _HOSTNAME.match(host):
        raise ValueError(f"{entry!r} is not a host name (list IP literals under ip_literals)")
    return wildcard + host


# -- e-mail, numbers, strings --------------------------------------------------------------


def _email_problem(check: EmailCheck, value: JSONValue) -> str | None:
    if not isinstance(value, str):
        return "not a string"
    if len(value) > 320 or _FORBIDDEN_IN_URL.search(value):
        return "not an e-mail address"
    try:
        address = email_validator.validate_email(
            value, check_deliverability=False, allow_quoted_local=False,
            allow_domain_literal=False, allow_display_name=False)
    except email_validator.EmailNotValidError:
        return "not an e-mail address"
    domain = address.ascii_domain.lower()
    if not host_allowed(domain, check.domains):
        return "an e-mail domain the policy does not allow"
    return None


def _number_problem(check: NumberCheck, value: JSONValue) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "not a number"
    if check.integer and not (isinstance(value, int) or float(value).is_integer()):
        return "not an integer"
    if check.minimum is not None and value < check.minimum:
        return "below the minimum"
    if check.maximum is not None and value > check.maximum:
        return "above the maximum"
    return None


def _string_problem(check: StringCheck, value: JSONValue) -> str | None:
    if not isinstance(value, str):
        return "not a string"
    if len(value) < check.min_length:
        return "shorter than the minimum length"
    if check.max_length is not None and len(value) > check.max_length:
        return "longer than the maximum length"
    if check.one_of and value not in check.one_of:
        return "not one of the allowed values"
    if check.pattern is not None and not re.fullmatch(check.pattern, value):
        return "does not match the pattern"
    return None
