"""A loopback stand-in for Home Assistant 2024.3's REST API, in its exact wire formats:
state objects as ``State.as_dict()`` gives them, ``401: Unauthorized`` as plain text
(aiohttp's ``HTTPUnauthorized``), ``{"message": "Entity not found."}`` for an unknown
entity, ``400: Bad Request`` for an unknown service, and the list of changed states as
the answer to a service call."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests.loopback import serve_http

TOKEN = "eyJhbGciOiJIUzI1NiJ9.fake-long-lived-token.sig"
CAMERA_TOKEN = "c4m3r4-4cc355-t0k3n"
USER_ID = "8f1c6f0e4c3b4d0e9d2a7b5c1e3f9a60"

# service -> the state it leaves the entity in
SERVICES = {
    ("lock", "lock"): "locked", ("lock", "unlock"): "unlocked",
    ("light", "turn_on"): "on", ("light", "turn_off"): "off",
    ("cover", "open_cover"): "open", ("cover", "close_cover"): "closed",
    ("alarm_control_panel", "alarm_arm_away"): "armed_away",
    ("alarm_control_panel", "alarm_disarm"): "disarmed",
}


def _ts() -> str:
    return datetime.now(UTC).isoformat()


def _context(user_id: str | None = None) -> dict[str, Any]:
    return {"id": uuid.uuid4().hex[:26].upper(), "parent_id": None, "user_id": user_id}


def initial_states() -> dict[str, dict[str, Any]]:
    changed = "2024-03-10T07:12:45.031536+00:00"
    updated = "2024-03-10T07:12:45.031536+00:00"

    def state(entity_id: str, value: str, **attributes: Any) -> dict[str, Any]:
        return {"entity_id": entity_id, "state": value, "attributes": attributes,
                "last_changed": changed, "last_updated": updated,
                "context": {"id": "01HRJ8ZK4C6V5Q8W6T3N2M1P0A", "parent_id": None,
                            "user_id": None}}

    return {s["entity_id"]: s for s in [
        state("light.kitchen", "off", supported_color_modes=["brightness"], color_mode=None,
              brightness=None, friendly_name="Kitchen", supported_features=40),
        state("light.desk", "on", supported_color_modes=["brightness"],
              color_mode="brightness", brightness=180, friendly_name="Desk lamp",
              supported_features=40),
        state("lock.front_door", "locked", friendly_name="Front door", supported_features=0),
        state("cover.garage_door", "closed", device_class="garage",
              friendly_name="Garage door", supported_features=3),
        state("alarm_control_panel.home", "disarmed", code_format=None, changed_by=None,
              code_arm_required=False, friendly_name="Home alarm", supported_features=63),
        state("sensor.outside_temperature", "7.4", state_class="measurement",
              unit_of_measurement="°C", device_class="temperature",
              friendly_name="Outside temperature"),
        state("camera.porch", "idle", access_token=CAMERA_TOKEN,
              entity_picture=f"/api/camera_proxy/camera.porch?token={CAMERA_TOKEN}",
              friendly_name="Porch", supported_features=2),
    ]}


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeHomeAssistant:
    url: str = ""
    token: str = TOKEN
    delay_s: float = 0.0
    states: dict[str, dict[str, Any]] = field(default_factory=initial_states)
    requests: list[Seen] = field(default_factory=list)

    def handle(self, method: str, path: str, headers: dict[str, str],
               body: bytes) -> tuple[int, str, bytes]:
        self.requests.append(Seen(method, path, headers, body))
        if self.delay_s:
            time.sleep(self.delay_s)
        if headers.get("authorization") != f"Bearer {self.token}":
            return 401, "text/plain; charset=utf-8", b"401: Unauthorized"
        if method == "GET" and path == "/api/states":
            return _json(list(self.states.values()))
        if method == "GET" and path.startswith("/api/states/"):
            state = self.states.get(path.removeprefix("/api/states/"))
            if state is None:
                return _json({"message": "Entity not found."}, 404)
            return _json(state)
        if method == "POST" and path.startswith("/api/services/"):
            return self._call(path.removeprefix("/api/services/"), body)
        return 404, "text/plain; charset=utf-8", b"404: Not Found"

    def _call(self, rest: str, body: bytes) -> tuple[int, str, bytes]:
        domain, _, service = rest.partition("/")
        try:
            data = json.loads(body) if body else {}
        except ValueError:
            return _json({"message": "Data should be valid JSON."}, 400)
        target = SERVICES.get((domain, service))
        if target is None:
            return 400, "text/plain; charset=utf-8", b"400: Bad Request"
        ids = data.get("entity_id", [])
        changed = []
        for entity_id in [ids] if isinstance(ids, str) else ids:
            state = self.states.get(entity_id)
            if state is None or state["state"] == target:
                continue
            now = _ts()
            state.update(state=target, last_changed=now, last_updated=now,
                         context=_context(USER_ID))
            changed.append(state)
        return _json(changed)


def _json(body: Any, status: int = 200) -> tuple[int, str, bytes]:
    # compact UTF-8, as Home Assistant's orjson writes it
    return status, "application/json", \
        json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


@contextmanager
def serve(fake: FakeHomeAssistant) -> Iterator[FakeHomeAssistant]:
    class Handler(BaseHTTPRequestHandler):
        def _any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, ctype, payload = fake.handle(self.command, self.path, headers, body)
            try:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (the timeout test)

        do_GET = do_POST = _any

        def log_message(self, format: str, *args: Any) -> None:
            pass

    with serve_http(Handler) as url:
        fake.url = url
        yield fake
