"""The notify agent's settings: ``MAS_NOTIFY_*`` environment variables.

Nothing is configured by default, so nothing is sent anywhere until the operator names
a server; a notification then fails with "no delivery channel configured".
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# ntfy's own rule for topic names
Topic = Annotated[str, Field(pattern=r"^[-_A-Za-z0-9]{1,64}$")]
ContactName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,63}$")]


def http_url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError("must be an http:// or https:// URL")
    return value.rstrip("/")


class Contact(BaseModel):
    """Someone other than the owner. ``url`` is an ntfy topic URL (``<server>/<topic>``)
    for kind ``ntfy``, the endpoint for kind ``webhook``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["ntfy", "webhook"]
    url: str
    token_file: Path | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return http_url(value)

    @model_validator(mode="after")
    def _ntfy_topic_url(self) -> Contact:
        if self.kind == "ntfy":
            server, _, topic = self.url.rpartition("/")
            if "://" not in server or not topic.replace("-", "").replace("_", "").isalnum():
                raise ValueError("an ntfy contact's url is <server>/<topic>")
        return self


class NotifySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MAS_NOTIFY_", extra="ignore", frozen=True)

    ntfy_url: str | None = None  # the ntfy server, e.g. http://ntfy.internal
    topic: Topic | None = None  # the owner's topic: on a shared server it is a password
    token_file: Path | None = None  # ntfy access token (tk_...), if the server wants one
    webhook_url: str | None = None  # receives the owner's notifications as JSON
    webhook_token_file: Path | None = None  # sent as a bearer token to the webhook
    contacts: dict[ContactName, Contact] = Field(default_factory=dict)  # JSON in the env
    timeout_s: float = Field(default=10.0, gt=0, le=120)

    @field_validator("ntfy_url", "webhook_url")
    @classmethod
    def _urls(cls, value: str | None) -> str | None:
        return None if value is None else http_url(value)

    @field_validator("contacts", mode="before")
    @classmethod
    def _contacts_json(cls, value: Any) -> Any:
        return json.loads(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _topic_with_server(self) -> NotifySettings:
        if self.ntfy_url is not None and self.topic is None:
            raise ValueError("MAS_NOTIFY_NTFY_URL is set but MAS_NOTIFY_TOPIC is not")
        return self

    @classmethod
    def load(cls, overrides: Mapping[str, str] | None = None) -> NotifySettings:
        """The environment, with ``overrides`` (field names) taking precedence."""
        values: dict[str, Any] = dict(overrides or {})
        return cls(**values)
