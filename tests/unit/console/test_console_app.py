"""
The console's sessions, CSRF checks and headers, through Starlette's TestClient over a
real signed SQLite log (no browser, no Docker).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from callward.audit import FileSigner, SQLiteAuditStore, read_records
from callward.core.cli._stats import stats_from_records
from callward.core.console import (
    CONTENT_SECURITY_POLICY,
    SESSION_COOKIE,
    ConsoleSources,
    Review,
    SessionStore,
    create_app,
)
from callward.core.console._serve import serve
from callward.core.console._sessions import csrf_matches
from callward.core.errors import ConfigurationError
from callward.core.gateway._config import Home, load_config
from callward.core.mcp._auth import ClientTokens
from callward.policies._anomaly_state import Anomaly, AnomalyState

POLICY = """\
version: 1
default: deny
principals:
  alice: {roles: [analyst]}
  lena: {roles: [lead]}
rules:
  - {id: analysts-add, effect: allow, roles: [analyst], tools: [add]}
approvals:
  - {id: adds-need-a-lead, tools: [add], approvers: {roles: [lead]}}
"""
TOKENS = {"alice": "alice-secret", "lena": "lena-secret"}


class Clock:
    now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(name="clock")
def _clock() -> Clock:
    return Clock()


@pytest.fixture(name="review")
def _review(tmp_path: Path, examples: Path) -> Review:
    (tmp_path / "policy.yaml").write_text(POLICY, encoding="utf-8")
    (tmp_path / "tools.py").write_text((examples / "tools.py").read_text(), encoding="utf-8")
    config = tmp_path / "callward.yaml"
    config.write_text("tools: [tools.py]\npolicy: policy.yaml\n"
                      "audit: {witnesses: [{directory: witness}]}\n", encoding="utf-8")
    home = Home(tmp_path / "home")
    home.root.mkdir()
    with SQLiteAuditStore(home.audit_db, FileSigner.load_or_create(home.keys_dir)) as log:
        log.append("call.denied", {
            "call": {"id": "c1", "name": "add", "arguments": {"a": 1, "b": 2}},
            "principal": "<script>alert(1)</script>", "session_id": "",
            "decision": {"effect": "deny", "kind": "permission", "reasons": ["r1"]}})
        origin = {"id": "demo-model", "digest": "d" * 64, "run_id": "run-1", "turn": 2,
                  "output_sha256": "e" * 64}
        log.append("call.authorized", {
            "call": {"id": "c2", "name": "add", "arguments": {"a": 1, "b": 2},
                     "dialect": "hermes"},
            "principal": "alice", "session_id": "s", "model": origin,
            "provenance": {"edges": [{"argument": "a", "source_step": 1,
                                      "source_call_id": "c0", "source_output_path": "$",
                                      "source_seq": 1}], "literal_labels": []},
            "decision": {"effect": "allow", "kind": None, "reasons": ["analysts-add"]},
            "limits": {"wall_seconds": 5}})
        log.append("call.completed", {"authorized_seq": 2, "call_id": "c2", "outcome": "ok",
                                      "result_bytes": 1, "result_sha256": "f" * 64,
                                      "usage": {"wall_ms": 12.5},
                                      "durations_ms": {"policy": 1.5, "sandbox": 12.0}})
        log.append("model.turn", {"run_id": "run-1", "turn": 2, "prompt_sha256": "a" * 64,
                                  "output_sha256": "e" * 64,
                                  "tokens": {"prompt": 321, "output": 45}})
    tokens = ClientTokens({hashlib.sha256(t.encode()).hexdigest(): name
                           for name, t in TOKENS.items()})
    return Review(ConsoleSources(config=load_config(config), home=home,
                                 audit_source=home.audit_db, public_keys=(home.public_key,),
                                 tokens=tokens))


@pytest.fixture(name="client")
def _client(review: Review, clock: Clock) -> TestClient:
    sessions = SessionStore(clock=clock, idle_seconds=900, absolute_seconds=8 * 3600)
    return TestClient(create_app(review, sessions=sessions), base_url="http://127.0.0.1",
                      follow_redirects=False)


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html)[1]  # type: ignore[index]


def sign_in(client: TestClient, token: str) -> str:
    """Sign in; returns the new session's CSRF token."""
    response = client.post("/login", data={"token": token,
                                           "csrf_token": csrf_of(client.get("/login").text)})
    assert 303 == response.status_code
    return csrf_of(client.get("/calls").text)


def kinds(review: Review) -> list[str]:
    return [r.kind for r in read_records(review.sources.audit_source)]


class TestHeaders:
    @pytest.mark.parametrize("path", ["/login", "/static/verify.js", "/calls", "/nowhere"])
    def test_every_response_carries_the_strict_policy(self, client, path):
        """Pages, static files, redirects and 404s all carry the CSP and no-framing."""
        response = client.get(path)

        assert CONTENT_SECURITY_POLICY == response.headers["content-security-policy"]
        assert ("DENY", "nosniff", "no-store") == (
            response.headers["x-frame-options"], response.headers["x-content-type-options"],
            response.headers["cache-control"])

    def test_the_policy_allows_no_inline_script_or_remote_source(self):
        """The CSP names only 'self' (and data: images) and forbids framing and base."""
        expected = ("default-src 'none'; script-src 'self'; style-src 'self'; "
                    "img-src 'self' data:; connect-src 'self'; form-action 'self'; "
                    "frame-ancestors 'none'; base-uri 'none'")
        assert expected == CONTENT_SECURITY_POLICY

    def test_pages_hold_no_inline_script_or_style(self, client):
        """No <script> with a body, no style= attribute, no on*= handler in any page."""
        sign_in(client, TOKENS["lena"])
        pages = [client.get(p).text for p in ("/calls", "/calls/2", "/approvals", "/anomalies",
                                              "/policy", "/charts", "/health")]

        assert [] == [p for p in pages if re.search(r"<script[^>]*>[^<]", p)
                      or re.search(r"\sstyle=|\son[a-z]+=", p)]

    def test_a_host_that_is_not_loopback_is_refused(self, client):
        """A request naming another host (DNS rebinding) is refused."""
        response = client.get("/login", headers={"host": "attacker.example"})

        assert 400 == response.status_code

    def test_serving_beyond_loopback_is_refused(self, review):
        """``serve`` refuses a non-loopback address without the unsafe flag."""
        with pytest.raises(ConfigurationError, match="loopback only"):
            serve(review, host="0.0.0.0", port=1, idle_seconds=1, absolute_seconds=2)  # noqa: S104


class TestSignIn:
    def test_the_cookie_is_http_only_strict_and_expires(self, client):
        """The session cookie: HttpOnly, SameSite=Strict, Path=/, a Max-Age of 8 h at most."""
        cookie = client.get("/login").headers["set-cookie"]

        assert cookie.startswith(SESSION_COOKIE + "=")
        assert {"HttpOnly", "Path=/", "SameSite=strict", "Max-Age=28800"} <= {
            part.strip() for part in cookie.split(";")}

    def test_signing_in_starts_a_new_session(self, client):
        """The pre-login session id is worthless after login (no fixation)."""
        client.get("/login")
        before = client.cookies[SESSION_COOKIE]
        sign_in(client, TOKENS["alice"])
        after = client.cookies[SESSION_COOKIE]
        client.cookies.clear()
        old = client.get("/calls", headers={"cookie": f"{SESSION_COOKIE}={before}"})
        new = client.get("/calls", headers={"cookie": f"{SESSION_COOKIE}={after}"})

        assert before != after
        assert ("/login", 200) == (old.headers["location"], new.status_code)

    def test_a_wrong_token_is_refused_and_audited(self, client, review):
        """An unknown token: 401, ``console.login_refused`` with the reason, no token text."""
        csrf = csrf_of(client.get("/login").text)

        response = client.post("/login", data={"token": "guess", "csrf_token": csrf})

        refused = list(read_records(review.sources.audit_source, kind="console.login_refused"))
        assert 401 == response.status_code
        assert [{"reason": "unknown_token", "client": "testclient"}] == [r.body for r in refused]

    def test_a_login_without_the_form_token_is_refused(self, client, review):
        """A cross-site login POST (no CSRF token) is refused before the token is read."""
        client.get("/login")

        response = client.post("/login", data={"token": TOKENS["alice"]})

        assert 403 == response.status_code
        assert ["call.denied", "call.authorized", "call.completed", "model.turn"] == kinds(review)

    def test_roles_come_from_the_approval_rules(self, client, review):
        """lena is named by an approval rule: approver; alice is not: reader."""
        sign_in(client, TOKENS["lena"])
        client.cookies.clear()
        sign_in(client, TOKENS["alice"])

        logins = [r.body["role"] for r in read_records(review.sources.audit_source,
                                                       kind="console.login")]
        assert ["approver", "reader"] == logins

    def test_pages_need_a_session(self, client):
        """Without a session, pages send to the login form and the event stream is 401."""
        assert ("/login", 401) == (client.get("/calls").headers["location"],
                                   client.get("/calls/events").status_code)


class TestExpiry:
    def test_an_idle_session_ends(self, client, clock):
        """Fifteen minutes without a request end the session."""
        sign_in(client, TOKENS["alice"])
        clock.now += 899
        assert 200 == client.get("/calls").status_code
        clock.now += 900

        assert "/login" == client.get("/calls").headers["location"]

    def test_a_busy_session_ends_after_eight_hours(self, client, clock):
        """A session used every ten minutes still ends eight hours after it began."""
        sign_in(client, TOKENS["alice"])
        for _ in range(47):
            clock.now += 600
            assert 200 == client.get("/calls").status_code
        clock.now += 600

        assert "/login" == client.get("/calls").headers["location"]


class TestCsrf:
    def test_a_post_without_the_session_token_is_refused(self, client, review):
        """Verify-now with a wrong CSRF token: 403, nothing run."""
        sign_in(client, TOKENS["lena"])

        response = client.post("/health/verify", data={"csrf_token": "x" * 43})

        assert 403 == response.status_code
        assert review.last_verify is None

    def test_a_post_with_the_session_token_runs(self, client, review):
        """The same POST with the session's token runs the verification."""
        csrf = sign_in(client, TOKENS["lena"])

        response = client.post("/health/verify", data={"csrf_token": csrf})

        assert 303 == response.status_code
        assert "OK" == review.last_verify["verdict"]

    def test_csrf_tokens_are_compared_exactly(self, clock):
        """Empty, prefix and other-session tokens never match."""
        store = SessionStore(clock=clock)
        _, first = store.create("alice")
        _, second = store.create("alice")

        assert (True, False, False, False) == (
            csrf_matches(first, first.csrf_token), csrf_matches(first, ""),
            csrf_matches(first, first.csrf_token[:-1]), csrf_matches(first, second.csrf_token))


class TestEscaping:
    def test_record_text_is_escaped(self, client):
        """A principal holding markup is shown as text in the list and the story."""
        sign_in(client, TOKENS["alice"])

        pages = client.get("/calls").text + client.get("/calls/1").text

        assert "<script>alert(1)" not in pages
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in pages


def open_anomaly(review: Review, anomaly_id: str = "an_1") -> None:
    state = AnomalyState(review.sources.home.anomaly_state_db)
    try:
        state.add(Anomaly(id=anomaly_id, principal="alice", tool="add", metric="call_rate",
                          evidence={"observed": 40, "baseline": 3.5, "threshold": 12,
                                    "window": "60s"},
                          detected_at=1_800_000_000.0, last_seen=1_800_000_000.0))
    finally:
        state.close()


class TestAnomalies:
    def test_an_open_anomaly_shows_its_evidence(self, client, review):
        """The page shows the metric, observed, baseline and window, and links the calls."""
        open_anomaly(review)
        sign_in(client, TOKENS["alice"])

        page = client.get("/anomalies").text

        assert "call_rate: alice · add" in page
        assert "<dt>observed</dt><dd>40</dd>" in page
        assert "<dt>window</dt><dd>60s</dd>" in page
        assert "/calls?principal=alice&amp;tool=add" in page

    def test_an_approver_resolves_with_a_reason(self, client, review):
        """Resolved: one signed anomaly.resolved holding who and the reviewer's reason."""
        open_anomaly(review)
        csrf = sign_in(client, TOKENS["lena"])

        response = client.post("/anomalies/an_1", data={"csrf_token": csrf,
                                                        "reason": "a load test"})

        source = review.sources.audit_source
        assert 303 == response.status_code
        assert [] == review.anomalies()
        assert [("an_1", "lena", "a load test")] == [
            (r.body["anomaly_id"], r.body["by"], r.body["reason"])
            for r in read_records(source, kind="anomaly.resolved")]
        assert [] == list(read_records(source, kind="console.anomaly_reason"))

    def test_a_reader_cannot_resolve(self, client, review):
        """A read-only user's resolve is refused 403 and the anomaly stays open."""
        open_anomaly(review)
        csrf = sign_in(client, TOKENS["alice"])

        response = client.post("/anomalies/an_1", data={"csrf_token": csrf, "reason": "x"})

        assert 403 == response.status_code
        assert ["an_1"] == [a.id for a in review.anomalies()]

    def test_a_resolution_needs_a_reason(self, client, review):
        """No reason, no resolution."""
        open_anomaly(review)
        csrf = sign_in(client, TOKENS["lena"])

        response = client.post("/anomalies/an_1", data={"csrf_token": csrf, "reason": " "})

        assert 400 == response.status_code
        assert ["an_1"] == [a.id for a in review.anomalies()]


class TestPolicyPage:
    def test_the_document_in_force_is_shown(self, client, review):
        """The digest and the approval rules of the policy file."""
        sign_in(client, TOKENS["alice"])

        page = client.get("/policy").text

        assert review.policy().digest in page
        assert "<code>adds-need-a-lead</code>" in page

    def test_a_candidate_replays_over_the_log(self, client, review):
        """
        Deny-all changes nothing; allowing the denied principal flips the denial; a broken
        candidate says why; the log is not written either way.
        """
        csrf = sign_in(client, TOKENS["alice"])
        before = len(list(read_records(review.sources.audit_source)))
        allow = ("version: 1\ndefault: deny\nrules:\n  - {id: let-in, effect: allow, "
                 "principals: ['<script>alert(1)</script>'], tools: [add]}\n")

        same = client.post("/policy/replay", data={
            "csrf_token": csrf, "candidate": "version: 1\ndefault: deny\nrules: []\n"})
        flipped = client.post("/policy/replay", data={"csrf_token": csrf, "candidate": allow})
        bad = client.post("/policy/replay", data={"csrf_token": csrf,
                                                  "candidate": "version: 1\nrules: 7\n"})

        assert 'data-changed="0"' in same.text
        assert 'data-changed="1"' in flipped.text
        assert "1 denied → allowed" in flipped.text
        assert (400, True) == (bad.status_code, 'id="replay-error"' in bad.text)
        assert before == len(list(read_records(review.sources.audit_source)))


class TestStory:
    def test_a_call_from_a_model_turn_tells_its_whole_story(self, client):
        """The turn that emitted it (linked), provenance links, limits and the outcome."""
        sign_in(client, TOKENS["alice"])

        page = client.get("/calls/2").text

        assert '<a href="/calls/4">model.turn, record 4</a>' in page
        assert "321 in, 45 out" in page
        assert '<a href="/calls/1">record 1</a>' in page
        assert "<dt>dialect</dt><dd>hermes</dd>" in page
        assert "&#34;wall_seconds&#34;: 5" in page
        assert '<dd id="outcome-kind">ok</dd>' in page
        assert 1 == page.count('<a href="/calls/3">3</a> call.completed')


class TestHealth:
    def test_witnesses_are_listed_and_checked(self, client, review):
        """The configured witness directory is shown, and Verify now checks its copy."""
        csrf = sign_in(client, TOKENS["lena"])  # the login's store publishes a checkpoint

        client.post("/health/verify", data={"csrf_token": csrf})
        page = client.get("/health").text

        assert f"<p>dir:{review.sources.config.source.parent / 'witness'}</p>" in page
        assert ("OK", 1) == (review.last_verify["verdict"], review.last_verify["witnessed"])


class TestCharts:
    def test_calls_and_denials_are_drawn(self, client):
        """Calls over time by kind and denials by rule, as SVG bars with titles."""
        sign_in(client, TOKENS["alice"])

        page = client.get("/charts").text

        assert "<title>1 call.denied</title>" in page
        assert "<title>1 call.authorized</title>" in page
        assert ">r1</text>" in page
        assert 'id="chart-latency-empty"' in page

    def test_latency_comes_from_callward_stats(self, review, clock):
        """With ``callward stats``'s summary handed in, each stage gets its p50 bar."""
        with_stats = Review(review.sources, clock=clock, stats=stats_from_records)
        client = TestClient(create_app(with_stats, sessions=SessionStore(clock=clock)),
                            base_url="http://127.0.0.1", follow_redirects=False)
        sign_in(client, TOKENS["alice"])

        page = client.get("/charts").text

        assert ">policy</text>" in page
        assert "<title>p50 12 ms, p99 12.0 ms, n=1</title>" in page


class TestSessionTable:
    def test_a_flood_of_login_forms_signs_nobody_out(self, clock):
        """With the table full, anonymous sessions are dropped before signed-in ones."""
        store = SessionStore(clock=clock, max_sessions=10)
        signed_in, _ = store.create("alice", "reader")
        for _ in range(50):
            clock.now += 1
            store.create(None)

        assert "alice" == store.get(signed_in).principal
