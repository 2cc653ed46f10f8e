"""Delivering one note over one channel: ntfy's JSON publish, or a generic JSON webhook.

ntfy: ``POST <server>/`` with ``{"topic", "message", "title", "priority": 1..5, "tags"}``
(ntfy's JSON form of publishing; unlike its header form it carries any UTF-8 title)
and an optional ``Authorization: Bearer <token>``; the answer is the stored message,
errors are ``{"code", "http", "error", "link"}``. Webhook: ``POST <url>`` with
``{"recipient", "title", "message", "priority", "tags", "source"}``; any 2xx is success.

The ntfy topic is a password on a shared server and the URLs may hold secrets, so
neither is logged or put in a result; errors name the channel, not the address.

httpx2 is imported by the calls that send, not at module load: an idle agent has sent
nothing, and the HTTP stack is about 1.3 MiB of its private memory.
"""

from __future__ import annotations

import functools
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from agents.notify.models import PRIORITY_LEVEL, Delivery, Note

if TYPE_CHECKING:
    import httpx2

MAX_TOKEN_BYTES = 4096
SOURCE = "mas.notify"


class TokenFileError(Exception):
    pass


@dataclass(frozen=True)
class Channel:
    kind: Literal["ntfy", "webhook"]
    url: str  # ntfy: the server; webhook: the endpoint
    topic: str | None = None
    token_file: Path | None = None


def read_token(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        token = path.read_bytes()[:MAX_TOKEN_BYTES].decode("ascii", errors="replace").strip()
    except OSError as exc:
        raise TokenFileError(f"cannot read the token file: {exc.strerror or type(exc).__name__}") \
            from None
    if not token or any(c.isspace() or not c.isprintable() for c in token):
        raise TokenFileError("the token file must hold one token on one line")
    return token


def request_for(channel: Channel, note: Note, recipient: str) -> tuple[str, dict[str, Any]]:
    """The URL and JSON body that deliver ``note`` over ``channel``."""
    if channel.kind == "ntfy":
        body: dict[str, Any] = {"topic": channel.topic, "message": note.message,
                                "priority": PRIORITY_LEVEL[note.priority]}
        if note.title:
            body["title"] = note.title
        if note.tags:
            body["tags"] = list(note.tags)
        return channel.url + "/", body
    return channel.url, {"recipient": recipient, "title": note.title, "message": note.message,
                         "priority": note.priority, "tags": list(note.tags), "source": SOURCE}


@functools.cache
def _tls() -> ssl.SSLContext:
    """One TLS context for every delivery: building one loads the CA bundle, about 20 ms
    of CPU, which a new client per message paid each time."""
    import httpx2

    return httpx2.create_ssl_context()


async def deliver(channel: Channel, note: Note, recipient: str, timeout_s: float) -> Delivery:
    import httpx2

    try:
        token = read_token(channel.token_file)
    except TokenFileError as exc:
        return Delivery(channel=channel.kind, ok=False, error=str(exc))
    url, body = request_for(channel, note, recipient)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        async with httpx2.AsyncClient(timeout=timeout_s, follow_redirects=False,
                                      verify=_tls()) as client:
            response = await client.post(url, json=body, headers=headers)
    except httpx2.TimeoutException:
        return Delivery(channel=channel.kind, ok=False, error=f"no answer within {timeout_s:g}s")
    except httpx2.HTTPError as exc:
        return Delivery(channel=channel.kind, ok=False,
                        error=f"cannot reach the {channel.kind} server ({type(exc).__name__})")
    return _result(channel, response)


def _result(channel: Channel, response: httpx2.Response) -> Delivery:
    status = response.status_code
    if not 200 <= status < 300:
        return Delivery(channel=channel.kind, ok=False, status=status,
                        error=_refusal(channel, response))
    message_id = None
    if channel.kind == "ntfy":
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if isinstance(answer, dict) and isinstance(answer.get("id"), str):
            message_id = answer["id"][:64]
    return Delivery(channel=channel.kind, ok=True, status=status, id=message_id)


def _refusal(channel: Channel, response: httpx2.Response) -> str:
    reason = f"the {channel.kind} server answered HTTP {response.status_code}"
    if channel.kind == "ntfy":
        try:
            answer = response.json()
        except ValueError:
            return reason
        if isinstance(answer, dict) and isinstance(answer.get("error"), str):
            reason += f": {answer['error'][:200]}"
    if response.status_code in (401, 403):
        reason += " (check the token file)"
    return reason
