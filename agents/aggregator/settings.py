"""The aggregator's settings, from ``MAS_AGGREGATOR_*`` variables."""

from __future__ import annotations

from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class AggregatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MAS_AGGREGATOR_", extra="ignore",
                                      frozen=True)

    timezone: str = "UTC"  # where a day starts and ends
    keep_days: int = Field(default=14, ge=1, le=366)
    max_notable: int = Field(default=50, ge=0, le=1000)  # summarised events kept per day
    max_alerts: int = Field(default=100, ge=0, le=1000)  # alerts kept per day
    max_kinds: int = Field(default=32, ge=1, le=256)  # distinct kinds counted per source
    alert_senders: str = "anomaly"  # comma-separated: who may raise alerts

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def alerters(self) -> frozenset[str]:
        return frozenset(n.strip() for n in self.alert_senders.split(",") if n.strip())
