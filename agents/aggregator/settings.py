"""The aggregator's settings, from ``MAS_AGGREGATOR_*`` variables."""

from __future__ import annotations

from zoneinfo import ZoneInfo

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from agents.runtime.settings import TimeZoneName


class AggregatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MAS_AGGREGATOR_", extra="ignore",
                                      frozen=True)

    timezone: TimeZoneName = "UTC"  # where a day starts and ends
    keep_days: int = Field(default=14, ge=1, le=366)
    max_notable: int = Field(default=50, ge=0, le=1000)  # summarised events kept per day
    max_alerts: int = Field(default=100, ge=0, le=1000)  # alerts kept per day
    max_kinds: int = Field(default=32, ge=1, le=256)  # distinct kinds counted per source
    alert_senders: str = "anomaly"  # comma-separated: who may raise alerts

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def alerters(self) -> frozenset[str]:
        return frozenset(n.strip() for n in self.alert_senders.split(",") if n.strip())
