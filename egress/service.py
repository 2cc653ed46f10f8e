"""`mas egress run`: the proxy as a long-running service with its settings and health.

Settings come from the environment (``MAS_EGRESS_*``, ``MAS_READY_FILE``) as compose
passes them; the allowlist comes from the policy. The ready file is touched once the
proxy listens and then every few seconds, so ``mas agent probe`` (the healthcheck) sees a
live proxy, not merely a started one.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import tempfile
from pathlib import Path
from typing import Annotated

import structlog
from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from broker.policy import Policy
from egress.clients import ClientDirectory
from egress.proxy import EgressProxy
from egress.rules import EgressRules

log = structlog.get_logger("mas.egress")
READY_EVERY_S = 5.0


class EgressSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MAS_EGRESS_", extra="ignore", frozen=True)

    listen: Annotated[str, Field(pattern=r"^[0-9A-Za-z.\-:\[\]]+:[0-9]{1,5}$")] = (
        "127.0.0.1:3128")
    refresh_s: Annotated[float, Field(gt=0, le=300)] = 10.0
    connect_timeout_s: Annotated[float, Field(gt=0, le=120)] = 10.0
    idle_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 300.0
    max_connections: Annotated[int, Field(ge=1, le=10_000)] = 256
    ready_file: Path | None = Field(
        default=None, validation_alias=AliasChoices("MAS_READY_FILE", "ready_file"))

    @property
    def host_port(self) -> tuple[str, int]:
        host, port = self.listen.rsplit(":", 1)
        return host.strip("[]"), int(port)

    @property
    def ready_path(self) -> Path:
        return self.ready_file or Path(tempfile.gettempdir()) / "mas-egress.ready"


async def touch_ready(path: Path, every_s: float = READY_EVERY_S) -> None:
    """Keep ``path`` fresh while the caller serves (healthchecks read its age)."""
    while True:
        await asyncio.to_thread(path.touch)
        await asyncio.sleep(every_s)


async def run_egress(policy: Policy, settings: EgressSettings,
                     stop: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM or SIGINT (or until ``stop`` is set, when given)."""
    rules = EgressRules.from_policy(policy)
    clients = ClientDirectory(rules.agents)
    await clients.refresh()
    proxy = EgressProxy(rules, clients, connect_timeout_s=settings.connect_timeout_s,
                        idle_timeout_s=settings.idle_timeout_s,
                        max_connections=settings.max_connections)
    host, port = settings.host_port
    await proxy.start(host, port)
    log.info("egress.ready", listen=settings.listen, agents=rules.agents)
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.create_task(clients.keep_fresh(settings.refresh_s)),
             asyncio.create_task(touch_ready(settings.ready_path))]
    try:
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await proxy.close()
        with contextlib.suppress(OSError):
            settings.ready_path.unlink()
