"""Loopback receivers: an ntfy server speaking ntfy's JSON publishing API, and a webhook."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any, Protocol, TypeVar

from tests.loopback import serve_http

NTFY_TOKEN = "tk_AgQdq7mVBoFD37zQVN29RhuMzNIz2"


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Receiver(Protocol):
    url: str
    received: list[Received]

    def answer(self, request: Received) -> tuple[int, bytes]: ...


def _error(code: int, http: int, error: str) -> tuple[int, bytes]:
    return http, json.dumps({"code": code, "http": http, "error": error}).encode()


@dataclass
class FakeNtfy:
    """ntfy's ``POST /`` with a JSON message; ``token`` set means access control is on."""

    token: str | None = None
    delay_s: float = 0.0
    url: str = ""
    received: list[Received] = field(default_factory=list)

    def answer(self, request: Received) -> tuple[int, bytes]:
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.token is not None:
            auth = request.headers.get("authorization")
            if auth is None:
                return _error(40301, 403, "forbidden")
            if auth != f"Bearer {self.token}":
                return _error(40101, 401, "unauthorized")
        if request.method not in ("POST", "PUT") or request.path != "/":
            return _error(40401, 404, "page not found")
        try:
            body = request.json()
        except ValueError:
            return _error(40017, 400, "invalid request: request body must be message JSON")
        topic = body.get("topic") if isinstance(body, dict) else None
        if not isinstance(topic, str) or not topic:
            return _error(40009, 400, "invalid request: topic invalid")
        priority = body.get("priority", 3)
        if not isinstance(priority, int) or not 1 <= priority <= 5:
            return _error(40007, 400, "invalid request: priority invalid")
        now = int(time.time())
        message = {"id": secrets.token_urlsafe(9)[:12], "time": now, "expires": now + 43200,
                   "event": "message", "topic": topic, "message": body.get("message", ""),
                   "priority": priority}
        for key in ("title", "tags"):
            if key in body:
                message[key] = body[key]
        return 200, json.dumps(message).encode()


@dataclass
class FakeWebhook:
    status: int = 204
    url: str = ""
    received: list[Received] = field(default_factory=list)

    def answer(self, request: Received) -> tuple[int, bytes]:
        return self.status, b""


R = TypeVar("R", bound=Receiver)


@contextmanager
def serve(receiver: R) -> Iterator[R]:
    class Handler(BaseHTTPRequestHandler):
        def _any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            request = Received(self.command, self.path,
                               {k.lower(): v for k, v in self.headers.items()},
                               self.rfile.read(length) if length else b"")
            receiver.received.append(request)
            status, payload = receiver.answer(request)
            try:
                self.send_response(status)
                if payload:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass

        do_GET = do_POST = do_PUT = _any

        def log_message(self, format: str, *args: Any) -> None:
            pass

    with serve_http(Handler) as url:
        receiver.url = url
        yield receiver
