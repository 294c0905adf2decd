"""
The review console: a Starlette app over one configuration's log and state.

Invariants:

- Every page but the login form and the static files needs a live session; a request
  without one is sent to the login form (a page) or refused 401 (a stream).
- Every POST carries the session's CSRF token, compared in constant time; without it
  the request is refused 403 before anything is read or written. Approving and
  rejecting also need the approver role, checked by the server (403 and an audit
  record for a reader), and then the policy's own approval rules (the proposer never
  approves their own call).
- Signing in compares the presented token's hash with the configured ``mcp.clients``
  hashes in constant time, or, with ``mcp.auth.oidc`` configured, verifies a token that
  looks like a JWT with the MCP face's ``OidcVerifier`` (principal, roles and groups
  from the token; the session ends by the token's ``exp``). Each success
  (``console.login``) and each refusal (``console.login_refused``, with the reason —
  the verifier's for a JWT — and never the token) is signed into the log before the
  answer. A success always starts a fresh session.
- After ``LoginLimit.max_failures`` refused sign-ins from one client address within
  ``window_seconds``, its sign-ins are refused 429 before the token is read, and
  ``console.login_throttled`` is signed once per window, not once per attempt.
- Every response carries a Content-Security-Policy that allows only this origin's
  scripts, styles, images and connections, no framing, no inline script and no
  inline style; the pages load nothing from anywhere else. Only loopback host names
  are answered (``TrustedHostMiddleware``), against DNS rebinding.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.to_thread
import structlog
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from callward.core.console._limits import LoginLimit, LoginLimiter
from callward.core.console._review import CallQuery, Review, iter_json
from callward.core.console._sessions import SESSION_COOKIE, Session, SessionStore, csrf_matches
from callward.core.errors import CallwardError, PolicyDenied
from callward.core.mcp._oidc import TokenRefused, VerifiedToken, looks_like_jwt

log = structlog.get_logger()

HERE: Final = Path(__file__).resolve().parent
CONTENT_SECURITY_POLICY: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS: Final = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
)
LOOPBACK_HOSTS: Final = ("127.0.0.1", "localhost", "[::1]", "::1")
_MAX_FILTER_CHARS: Final = 256
_FILTERS: Final = ("principal", "tool", "kind", "rule", "since", "until", "session")
_KEEPALIVE_SECONDS: Final = 15.0
_MAX_REASON_CHARS: Final = 2000
_MAX_CANDIDATE_CHARS: Final = 256 * 1024


class SecurityHeaders:
    """ASGI middleware: the CSP and the other security headers on every HTTP response."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name for name, _ in SECURITY_HEADERS}
                headers = [(k, v) for k, v in message.get("headers", []) if k not in names]
                message = {**message, "headers": [*headers, *SECURITY_HEADERS]}
            await send(message)

        await self._app(scope, receive, with_headers)


class Console:
    """
    The console's handlers over one ``Review``.

    Args:
        review: The reads and writes over the configuration.
        sessions: The live sessions.
        poll_seconds: How often a live list asks the log for new records.
        secure_cookie: Mark the cookie ``Secure`` (only when served over TLS).
        limiter: Counts refused sign-ins per client address.
    """

    def __init__(self, review: Review, sessions: SessionStore, *, poll_seconds: float = 1.0,
                 secure_cookie: bool = False, limiter: LoginLimiter | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.review = review
        self.sessions = sessions
        self.limiter = limiter or LoginLimiter(LoginLimit(), clock=clock)
        self.poll_seconds = poll_seconds
        self.secure_cookie = secure_cookie
        self.templates = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=select_autoescape(("html",), default=True),
            trim_blocks=True, lstrip_blocks=True)
        self.templates.filters["pretty"] = _pretty
        self.templates.filters["when"] = _when

    # -- plumbing -------------------------------------------------------------

    def _session(self, request: Request, *, touch: bool = True
                 ) -> tuple[str | None, Session | None]:
        session_id = request.cookies.get(SESSION_COOKIE)
        return session_id, self.sessions.get(session_id, touch=touch)

    def _page(self, name: str, session: Session | None, status: int = 200,
              **values: Any) -> HTMLResponse:
        html = self.templates.get_template(name).render(session=session, **values)
        return HTMLResponse(html, status_code=status)

    def _set_cookie(self, response: Response, session_id: str, session: Session) -> None:
        response.set_cookie(SESSION_COOKIE, session_id, max_age=self.sessions.max_age_seconds(
            session), path="/", httponly=True, samesite="strict", secure=self.secure_cookie)

    async def _checked_form(self, request: Request) -> tuple[Session, dict[str, str]] | Response:
        """The signed-in session and the form of a POST, or the refusal to send."""
        _, session = self._session(request)
        form = await request.form()
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        if session is None or not session.signed_in:
            return self._page("login.html", None, status=401, error="sign in first",
                              csrf_token="")
        if not csrf_matches(session, fields.get("csrf_token")):
            log.warning("console_csrf_refused", path=request.url.path)
            return self._page("error.html", session, status=403,
                              message="the form's CSRF token is missing or wrong; reload the "
                              "page and try again")
        return session, fields

    async def _append(self, kind: str, body: dict[str, Any]) -> None:
        await anyio.to_thread.run_sync(self.review.append, kind, body)

    # -- sign in and out ------------------------------------------------------

    async def login_form(self, request: Request) -> Response:
        session_id, session = self._session(request)
        if session is not None and session.signed_in:
            return RedirectResponse("/calls", status_code=303)
        if session is None:
            session_id, session = self.sessions.create(None)
        response = self._page("login.html", session, csrf_token=session.csrf_token)
        if session_id is not None:
            self._set_cookie(response, session_id, session)
        return response

    async def login(self, request: Request) -> Response:
        client = request.client.host if request.client else None
        throttle = self.limiter.check(client or "")
        if throttle.refused:
            if throttle.audit:
                await self._append("console.login_throttled", {
                    "client": client, "failures": throttle.failures,
                    "window_seconds": self.limiter.limit.window_seconds})
            log.warning("console_login_throttled", failures=throttle.failures)
            throttled = self._page("error.html", None, status=429,
                                   message="too many refused sign-ins from this address; "
                                   f"try again in {throttle.retry_after_seconds} s")
            throttled.headers["retry-after"] = str(throttle.retry_after_seconds)
            return throttled
        session_id, session = self._session(request)
        form = await request.form()
        token = form.get("token")
        if session is None or not csrf_matches(session, _text(form.get("csrf_token"))):
            return self._page("error.html", None, status=403,
                              message="the login form expired; open it again")
        signed_in = await self._signed_in(_text(token) or "")
        if isinstance(signed_in, dict):
            refusal = {**signed_in, "client": client}
            if refusal["reason"] != "jwks_unavailable":  # the issuer's outage, not a guess
                self.limiter.failed(client or "")
            await self._append("console.login_refused", refusal)
            log.warning("console_login_refused", reason=refusal["reason"])
            return self._page("login.html", session, status=401, csrf_token=session.csrf_token,
                              error="that token is not accepted")
        principal, verified = signed_in
        role = await anyio.to_thread.run_sync(self.review.role_of, principal)
        self.sessions.end(session_id)
        identity = None if verified is None else verified.identity
        new_id, new_session = self.sessions.create(
            principal, role, ends_at=None if verified is None else verified.expires_at,
            identity=identity)
        record: dict[str, Any] = {"principal": principal, "role": role, "client": client}
        if identity is not None:
            record.update(issuer=identity.issuer, roles=sorted(identity.roles),
                          groups=sorted(identity.groups),
                          token_id_sha256=identity.token_id_sha256,
                          session_ends_at=new_session.ends_at)
        await self._append("console.login", record)
        response = RedirectResponse("/calls", status_code=303)
        self._set_cookie(response, new_id, new_session)
        return response

    async def _signed_in(self, token: str
                         ) -> tuple[str, VerifiedToken | None] | dict[str, Any]:
        """
        Who ``token`` signs in (and the verified JWT, for OIDC), or the refusal's record:
        a JWT goes to the OIDC verifier when one is configured, any other token to the
        static hashes.
        """
        if not token:
            return {"reason": "missing_token"}
        sources = self.review.sources
        if sources.oidc is not None and looks_like_jwt(token):
            try:
                # Verification may fetch the JWKS: never on the serving loop.
                verified = await anyio.to_thread.run_sync(sources.oidc.verify, token)
            except TokenRefused as refused:
                return {"reason": refused.reason, "issuer": sources.oidc.issuer}
            if verified.expires_at is not None and verified.expires_at <= self.sessions.now():
                # Inside the verifier's leeway, but a session would end before it began.
                return {"reason": "expired", "issuer": sources.oidc.issuer}
            return verified.principal, verified
        principal = None if sources.tokens is None else sources.tokens.principal_for(token)
        if principal is None:
            return {"reason": "unknown_token" if sources.tokens is not None
                    else "malformed_token"}
        return principal, None

    async def logout(self, request: Request) -> Response:
        checked = await self._checked_form(request)
        if isinstance(checked, Response):
            return checked
        session, _ = checked
        self.sessions.end(request.cookies.get(SESSION_COOKIE))
        await self._append("console.logout", {"principal": session.principal})
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
        return response

    # -- calls ----------------------------------------------------------------

    async def home(self, request: Request) -> Response:
        return RedirectResponse("/calls", status_code=303)

    async def calls(self, request: Request) -> Response:
        _, session = self._session(request)
        if session is None or not session.signed_in:
            return RedirectResponse("/login", status_code=303)
        filters = {name: (request.query_params.get(name) or "")[:_MAX_FILTER_CHARS]
                   for name in _FILTERS}
        try:
            query = CallQuery(**{k: v or None for k, v in filters.items()})
            rows = await anyio.to_thread.run_sync(self.review.calls, query)
            head = await anyio.to_thread.run_sync(self.review.head)
        except CallwardError as exc:
            return self._page("calls.html", session, status=400, rows=[], filters=filters,
                              after=0, error=exc.message)
        return self._page("calls.html", session, rows=rows, filters=filters,
                          after=0 if head is None else head.seq, error=None)

    async def events(self, request: Request) -> Response:
        session_id, session = self._session(request, touch=False)
        if session is None or not session.signed_in:
            return Response("sign in first", status_code=401, media_type="text/plain")
        try:
            after = max(0, int(request.query_params.get("after", "0")))
            query = CallQuery(**{name: (request.query_params.get(name) or "")
                                 [:_MAX_FILTER_CHARS] or None for name in _FILTERS})
        except (ValueError, CallwardError):
            return Response("bad filter", status_code=400, media_type="text/plain")
        return StreamingResponse(self._stream(session_id, after, query),
                                 media_type="text/event-stream",
                                 headers={"x-accel-buffering": "no"})

    async def _stream(self, session_id: str | None, after: int,
                      query: CallQuery) -> AsyncIterator[str]:
        opened: dict[int, Any] = {}
        quiet_since = time.monotonic()
        yield "retry: 3000\n\n"
        while self.sessions.get(session_id, touch=False) is not None:
            after, rows = await anyio.to_thread.run_sync(
                self.review.calls_after, after, query, opened)
            for row in rows:
                yield f"event: call\nid: {row['seq']}\ndata: {json.dumps(row)}\n\n"
            if rows or time.monotonic() - quiet_since > _KEEPALIVE_SECONDS:
                quiet_since = time.monotonic()
                if not rows:
                    yield ": keep-alive\n\n"
            await anyio.sleep(self.poll_seconds)
        yield "event: ended\ndata: {}\n\n"

    async def story(self, request: Request) -> Response:
        _, session = self._session(request)
        if session is None or not session.signed_in:
            return RedirectResponse("/login", status_code=303)
        seq = int(request.path_params["seq"])
        record = await anyio.to_thread.run_sync(self.review.record, seq)
        if record is None:
            return self._page("error.html", session, status=404,
                              message=f"the log has no record {seq}")
        story = await anyio.to_thread.run_sync(self.review.story, record)
        receipt, no_receipt = await anyio.to_thread.run_sync(self.review.receipt, seq)
        keys = self.review.public_keys_raw()
        key = keys.get(record.key_id) or next(iter(keys.values()), "")
        return self._page("story.html", session, record=record, story=story,
                          records=list(iter_json(story["records"])),
                          turn=None if story["turn"] is None else
                          next(iter_json([story["turn"]])),
                          receipt=receipt, no_receipt=no_receipt, public_key=key,
                          key_ids=sorted(keys))

    # -- approvals ------------------------------------------------------------

    async def approvals(self, request: Request) -> Response:
        _, session = self._session(request)
        if session is None or not session.signed_in:
            return RedirectResponse("/login", status_code=303)
        pending = await anyio.to_thread.run_sync(self.review.proposals)
        return self._page("approvals.html", session, pending=pending,
                          settled=request.query_params.get("settled", "")[:64],
                          settled_status=request.query_params.get("status", "")[:16],
                          error=None)

    async def decide(self, request: Request) -> Response:
        checked = await self._checked_form(request)
        if isinstance(checked, Response):
            return checked
        session, fields = checked
        proposal_id = str(request.path_params["proposal"])[:128]
        action = fields.get("action")
        if action not in ("approve", "reject"):
            return self._page("error.html", session, status=400,
                              message="the action is approve or reject")
        if session.role != "approver":
            await self._append("console.action_refused", {
                "principal": session.principal, "action": action, "proposal": proposal_id,
                "reason": "read_only"})
            return self._page("error.html", session, status=403,
                              message=f"{session.principal} signed in read-only: only the "
                              "approvers the policy names may approve or reject")
        by = str(session.principal)
        try:
            await anyio.to_thread.run_sync(lambda: self.review.settle(
                proposal_id, by=by, approve=action == "approve"))
        except PolicyDenied as exc:  # ApprovalRefused: already audited as approval.refused
            pending = await anyio.to_thread.run_sync(self.review.proposals)
            return self._page("approvals.html", session, status=409, pending=pending,
                              settled="", settled_status="", error=exc.message)
        status = "approved" if action == "approve" else "rejected"
        return RedirectResponse(f"/approvals?settled={proposal_id}&status={status}",
                                status_code=303)

    # -- anomalies ------------------------------------------------------------

    async def anomalies(self, request: Request) -> Response:
        _, session = self._session(request)
        if session is None or not session.signed_in:
            return RedirectResponse("/login", status_code=303)
        anomalies = await anyio.to_thread.run_sync(self.review.anomalies)
        return self._page("anomalies.html", session, anomalies=anomalies,
                          resolved=request.query_params.get("resolved", "")[:128], error=None)

    async def resolve_anomaly(self, request: Request) -> Response:
        checked = await self._checked_form(request)
        if isinstance(checked, Response):
            return checked
        session, fields = checked
        anomaly_id = str(request.path_params["anomaly"])[:128]
        reason = fields.get("reason", "").strip()[:_MAX_REASON_CHARS]
        if session.role != "approver":
            await self._append("console.action_refused", {
                "principal": session.principal, "action": "resolve_anomaly",
                "anomaly": anomaly_id, "reason": "read_only"})
            return self._page("error.html", session, status=403,
                              message=f"{session.principal} signed in read-only: only "
                              "approvers may resolve anomalies")
        if not reason:
            anomalies = await anyio.to_thread.run_sync(self.review.anomalies)
            return self._page("anomalies.html", session, status=400, anomalies=anomalies,
                              resolved="", error="say why the anomaly is resolved")
        by = str(session.principal)
        resolved = await anyio.to_thread.run_sync(
            lambda: self.review.resolve_anomaly(anomaly_id, by=by, reason=reason))
        if resolved is None:
            anomalies = await anyio.to_thread.run_sync(self.review.anomalies)
            return self._page("anomalies.html", session, status=409, anomalies=anomalies,
                              resolved="", error="no open anomaly has that id")
        return RedirectResponse(f"/anomalies?resolved={anomaly_id}", status_code=303)

    # -- policy ---------------------------------------------------------------

    async def policy(self, request: Request) -> Response:
        _, session = self._session(request)
        if session is None or not session.signed_in:
            return RedirectResponse("/login", status_code=303)
        status = await anyio.to_thread.run_sync(self.review.policy_status)
        return self._page("policy.html", session, policy=status, candidate="", report=None,
                          error=None)

    async def replay(self, request: Request) -> Response:
        checked = await self._checked_form(request)
        if isinstance(checked, Response):
            return checked
        session, fields = checked
        candidate = fields.get("candidate", "")[:_MAX_CANDIDATE_CHARS]
        status = await anyio.to_thread.run_sync(self.review.policy_status)
        try:
            report = await anyio.to_thread.run_sync(self.review.replay, candidate)
        except CallwardError as exc:
            return self._page("policy.html", session, status=400, policy=status,
                              candidate=candidate, report=None, error=exc.message)
        return self._page("policy.html", session, policy=status, candidate=candidate,
                          report=report, error=None)

    # -- charts ---------------------------------------------------------------

    async def charts(self, request: Request) -> Response:
        _, session = self._session(request)
        if session is None or not session.signed_in:
            return RedirectResponse("/login", status_code=303)
        charts = await anyio.to_thread.run_sync(self.review.charts)
        return self._page("charts.html", session, charts=charts)

    # -- log health -----------------------------------------------------------

    async def health(self, request: Request) -> Response:
        _, session = self._session(request)
        if session is None or not session.signed_in:
            return RedirectResponse("/login", status_code=303)
        head = await anyio.to_thread.run_sync(self.review.head)
        checkpoint = None
        if head is not None:
            receipt, _ = await anyio.to_thread.run_sync(self.review.receipt, head.seq)
            checkpoint = None if receipt is None else receipt.get("checkpoint")
        origin = None if checkpoint is None else str(checkpoint).split("\n", 1)[0]
        witnesses = await anyio.to_thread.run_sync(self.review.witnesses, origin)
        return self._page("health.html", session, head=head, checkpoint=checkpoint,
                          witnesses=witnesses,
                          last_verify=self.review.last_verify,
                          source=str(getattr(self.review.sources.audit_source, "url",
                                             self.review.sources.audit_source)))

    async def verify_now(self, request: Request) -> Response:
        checked = await self._checked_form(request)
        if isinstance(checked, Response):
            return checked
        await anyio.to_thread.run_sync(self.review.verify_now)
        return RedirectResponse("/health", status_code=303)


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _pretty(value: object) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True)


def _when(value: float | None) -> str:
    if value is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(value))


def create_app(review: Review, *, sessions: SessionStore | None = None,
               clock: Callable[[], float] = time.time, poll_seconds: float = 1.0,
               allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS,
               login_limit: LoginLimit | None = None) -> Starlette:
    """
    The console app over ``review``.

    Args:
        sessions: The session store (default: in memory, 15 min idle, 8 h absolute).
        allowed_hosts: The ``Host`` names answered; anything else is refused 400.
        login_limit: Refused sign-ins allowed per client address and window (default:
            10 per 5 minutes).
    """
    console = Console(review, sessions or SessionStore(clock=clock), poll_seconds=poll_seconds,
                      limiter=LoginLimiter(login_limit or LoginLimit(), clock=clock))
    routes = [
        Route("/", console.home),
        Route("/login", console.login_form, methods=["GET"]),
        Route("/login", console.login, methods=["POST"]),
        Route("/logout", console.logout, methods=["POST"]),
        Route("/calls", console.calls),
        Route("/calls/events", console.events),
        Route("/calls/{seq:int}", console.story),
        Route("/approvals", console.approvals),
        Route("/approvals/{proposal}", console.decide, methods=["POST"]),
        Route("/anomalies", console.anomalies),
        Route("/anomalies/{anomaly}", console.resolve_anomaly, methods=["POST"]),
        Route("/policy", console.policy),
        Route("/policy/replay", console.replay, methods=["POST"]),
        Route("/charts", console.charts),
        Route("/health", console.health),
        Route("/health/verify", console.verify_now, methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, middleware=[
        Middleware(SecurityHeaders),
        Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts)),
    ])
    app.state.console = console
    return app


__all__ = ["CONTENT_SECURITY_POLICY", "LOOPBACK_HOSTS", "Console", "SecurityHeaders",
           "create_app"]
