"""The home agent's settings: ``MAS_HOME_*`` environment variables.

The defaults never leave this machine's network: ``homeassistant.local`` is the one host
the scoped tier's egress proxy lets through, and without a token file nothing is sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

EntityId = Annotated[str, Field(pattern=r"^[a-z0-9_]+\.[a-z0-9_]+$", max_length=255)]


class HomeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MAS_HOME_", extra="ignore", frozen=True)

    url: str = "http://homeassistant.local:8123"
    token_file: Path | None = None  # a long-lived access token, one line
    timeout_s: float = Field(default=10.0, gt=0, le=120)
    # states beyond this many bytes of JSON are left out: a reply is one NATS message (1 MiB)
    max_reply_bytes: int = Field(default=512 * 1024, ge=1024, le=900 * 1024)
    break_light: EntityId | None = None  # a light.* to flash when a break is due
    break_cooldown_s: float = Field(default=1800.0, ge=0)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("break_light")
    @classmethod
    def _a_light(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("light."):
            raise ValueError("must be a light.* entity")
        return value

    @classmethod
    def load(cls, overrides: Mapping[str, str] | None = None) -> HomeSettings:
        """The environment, with ``overrides`` (field names, e.g. from the runtime's
        settings) taking precedence."""
        values: dict[str, Any] = dict(overrides or {})
        return cls(**values)
