"""What every agent's own tests (agents/*/tests) set up the same way: a clean environment
for the agent's settings, a token file, the agent serving on a real broker, and the events
it publishes collected as the orchestrator would see them.

Only tests import this module; it has no stand-ins, it starts the real service.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic_settings import BaseSettings

from agents.runtime.declare import Agent
from agents.runtime.service import AgentService
from broker.connection import BrokerClient, SignedMessage
from broker.secrets import SecretsLayout, load_identity

if TYPE_CHECKING:
    import pytest


def without_settings_env(monkeypatch: pytest.MonkeyPatch, settings: type[BaseSettings]) -> None:
    """Remove every environment variable ``settings`` reads (``MAS_HOME_URL``, ...), so a
    test sees only the settings it passes, whatever the developer's shell exports."""
    prefix = settings.model_config.get("env_prefix", "")
    for name in settings.model_fields:
        monkeypatch.delenv(f"{prefix}{name}".upper(), raising=False)


def write_token(path: Path, token: str) -> Path:
    """Write ``token`` the way users store one (a single line) and return the path."""
    path.write_text(token + "\n")
    return path


async def collect(client: BrokerClient, subject: str) -> list[SignedMessage]:
    """The list every verified message on ``subject`` is appended to, once the server has
    the subscription."""
    received: list[SignedMessage] = []

    async def on_message(msg: SignedMessage) -> None:
        received.append(msg)

    await client.subscribe(subject, on_message)
    await client.sync()
    return received


@asynccontextmanager
async def serving(agent: Agent, secrets: SecretsLayout, url: str, *,
                  settings: dict[str, str] | None = None) -> AsyncIterator[AgentService]:
    """``agent`` running on the broker at ``url`` with its own credentials and
    ``settings``, without registering (no orchestrator needed: tests call it with a
    token they mint); stopped when the block ends."""
    service = AgentService(agent, load_identity(secrets, agent.name), url, register=False,
                           settings=settings)
    await service.start()
    try:
        yield service
    finally:
        await service.stop()
