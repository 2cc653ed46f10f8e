"""An agent process's settings, from the environment (``MAS_*``), as containers pass them."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _known_zone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {value!r}") from exc
    return value


# An IANA time zone name (Europe/Berlin), checked when settings load; for agents' settings.
TimeZoneName = Annotated[str, AfterValidator(_known_zone)]


class AgentSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MAS_", extra="ignore", frozen=True)

    identity: str = Field(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_]*$")
    broker_url: str | None = None  # default: the policy's listen address
    secrets_dir: Path | None = None  # default: the project's secrets/
    ready_file: Path | None = None  # containers set /tmp/mas-ready (a tmpfs)
    heartbeat_s: float = Field(default=10.0, gt=0, le=300)
    register_timeout_s: float = Field(default=60.0, gt=0)

    @property
    def ready_path(self) -> Path:
        """Where readiness is signalled; one file per agent when several share a machine."""
        return self.ready_file or Path(tempfile.gettempdir()) / f"mas-{self.identity}.ready"
