"""
Declarative argument constraints, attacked with what URL, host and e-mail parsers
disagree on: each hostile value is refused with a reason, each plain one allowed.
"""

from __future__ import annotations

import urllib.parse

import pytest
from hypothesis import given
from hypothesis import strategies as st

from callward.core import (
    CallContext,
    Decision,
    PolicyInvalid,
    RuleId,
    ToolCall,
    ToolRegistry,
    tool,
)
from callward.policies import Policy
from callward.policies._argument_constraints import (
    ArgumentConstraint,
    EmailCheck,
    HostCheck,
    NumberCheck,
    StringCheck,
    UrlCheck,
    check_value,
    first_violation,
    normalized_host,
    values_at,
)
from callward.policies._constraint_section import parse_constraints

API = UrlCheck(schemes=("https",), hosts=("api.example.com", "*.example.org"))


class TestUrlCheck:
    @pytest.mark.parametrize("url", [
        "https://api.example.com/v1/x",
        "https://API.Example.COM/x",
        "HTTPS://api.example.com/",
        "https://api.example.com:443/x",
        "https://api.example.com",
        "https://api.example.com/?q=1#frag",
        "https://a.b.example.org/",
    ])
    def test_plain_urls_to_allowed_hosts_pass(self, url):
        """A written-out https URL to a listed host (any case, default port) is allowed."""
        assert check_value(API, url) is None

    @pytest.mark.parametrize("url", [
        "http://api.example.com/",                       # scheme
        "javascript://api.example.com/%0aalert(1)",      # scheme
        "https://api.example.com:8443/",                 # port
        "https://api.example.com:0443/",                 # a port written two ways
        "https://api.example.com:/",                     # an empty port
        "https://user@api.example.com/",                 # userinfo
        "https://api.example.com@evil.com/",             # userinfo: the host is evil.com
        "https://api.example.com:443@evil.com/",
        "https://evil.com#@api.example.com/",
        "https://evil.com?@api.example.com/",
        "https://api.example.com\\@evil.com/",           # backslash
        "https://api.example.com\\.evil.com/",
        "https://api.example.com./",                     # trailing dot
        "https://%61pi.example.com/",                    # percent-encoded host
        "https://api.example.com%2f.evil.com/",
        "https:api.example.com",                         # no //
        "//api.example.com/",                            # protocol-relative
        " https://api.example.com/",                     # whitespace WHATWG strips
        "https://api.example.com/\n",
        "https://api.exa\tmple.com/",
        "https://api.example.com.evil.com/",             # suffix tricks
        "https://evilapi.example.com/",
        "https://example.org/",                          # a wildcard is below, not at
        "https://evilexample.org/",
        "https://аpi.example.com/",  # noqa: RUF001 - a Cyrillic a: non-ASCII
        "https://api.example\u3002com/",                 # ideographic full stop
        "https://127.0.0.1/",                            # IP literals, in every spelling
        "https://0x7f.1/",
        "https://2130706433/",
        "https://0177.0.0.1/",
        "https://[::1]/",
        "https://[::ffff:127.0.0.1]/",
        "",
        "not a url",
    ])
    def test_hostile_or_ambiguous_urls_are_refused(self, url):
        """Each URL that leaves the allowlist, or reads two ways, is refused."""
        assert isinstance(check_value(API, url), str)

    @pytest.mark.parametrize("value", [None, 3, ["https://api.example.com/"], {"u": 1}])
    def test_a_non_string_is_refused(self, value):
        """Only a string can be a URL."""
        assert "not a string" == check_value(API, value)

    def test_listed_ip_literals_pass_in_their_one_spelling(self):
        """An IP literal passes only if listed, and only written canonically."""
        check = UrlCheck(schemes=("https",), hosts=(), ip_literals=("10.0.0.5",))

        expected = [None, str, str]
        assert expected == [
            None if (r := check_value(check, u)) is None else type(r)
            for u in ("https://10.0.0.5/", "https://010.0.0.5/", "https://10.0.0.6/")
        ]

    def test_path_prefixes_refuse_dot_segments_and_encoded_tricks(self):
        """With path prefixes the path must be written normalized and start with one."""
        check = UrlCheck(schemes=("https",), hosts=("api.example.com",), path_prefixes=("/v1/",))
        urls = ["https://api.example.com/v1/users", "https://api.example.com/v1/../admin",
                "https://api.example.com/v1/%2e%2e/admin", "https://api.example.com/v1%2fx",
                "https://api.example.com/v2/users", "https://api.example.com"]

        expected = [True, False, False, False, False, False]
        assert expected == [check_value(check, u) is None for u in urls]

    def test_listed_ports_replace_the_default(self):
        """With ports listed, only those pass; the scheme's default is no longer implied."""
        check = UrlCheck(schemes=("https",), hosts=("api.example.com",), ports=(8443,))

        expected = [True, False]
        assert expected == [check_value(check, u) is None for u in
                            ("https://api.example.com:8443/", "https://api.example.com/")]

    def test_an_internationalized_host_is_listed_and_written_in_its_ascii_form(self):
        """bücher.example in the policy is xn--bcher-kva.example; the Unicode form is refused."""
        check = UrlCheck(schemes=("https",), hosts=(normalized_host("Bücher.example"),))

        expected = [True, False]
        assert expected == [check_value(check, u) is None for u in
                            ("https://xn--bcher-kva.example/", "https://bücher.example/")]

    @given(st.text(max_size=80))
    def test_any_text_gets_an_answer_and_never_an_exception(self, text):
        """Whatever the text, the check answers; an allowed one's host is listed to urllib too."""
        answer = check_value(API, text)

        assert answer is None or isinstance(answer, str)
        if answer is None:
            host = urllib.parse.urlsplit(text).hostname or ""
            assert host == "api.example.com" or host.endswith(".example.org")

    @given(st.sampled_from(["https://api.example.com", "https://x.example.org"]),
           st.text(alphabet="@\\%:#?/.[]\t ", min_size=1, max_size=6),
           st.sampled_from(["evil.com", "127.0.0.1", "", "api.example.com"]))
    def test_splicing_separators_never_reaches_another_host(self, base, splice, tail):
        """Separators spliced between an allowed host and another never let the other through."""
        url = base + splice + tail + "/"

        if check_value(API, url) is None:
            host = urllib.parse.urlsplit(url).hostname or ""
            assert host in {"api.example.com", "x.example.org"}


class TestHostCheck:
    @pytest.mark.parametrize(("value", "allowed"), [
        ("db.internal", True), ("DB.Internal", True), ("db.internal:5432", False),
        ("db.internal/x", False), ("user@db.internal", False), ("db.internal.", False),
        ("127.0.0.1", False), ("db.internal.evil.com", False), ("", False), (7, False),
        ("db%2einternal", False), ("db.internal\n", False),
    ])
    def test_only_the_bare_listed_name_passes(self, value, allowed):
        """A host argument is a bare listed name: no port, path, userinfo or trailing dot."""
        check = HostCheck(names=("db.internal",))

        assert allowed == (check_value(check, value) is None)


class TestEmailCheck:
    @pytest.mark.parametrize(("value", "allowed"), [
        ("alice@example.com", True), ("alice@EXAMPLE.com", True),
        ("alice@evil.com", False), ('"alice@example.com"@evil.com', False),
        ("alice@example.com@evil.com", False), ("Alice <alice@example.com>", False),
        ("alice@[127.0.0.1]", False), ("alice@sub.example.com", False),
        ("alice@example.com\n", False), ("alice@example.com.", False), ("", False),
    ])
    def test_only_addresses_in_listed_domains_pass(self, value, allowed):
        """The parsed address's domain decides; quoted parts, literals and names refused."""
        check = EmailCheck(domains=("example.com",))

        assert allowed == (check_value(check, value) is None)


class TestNumbersAndStrings:
    @pytest.mark.parametrize(("value", "allowed"), [
        (0, True), (500, True), (500.0, True), (501, False), (-1, False), (True, False),
        ("5", False), (2.5, False),
    ])
    def test_number_bounds(self, value, allowed):
        """Inclusive bounds on an integer; a bool or a numeric string is not a number."""
        check = NumberCheck(minimum=0, maximum=500, integer=True)

        assert allowed == (check_value(check, value) is None)

    @pytest.mark.parametrize(("value", "allowed"), [
        ("eu-west", True), ("us-east", True), ("eu-west\n", False), ("EU-WEST", False),
        ("", False), (None, False),
    ])
    def test_string_one_of_and_pattern(self, value, allowed):
        """one_of and a full-match pattern both hold."""
        check = StringCheck(min_length=1, max_length=16, pattern="[a-z]+-[a-z]+",
                            one_of=("eu-west", "us-east", "eu-west\n"))

        assert allowed == (check_value(check, value) is None)


class TestFirstViolation:
    def constraints(self) -> tuple[ArgumentConstraint, ...]:
        return parse_constraints([
            {"id": "refund-clerk", "argument": "amount_cents", "roles": ["clerk"],
             "number": {"maximum": 500}},
            {"id": "refund-manager", "argument": "amount_cents", "roles": ["manager"],
             "number": {"maximum": 50000}},
            {"id": "links-to-api", "argument": "links[*].url",
             "url": {"hosts": ["api.example.com"]}},
        ])

    def test_bounds_per_role(self):
        """A clerk is held to 500, a manager to 50000, someone with neither to no bound."""
        arguments = {"amount_cents": 1000}

        expected = ["refund-clerk", None, None]
        assert expected == [
            None if (v := first_violation(self.constraints(), arguments, principal="p",
                                          roles=frozenset(roles))) is None else v.rule
            for roles in ({"clerk"}, {"manager"}, set())
        ]

    def test_the_json_path_of_the_offending_element_is_named(self):
        """Inside an array, the violation names the element's index, never the value."""
        arguments = {"links": [{"url": "https://api.example.com/a"},
                               {"url": "https://evil.com/"}]}

        violation = first_violation(self.constraints(), arguments, principal="p")

        expected = (RuleId("links-to-api"), "$.links[1].url", "a host the policy does not allow")
        assert expected == (violation.rule, violation.json_path, violation.reason)  # type: ignore[union-attr]

    def test_a_path_through_a_non_object_is_checked_not_skipped(self):
        """links given as a string instead of objects is refused, not passed over."""
        violation = first_violation(self.constraints(), {"links": "https://evil.com/"},
                                    principal="p")

        assert violation is not None

    def test_values_at_yields_nothing_for_an_absent_argument(self):
        """The schema decides what is required; an absent argument has nothing to check."""
        assert [] == list(values_at({"other": 1}, "links[*].url"))


class TestParsing:
    @pytest.mark.parametrize("entry", [
        {"id": "x", "argument": "url", "url": {"hosts": ["10.0.0.1"]}},
        {"id": "x", "argument": "url", "url": {"hosts": ["a b"]}},
        {"id": "x", "argument": "url", "url": {"hosts": ["h"], "ip_literals": ["nope"]}},
        {"id": "x", "argument": "n", "number": {"minimum": 5, "maximum": 1}},
        {"id": "x", "argument": "s", "string": {"pattern": "("}},
        {"id": "x", "argument": "s", "string": {"min_length": 5, "max_length": 1}},
    ])
    def test_unsound_entries_are_refused(self, entry):
        """A constraint that cannot mean anything sound is an error at load, never a pass."""
        with pytest.raises(ValueError, match="constraint x"):
            parse_constraints([entry])


@tool(version="1.0.0", parameters={
    "type": "object",
    "properties": {"url": {"type": "string"}, "amount_cents": {"type": "integer"}},
    "required": ["url"],
    "additionalProperties": False,
})
def http_get(url: str, amount_cents: int = 0) -> str:
    return url


CONSTRAINED_POLICY = """
version: 1
default: deny
principals:
  alice: {roles: [clerk]}
  bob: {roles: [manager]}
rules:
  - {id: anyone-fetches, effect: allow, principals: ["*"], tools: [http_get]}
tools:
  http_get:
    constraints:
      - {id: api-only, argument: url, url: {hosts: [api.example.com]}}
      - {id: clerk-cap, argument: amount_cents, roles: [clerk], number: {maximum: 500}}
"""


class TestInThePolicy:
    def decide(self, principal: str, **arguments: object) -> Decision:
        registry = ToolRegistry()
        registry.register(http_get)
        call = ToolCall.create(id="c1", name="http_get", arguments=arguments, dialect="api")
        return Policy.from_text(CONSTRAINED_POLICY).decide(call, registry.get("http_get"),
                                                           CallContext(principal))

    def test_a_url_to_another_host_is_denied_as_constraint_with_its_path(self):
        """The decision names the constraint and the JSON path, never the value."""
        decision = self.decide("alice", url="https://api.example.com@evil.com/")

        expected = ("deny", "constraint", "api-only", "$.url", False)
        assert expected == (decision.effect, decision.kind, decision.reasons[0],
                            decision.json_path, "evil" in decision.message)

    def test_a_bound_holds_for_its_role_only(self):
        """The clerk is capped at 500; the manager is not."""
        decisions = [self.decide(p, url="https://api.example.com/", amount_cents=1000)
                     for p in ("alice", "bob")]

        expected = [("deny", "clerk-cap"), ("allow", True)]
        assert expected == [(decisions[0].effect, decisions[0].reasons[0]),
                            (decisions[1].effect, "anyone-fetches" in decisions[1].reasons)]

    @pytest.mark.parametrize("constraint", [
        "{id: anyone-fetches, argument: url, url: {hosts: [a.example]}}",  # a rule's id
        "{id: c, argument: url, url: {hosts: [10.0.0.1]}}",                 # an IP as a name
        "{id: c, argument: url, url: {hosts: [a.example]}, host: {names: [b]}}",  # two checks
        "{id: c, argument: url}",                                           # no check
        "{id: c, argument: 'a..b', string: {max_length: 3}}",               # a bad path
    ])
    def test_an_unsound_constraint_makes_the_policy_invalid(self, constraint):
        """A constraint that cannot mean anything sound refuses the whole document."""
        text = CONSTRAINED_POLICY.replace(
            "      - {id: api-only, argument: url, url: {hosts: [api.example.com]}}",
            f"      - {constraint}")

        with pytest.raises(PolicyInvalid):
            Policy.from_text(text)
