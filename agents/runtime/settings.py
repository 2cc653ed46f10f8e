"""An agent process's settings, from the environment (``MAS_*``), as containers pass them."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class AgentSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MAS_", extra="ignore", frozen=True)

    identity: str = Field(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_]*$")
    broker_url: str | None = None  # default: the policy's listen address
    secrets_dir: Path | None = None  # default: the project's secrets/
    ready_file: Path = Path("/tmp/mas-ready")  # noqa: S108 (a tmpfs in containers)
    heartbeat_s: float = Field(default=10.0, gt=0, le=300)
    register_timeout_s: float = Field(default=60.0, gt=0)
