"""
Console sign-in with OIDC access tokens, and login attempt limiting, through Starlette's
TestClient over a real signed SQLite log. The tokens are signed with real keys made here
and checked by the MCP face's ``OidcVerifier`` against a JWKS served on loopback (the
fixtures of tests/unit/mcp/test_mcp_oidc.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from starlette.testclient import TestClient

from callward.audit import read_records
from callward.core.console import (
    LoginLimit,
    LoginLimiter,
    Review,
    SessionStore,
    create_app,
)
from callward.core.mcp._auth import ClientTokens
from callward.core.mcp._oidc import OidcSettings, OidcVerifier
from tests.unit.console.test_console_app import (  # noqa: F401 - fixtures
    TOKENS,
    Clock,
    _clock,
    _review,
    csrf_of,
)
from tests.unit.mcp.test_mcp_oidc import (  # noqa: F401 - fixtures
    AUDIENCE,
    ISSUER,
    JwksServer,
    SigningKey,
    _jwks_server,
    _keys,
    b64url,
)

#: The console's clock in these tests (the test_console_app Clock's start).
NOW = 1_800_000_000.0


def claims(**override: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "erin",
                            "exp": int(NOW) + 600, "iat": int(NOW) - 10, "nbf": int(NOW) - 10,
                            "jti": "token-1", "roles": ["dba"], "groups": ["emea"]}
    base.update(override)
    return {k: v for k, v in base.items() if v is not None}


class CountingTokens(ClientTokens):
    """The configured static tokens, counting how often one is looked up."""

    lookups = 0

    def principal_for(self, token: str) -> str | None:
        CountingTokens.lookups += 1
        return super().principal_for(token)


@pytest.fixture(name="oidc_review")
def _oidc_review(review: Review, jwks_server: JwksServer, keys: dict[str, SigningKey],
                 clock: Clock) -> Review:
    """The console's review with the static tokens and a verifier of the loopback JWKS."""
    jwks_server.publish(keys["rsa"], keys["ec"], keys["ed"])
    verifier = OidcVerifier(
        OidcSettings(issuer=ISSUER, audience=AUDIENCE, jwks=jwks_server.url,
                     roles_claim="roles", groups_claim="groups"),
        clock=clock, monotonic=lambda: 1000.0)
    CountingTokens.lookups = 0
    tokens = CountingTokens({hashlib.sha256(t.encode()).hexdigest(): name
                             for name, t in TOKENS.items()})
    return Review(dataclasses.replace(review.sources, tokens=tokens, oidc=verifier),
                  clock=clock)


def app_client(review: Review, clock: Clock, *, address: str = "testclient",
               limit: LoginLimit | None = None) -> TestClient:
    sessions = SessionStore(clock=clock, idle_seconds=900, absolute_seconds=8 * 3600)
    app = create_app(review, sessions=sessions, clock=clock, login_limit=limit)
    return TestClient(app, base_url="http://127.0.0.1", follow_redirects=False,
                      client=(address, 50000))


@pytest.fixture(name="client")
def _client(oidc_review: Review, clock: Clock) -> TestClient:
    return app_client(oidc_review, clock)


def try_sign_in(client: TestClient, token: str) -> Any:
    form = client.get("/login")
    return client.post("/login", data={"token": token, "csrf_token": csrf_of(form.text)})


def bodies(review: Review, kind: str) -> list[dict[str, Any]]:
    return [r.body for r in read_records(review.sources.audit_source, kind=kind)]


class TestOidcSignIn:
    def test_a_token_signs_in_its_principal_with_its_roles_and_groups(
            self, client, oidc_review, keys):
        """The principal, roles and groups come from the token; the login record says so."""
        response = try_sign_in(client, keys["ec"].sign(claims()))
        page = client.get("/calls").text

        assert 303 == response.status_code
        assert 'id="who">erin <span class="role role-reader">reader</span>' in page
        assert '<span class="identity" id="identity" title="https://login.example.com/">' \
               "dba, emea</span>" in page
        assert [{"principal": "erin", "role": "reader", "client": "testclient",
                 "issuer": ISSUER, "roles": ["dba"], "groups": ["emea"],
                 "token_id_sha256": hashlib.sha256(b"token-1").hexdigest(),
                 "session_ends_at": NOW + 600}] == bodies(oidc_review, "console.login")

    def test_a_principal_the_policy_names_as_approver_approves(self, client, oidc_review,
                                                               keys):
        """lena holds the policy file's role lead, which the approval rule names."""
        try_sign_in(client, keys["rsa"].sign(claims(sub="lena", roles=None)))

        assert ["approver"] == [b["role"] for b in bodies(oidc_review, "console.login")]

    def test_a_token_role_does_not_make_an_approver(self, client, oidc_review, keys):
        """
        erin's token says lead, the role the approval rule names; Policy.approve checks
        the policy file's roles only, so the console signs erin in read-only.
        """
        try_sign_in(client, keys["ed"].sign(claims(roles=["lead"])))

        assert [("reader", ["lead"])] == [(b["role"], b["roles"])
                                          for b in bodies(oidc_review, "console.login")]

    def test_the_session_ends_at_the_tokens_exp(self, client, clock, keys):
        """A token with 5 minutes left: the cookie lives 300 s; the session ends at exp."""
        response = try_sign_in(client, keys["rsa"].sign(claims(exp=int(NOW) + 300)))
        cookie = {part.strip() for part in response.headers["set-cookie"].split(";")}

        assert "Max-Age=300" in cookie
        clock.now += 299
        assert 200 == client.get("/calls").status_code
        clock.now += 1
        assert "/login" == client.get("/calls").headers["location"]

    def test_a_long_token_still_ends_at_the_absolute_limit(self, client, clock, keys):
        """A token valid for a day gives a session of the console's 8 hours at most."""
        try_sign_in(client, keys["rsa"].sign(claims(exp=int(NOW) + 86400)))
        for _ in range(47):
            clock.now += 600
            assert 200 == client.get("/calls").status_code
        clock.now += 600

        assert "/login" == client.get("/calls").headers["location"]

    def test_a_token_inside_the_leeway_after_exp_is_refused(self, client, oidc_review, keys):
        """The verifier's 60 s leeway accepts it; a session would end before it began."""
        response = try_sign_in(client, keys["rsa"].sign(claims(exp=int(NOW) - 30)))

        assert 401 == response.status_code
        assert [] == bodies(oidc_review, "console.login")
        assert [{"reason": "expired", "issuer": ISSUER, "client": "testclient"}] == bodies(
            oidc_review, "console.login_refused")

    def test_a_static_token_still_signs_in_beside_oidc(self, client, oidc_review):
        """A token that is no JWT is looked up among mcp.clients' hashes."""
        response = try_sign_in(client, TOKENS["lena"])

        assert 303 == response.status_code
        assert [{"principal": "lena", "role": "approver", "client": "testclient"}] == bodies(
            oidc_review, "console.login")


def forged(keys: dict[str, SigningKey], how: str) -> str:
    """A token that must not sign anybody in, made one way."""
    if how == "none":
        header = b64url(json.dumps({"alg": "none", "kid": "rsa-1"}).encode())
        return f"{header}.{b64url(json.dumps(claims(sub='lena')).encode())}."
    if how == "hs256_public_key":
        public = keys["rsa"].private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        signing = (b64url(json.dumps({"alg": "HS256", "kid": "rsa-1"}).encode()) + "."
                   + b64url(json.dumps(claims(sub="lena")).encode()))
        mac = hmac.new(public, signing.encode(), hashlib.sha256).digest()
        return f"{signing}.{b64url(mac)}"
    if how == "other_key":  # signed by rsa-2, which the JWKS does not hold, named rsa-1
        return SigningKey("rsa-1", "RS256", keys["rsa2"].private).sign(claims(sub="lena"))
    if how == "changed_payload":
        header, _, signature = keys["rsa"].sign(claims()).split(".")
        return f"{header}.{b64url(json.dumps(claims(sub='lena')).encode())}.{signature}"
    overrides: dict[str, dict[str, Any]] = {
        "expired": {"exp": int(NOW) - 120}, "wrong_audience": {"aud": "another"},
        "wrong_issuer": {"iss": "https://evil.example/"}, "not_yet_valid": {"nbf": NOW + 600},
    }
    return keys["rsa"].sign(claims(sub="lena", **overrides[how]))


class TestRefusedTokens:
    @pytest.mark.parametrize(("how", "reason"), [
        ("none", "alg_not_allowed"), ("hs256_public_key", "alg_not_allowed"),
        ("other_key", "bad_signature"), ("changed_payload", "bad_signature"),
        ("expired", "expired"), ("wrong_audience", "wrong_audience"),
        ("wrong_issuer", "wrong_issuer"), ("not_yet_valid", "not_yet_valid"),
    ])
    def test_a_refused_token_is_audited_with_the_verifiers_reason(
            self, client, oidc_review, keys, how, reason):
        """401, no session, ``console.login_refused`` with the verifier's reason, no token."""
        token = forged(keys, how)

        response = try_sign_in(client, token)

        refusals = bodies(oidc_review, "console.login_refused")
        assert 401 == response.status_code
        assert "/login" == client.get("/calls").headers["location"]
        assert [] == bodies(oidc_review, "console.login")
        assert [{"reason": reason, "issuer": ISSUER, "client": "testclient"}] == refusals
        assert token not in json.dumps(refusals)

    def test_an_unreachable_jwks_refuses_every_token(self, oidc_review, clock, keys,
                                                     jwks_server):
        """A JWKS the console cannot read: refused ``jwks_unavailable`` (fail closed)."""
        jwks_server.status = 500
        client = app_client(oidc_review, clock)

        response = try_sign_in(client, keys["rsa"].sign(claims()))

        assert 401 == response.status_code
        assert ["jwks_unavailable"] == [b["reason"] for b in bodies(
            oidc_review, "console.login_refused")]

    def test_oidc_alone_refuses_a_token_that_is_no_jwt(self, oidc_review, clock):
        """Without mcp.clients, a static-looking token is ``malformed_token``."""
        alone = Review(dataclasses.replace(oidc_review.sources, tokens=None), clock=clock)
        client = app_client(alone, clock)

        response = try_sign_in(client, TOKENS["lena"])

        assert 401 == response.status_code
        assert ["malformed_token"] == [b["reason"] for b in bodies(
            alone, "console.login_refused")]

    def test_sources_need_tokens_or_oidc(self, oidc_review):
        """A console with neither would sign nobody in: refused at construction."""
        with pytest.raises(ValueError, match="static tokens, OIDC, or both"):
            dataclasses.replace(oidc_review.sources, tokens=None, oidc=None)


class TestLoginLimit:
    def test_after_ten_refusals_the_address_is_refused_unread(self, client, oidc_review,
                                                              keys):
        """
        Ten refused sign-ins in five minutes: the eleventh attempt, even with a valid token,
        is 429 with Retry-After, and neither token lookup nor verification runs.
        """
        for _ in range(10):
            assert 401 == try_sign_in(client, "guess").status_code
        lookups = CountingTokens.lookups

        static = try_sign_in(client, TOKENS["lena"])
        jwt = try_sign_in(client, keys["rsa"].sign(claims()))

        assert (429, 429) == (static.status_code, jwt.status_code)
        assert "300" == static.headers["retry-after"]
        assert lookups == CountingTokens.lookups
        assert 10 == len(bodies(oidc_review, "console.login_refused"))
        assert [] == bodies(oidc_review, "console.login")

    def test_throttling_is_audited_once_per_window(self, client, oidc_review, clock):
        """Fifty throttled attempts: one ``console.login_throttled``; a window later, another."""
        for _ in range(10):
            try_sign_in(client, "guess")
        for _ in range(50):
            clock.now += 1
            assert 429 == try_sign_in(client, "guess").status_code
        first = bodies(oidc_review, "console.login_throttled")
        clock.now += 251  # a window since the first audit: ten more guesses, then throttled
        for _ in range(11):
            try_sign_in(client, "guess")

        assert [{"client": "testclient", "failures": 10, "window_seconds": 300.0}] == first
        assert 2 == len(bodies(oidc_review, "console.login_throttled"))

    def test_the_address_may_sign_in_once_its_refusals_age_out(self, client, clock):
        """The oldest refusal leaving the window lets the address try again."""
        for _ in range(10):
            clock.now += 10
            try_sign_in(client, "guess")
        clock.now += 209  # the first refusal is 299 s old
        assert 429 == try_sign_in(client, TOKENS["lena"]).status_code
        clock.now += 1

        assert 303 == try_sign_in(client, TOKENS["lena"]).status_code

    def test_another_address_is_not_limited(self, oidc_review, clock):
        """One address's refusals do not pause another's sign-in."""
        limiter = LoginLimiter(LoginLimit(), clock=clock)
        for _ in range(10):
            limiter.failed("10.0.0.1")

        assert (True, False) == (limiter.check("10.0.0.1").refused,
                                 limiter.check("10.0.0.2").refused)

    def test_a_success_does_not_reset_the_count(self, oidc_review, clock):
        """Holding one valid token does not buy more guesses at another's."""
        client = app_client(oidc_review, clock, limit=LoginLimit(max_failures=3,
                                                                  window_seconds=60))
        for _ in range(2):
            try_sign_in(client, "guess")
        assert 303 == try_sign_in(client, TOKENS["alice"]).status_code
        client.cookies.clear()
        try_sign_in(client, "guess")

        assert 429 == try_sign_in(client, TOKENS["alice"]).status_code

    def test_an_issuer_outage_is_not_counted_as_guessing(self, oidc_review, clock, keys,
                                                         jwks_server):
        """``jwks_unavailable`` refusals leave the count alone."""
        jwks_server.status = 500
        client = app_client(oidc_review, clock, limit=LoginLimit(max_failures=2))
        for _ in range(3):
            assert 401 == try_sign_in(client, keys["rsa"].sign(claims())).status_code

    def test_the_tracked_addresses_are_bounded(self, clock):
        """A flood of addresses evicts the stalest, never the busy one's count."""
        limiter = LoginLimiter(LoginLimit(max_failures=2), clock=clock, max_addresses=10)
        limiter.failed("busy")
        for index in range(30):
            clock.now += 1
            limiter.failed(f"10.0.0.{index}")
            limiter.failed("busy")

        assert True is limiter.check("busy").refused
        assert 10 >= len(limiter._addresses)

    @pytest.mark.parametrize("limit", [{"max_failures": 0}, {"window_seconds": 0}])
    def test_a_limit_needs_room(self, limit):
        with pytest.raises(ValueError, match="login limit"):
            LoginLimit(**limit)


def test_the_session_cookie_never_outlives_the_token(clock):
    """``max_age_seconds`` is the nearer of the token's exp and the absolute limit."""
    store = SessionStore(clock=clock, idle_seconds=900, absolute_seconds=3600)
    _, short = store.create("erin", ends_at=clock.now + 120)
    _, long = store.create("erin", ends_at=clock.now + 86400)

    assert (120, 3600, clock.now + 3600) == (store.max_age_seconds(short),
                                             store.max_age_seconds(long), long.ends_at)

