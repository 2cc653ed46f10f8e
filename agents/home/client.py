"""A small Home Assistant REST client: the three calls the home agent makes.

Every failure becomes a ``HomeAssistantError`` with a code and a message that says
what to do; the token is read from its file for each call (so a rotated token is
picked up) and never logged. httpx2 is imported by the calls themselves, not at module
load: an idle agent has made none, and the HTTP stack is about 1.3 MiB of private memory.
"""

from __future__ import annotations

import functools
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import JsonValue, ValidationError

from agents.home.models import EntityState, ErrorCode, HomeError
from agents.home.settings import HomeSettings

if TYPE_CHECKING:
    import httpx2

SECRET_ATTRIBUTES = frozenset({"access_token"})  # cameras publish a URL token here
MAX_TOKEN_BYTES = 4096



@functools.cache
def _tls() -> ssl.SSLContext:
    """One TLS context for every request: building one loads the CA bundle, most of this
    agent's CPU when it was made per request (measured by the reliability load test)."""
    import httpx2

    return httpx2.create_ssl_context()

class HomeAssistantError(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message

    def as_model(self) -> HomeError:
        return HomeError(code=self.code, message=self.message)


def read_token(path: Path | None) -> str:
    if path is None:
        raise HomeAssistantError(
            "not_configured", "no Home Assistant token: set MAS_HOME_TOKEN_FILE to a file "
            "holding a long-lived access token (Home Assistant: your profile, Security tab)")
    try:
        raw = path.read_bytes()[:MAX_TOKEN_BYTES]
    except OSError as exc:
        raise HomeAssistantError(
            "not_configured", f"cannot read MAS_HOME_TOKEN_FILE ({path}): "
            f"{exc.strerror or type(exc).__name__}") from None
    token = raw.decode("ascii", errors="replace").strip()
    if not token or any(c.isspace() or not c.isprintable() for c in token):
        raise HomeAssistantError(
            "not_configured", f"MAS_HOME_TOKEN_FILE ({path}) must hold one token on one line")
    return token


def scrub(state: dict[str, Any]) -> dict[str, Any]:
    """Drop credentials Home Assistant puts in attributes (camera access tokens, also
    embedded in ``entity_picture``) before a state leaves the agent."""
    attributes = state.get("attributes")
    if not isinstance(attributes, dict):
        return state
    clean: dict[str, Any] = {k: v for k, v in attributes.items() if k not in SECRET_ATTRIBUTES}
    picture = clean.get("entity_picture")
    if isinstance(picture, str) and "token=" in picture:
        clean["entity_picture"] = urlunsplit(urlsplit(picture)._replace(query=""))
    return {**state, "attributes": clean}


class HomeAssistant:
    def __init__(self, settings: HomeSettings) -> None:
        self.settings = settings

    async def states(self) -> list[EntityState]:
        body = await self._request("GET", "/api/states")
        return self._states(body)

    async def state(self, entity_id: str) -> EntityState:
        body = await self._request("GET", f"/api/states/{entity_id}", entity_id=entity_id)
        if not isinstance(body, dict):
            raise HomeAssistantError("bad_response", "Home Assistant did not answer with a state")
        return self._states([body])[0]

    async def call_service(self, domain: str, service: str,
                           data: dict[str, JsonValue]) -> list[EntityState]:
        """``POST /api/services/<domain>/<service>``; the answer is the states it changed."""
        body = await self._request("POST", f"/api/services/{domain}/{service}", json=data,
                                   service=f"{domain}.{service}")
        return self._states(body)

    async def _request(self, method: str, path: str, *, json: Any = None,
                       entity_id: str | None = None, service: str | None = None) -> Any:
        import httpx2

        token = read_token(self.settings.token_file)
        url = self.settings.url
        try:
            async with httpx2.AsyncClient(
                    base_url=url, timeout=self.settings.timeout_s,
                    follow_redirects=False, verify=_tls()) as client:
                response = await client.request(
                    method, path, json=json,
                    headers={"Authorization": f"Bearer {token}", "Accept": "application/json"})
        except httpx2.TimeoutException:
            raise HomeAssistantError(
                "timeout", f"Home Assistant at {url} did not answer within "
                f"{self.settings.timeout_s:g}s (MAS_HOME_TIMEOUT_S)") from None
        except httpx2.HTTPError as exc:
            raise HomeAssistantError(
                "unreachable", f"cannot reach Home Assistant at {url} (MAS_HOME_URL): "
                f"{type(exc).__name__}") from None
        return _answer(response, url, entity_id=entity_id, service=service)

    @staticmethod
    def _states(body: Any) -> list[EntityState]:
        if not isinstance(body, list):
            raise HomeAssistantError("bad_response", "Home Assistant did not answer with states")
        try:
            return [EntityState.model_validate(scrub(item) if isinstance(item, dict) else item)
                    for item in body]
        except ValidationError as exc:
            raise HomeAssistantError(
                "bad_response", f"Home Assistant sent a state this agent cannot read "
                f"({exc.error_count()} problems)") from None


def _answer(response: httpx2.Response, url: str, *, entity_id: str | None,
            service: str | None) -> Any:
    status = response.status_code
    if status == 401:
        raise HomeAssistantError(
            "unauthorized", "Home Assistant refused the token (401): create a new long-lived "
            "access token in your Home Assistant profile (Security tab) and write it to the "
            "file MAS_HOME_TOKEN_FILE names")
    if status == 404:
        what = f"no entity {entity_id}" if entity_id else f"{url} has no such API"
        raise HomeAssistantError("not_found", f"Home Assistant: {what} (404)")
    if status == 400:
        what = f"the service {service} does not exist or refused its data" if service \
            else "the request was refused"
        raise HomeAssistantError("bad_request", f"Home Assistant: {what} (400)")
    if status >= 300:
        raise HomeAssistantError("bad_response", f"Home Assistant answered HTTP {status}")
    try:
        return response.json()
    except ValueError:
        raise HomeAssistantError("bad_response", "Home Assistant's answer is not JSON") from None
