"""The dashboard's HTTP side: login, sessions, CSRF, the page, the live feed, the controls.

- Login: the secret from ``dashboard.login`` compared in constant time; a wrong one gets
  401 after a delay, and guesses are taken one at a time, so guessing runs at about one
  try a second. The login form itself carries a double-submit token (cookie + field).
- Sessions live in this process's memory (a restart logs everyone out); the cookie holds
  a random id only, ``HttpOnly``, ``SameSite=Strict``, ``Secure`` when served over TLS.
- CSRF: a synchronizer token per session, in a ``<meta>`` tag the page's script sends
  back as ``X-CSRF-Token`` (forms: a ``csrf`` field); every POST without the right one is
  refused with 403 before anything else happens. A POST whose ``Origin`` is another site
  is refused too, and the ``Host`` header must be this machine's (no DNS rebinding).
- Pages and API calls without a session: 303 to the login page, 401 for the API.
- Everything the browser loads comes from this package (``static/``), under a
  Content-Security-Policy that allows nothing else.
"""

from __future__ import annotations

import asyncio
import hmac
import html
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qs, urlsplit

import structlog
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dashboard.actions import (
    ActionFailed,
    Controls,
    DecideForm,
    RevokeForm,
    RunForm,
)
from dashboard.feed import Feed
from dashboard.login import LoginSecret
from protocol.control import Action

log = structlog.get_logger("mas.dashboard")
SESSION_COOKIE = "mas_session"
LOGIN_COOKIE = "mas_login_csrf"
CSRF_HEADER = "x-csrf-token"
IDLE_S = 8 * 3600
MAX_AGE_S = 24 * 3600
SSE_EVERY_S = 1.0
MAX_FORM_BYTES = 16 * 1024
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),  # no-referrer would make Origin "null"
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
]
AGENT_ACTIONS = ("start", "stop", "restart")
M = TypeVar("M", bound=BaseModel)


@dataclass
class Session:
    id: str
    csrf: str
    created: float = field(default_factory=time.time)
    seen: float = field(default_factory=time.time)


class Sessions:
    def __init__(self) -> None:
        self._by_id: dict[str, Session] = {}

    def new(self) -> Session:
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32))
        self._by_id[session.id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        session = self._by_id.get(session_id)
        now = time.time()
        if session is None:
            return None
        if now - session.seen > IDLE_S or now - session.created > MAX_AGE_S:
            self._by_id.pop(session_id, None)
            return None
        session.seen = now
        return session

    def drop(self, session_id: str) -> None:
        self._by_id.pop(session_id, None)

    def alive(self, session_id: str) -> bool:
        """Still logged in (an open live stream counts as activity, up to the maximum age)."""
        session = self._by_id.get(session_id)
        if session is None or time.time() - session.created > MAX_AGE_S:
            self._by_id.pop(session_id, None)
            return False
        session.seen = time.time()
        return True


class SecurityHeaders:
    """Adds the headers above to every response, the static files' included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)


def _page(name: str) -> str:
    return resources.files("dashboard").joinpath("static", name).read_text("utf-8")


def _same(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(str(a).encode(), str(b).encode())


def _error(status: int, text: str) -> JSONResponse:
    return JSONResponse({"error": text}, status_code=status)


Handler = Callable[[Request, Session], Awaitable[Response]]


class Dashboard:
    def __init__(self, secret: LoginSecret, feed: Feed, controls: Controls, *,
                 secure_cookie: bool = False, allowed_hosts: list[str] | None = None,
                 failed_login_delay_s: float = 1.0) -> None:
        self.secret = secret
        self.feed = feed
        self.controls = controls
        self.secure_cookie = secure_cookie
        self.failed_login_delay_s = failed_login_delay_s
        self.sessions = Sessions()
        self._guess = asyncio.Lock()
        static = StaticFiles(directory=str(resources.files("dashboard").joinpath("static")))
        self.app = Starlette(
            routes=[
                Route("/", self.guard_page(self.index)),
                Route("/login", self.login_form, methods=["GET"]),
                Route("/login", self.login, methods=["POST"]),
                Route("/logout", self.guard(self.logout), methods=["POST"]),
                Route("/api/snapshot", self.guard_api(self.snapshot)),
                Route("/api/events", self.guard_api(self.events)),
                Route("/api/approvals/{id}/{decision}", self.guard(self.decide),
                      methods=["POST"]),
                Route("/api/revoke", self.guard(self.revoke), methods=["POST"]),
                Route("/api/workflows/run", self.guard(self.run), methods=["POST"]),
                Route("/api/agents/{agent}/logs", self.guard_api(self.logs)),
                Route("/api/agents/{agent}/{action}", self.guard(self.agent_action),
                      methods=["POST"]),
                Route("/favicon.ico", lambda _: Response(status_code=204)),
                Mount("/static", static, name="static"),
            ],
            middleware=[Middleware(SecurityHeaders),
                        Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts or
                                   ["127.0.0.1", "localhost", "[::1]", "::1"])],
        )

    # --- guards ---------------------------------------------------------------------

    def _session(self, request: Request) -> Session | None:
        return self.sessions.get(request.cookies.get(SESSION_COOKIE))

    def guard_page(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def page(request: Request) -> Response:
            session = self._session(request)
            if session is None:
                return RedirectResponse("/login", status_code=303)
            return await handler(request, session)
        return page

    def guard_api(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def api(request: Request) -> Response:
            session = self._session(request)
            if session is None:
                return _error(401, "login required")
            return await handler(request, session)
        return api

    def guard(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        """A state-changing request: session, then same origin, then the CSRF token."""
        async def post(request: Request) -> Response:
            session = self._session(request)
            if session is None:
                return _error(401, "login required")
            if not self._same_origin(request):
                return _error(403, "cross-site request refused")
            token = request.headers.get(CSRF_HEADER)
            if token is None and request.headers.get("content-type", "").startswith(
                    "application/x-www-form-urlencoded"):
                token = (await _form(request)).get("csrf")
            if not token:
                return _error(403, "missing CSRF token; reload the page")
            if not _same(token, session.csrf):
                return _error(403, "wrong CSRF token; reload the page")
            return await handler(request, session)
        return post

    @staticmethod
    def _same_origin(request: Request) -> bool:
        origin = request.headers.get("origin")
        if origin is None:
            return True  # browsers send Origin on every cross-site POST; the token still holds
        return urlsplit(origin).netloc == request.headers.get("host", "")

    def _set_session(self, response: Response, session: Session) -> None:
        response.set_cookie(SESSION_COOKIE, session.id, max_age=MAX_AGE_S, path="/",
                            httponly=True, samesite="strict", secure=self.secure_cookie)

    # --- login ------------------------------------------------------------------------

    def _login_page(self, token: str, error: str = "", status: int = 200) -> HTMLResponse:
        body = _page("login.html").replace("{{csrf}}", html.escape(token, quote=True)) \
            .replace("{{error}}", html.escape(error))
        response = HTMLResponse(body, status_code=status)
        response.set_cookie(LOGIN_COOKIE, token, path="/login", httponly=True,
                            samesite="strict", secure=self.secure_cookie)
        return response

    async def login_form(self, request: Request) -> Response:
        if self._session(request) is not None:
            return RedirectResponse("/", status_code=303)
        return self._login_page(request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(32))

    async def login(self, request: Request) -> Response:
        form = await _form(request)
        token, attempt = form.get("csrf"), form.get("secret")
        if not isinstance(token, str) or not _same(token, request.cookies.get(LOGIN_COOKIE)):
            return PlainTextResponse("login form expired; reload the page", status_code=403)
        if not self._same_origin(request):
            return PlainTextResponse("cross-site request refused", status_code=403)
        async with self._guess:
            if not isinstance(attempt, str) or not self.secret.matches(attempt.strip()):
                await asyncio.sleep(self.failed_login_delay_s)
                log.warning("dashboard.login_refused", client=_client(request))
                return self._login_page(secrets.token_urlsafe(32),
                                        "Wrong secret. It is in secrets/dashboard/login.secret "
                                        "(`mas dashboard --url` prints it).", status=401)
        session = self.sessions.new()
        log.info("dashboard.login", client=_client(request))
        response = RedirectResponse("/", status_code=303)
        self._set_session(response, session)
        response.delete_cookie(LOGIN_COOKIE, path="/login")
        return response

    async def logout(self, request: Request, session: Session) -> Response:
        self.sessions.drop(session.id)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    # --- reading ----------------------------------------------------------------------

    async def index(self, request: Request, session: Session) -> Response:
        return HTMLResponse(_page("index.html").replace(
            "{{csrf}}", html.escape(session.csrf, quote=True)))

    async def snapshot(self, request: Request, session: Session) -> Response:
        return Response(self.feed.snapshot().model_dump_json(), media_type="application/json")

    async def events(self, request: Request, session: Session) -> Response:
        """Server-Sent Events: one ``snapshot`` event about every second while anything
        changes; the stream ends when the session does."""
        async def stream() -> AsyncIterator[str]:
            seen = -1
            yield "retry: 2000\n\n"
            while self.sessions.alive(session.id):
                seen = await self.feed.next(seen, timeout=15)
                data = self.feed.snapshot().model_dump_json()
                yield f"event: snapshot\ndata: {data}\n\n"
                await asyncio.sleep(SSE_EVERY_S)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"x-accel-buffering": "no"})

    async def logs(self, request: Request, session: Session) -> Response:
        agent = request.path_params["agent"]
        cursor = request.query_params.get("cursor") or None
        return await self._act(lambda: self.controls.logs(agent, 200, cursor))

    # --- controls -----------------------------------------------------------------------

    async def _body(self, request: Request, model: type[M]) -> M | Response:
        raw = await request.body()
        try:
            return model.model_validate_json(raw or b"{}")
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(map(str, first["loc"])) or "body"
            return _error(400, f"{where}: {first['msg']}")

    async def _act(self, call: Callable[[], Awaitable[Any]]) -> Response:
        try:
            result = await call()
        except ActionFailed as exc:
            return _error(409, str(exc))
        finally:
            self.feed.poke()
        if isinstance(result, BaseModel):
            return Response(result.model_dump_json(), media_type="application/json")
        return JSONResponse(result if isinstance(result, dict) else {"detail": result})

    async def decide(self, request: Request, session: Session) -> Response:
        decision = request.path_params["decision"]
        if decision not in ("approve", "deny"):
            return _error(404, "use /approve or /deny")
        form = await self._body(request, DecideForm)
        if isinstance(form, Response):
            return form
        verdict: Literal["approve", "deny"] = "approve" if decision == "approve" else "deny"
        log.info("dashboard.decide", approval=request.path_params["id"], decision=verdict)
        return await self._act(lambda: self.controls.decide(request.path_params["id"], verdict,
                                                            form))

    async def revoke(self, request: Request, session: Session) -> Response:
        form = await self._body(request, RevokeForm)
        if isinstance(form, Response):
            return form
        log.info("dashboard.revoke", kind=form.kind, target=form.target, lift=form.lift)
        return await self._act(lambda: self.controls.revoke(form))

    async def run(self, request: Request, session: Session) -> Response:
        form = await self._body(request, RunForm)
        if isinstance(form, Response):
            return form
        log.info("dashboard.run")
        return await self._act(lambda: self.controls.run(form))

    async def agent_action(self, request: Request, session: Session) -> Response:
        agent, action = request.path_params["agent"], request.path_params["action"]
        if action not in AGENT_ACTIONS:
            return _error(404, "use /start, /stop or /restart")
        verb: Action = action  # one of AGENT_ACTIONS, checked just above
        log.info("dashboard.agent", agent=agent, action=verb)
        return await self._act(lambda: self.controls.agent(agent, verb))


async def _form(request: Request) -> dict[str, str]:
    """An urlencoded form's fields (first value of each); the stdlib parser is enough for
    the two small forms here, so no multipart library is needed."""
    if not request.headers.get("content-type", "").startswith(
            "application/x-www-form-urlencoded"):
        return {}
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        return {}
    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True,
                      max_num_fields=8)
    return {key: values[0] for key, values in fields.items()}


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"

