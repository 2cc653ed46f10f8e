"""The health agent's settings: ``MAS_HEALTH_*`` environment variables, overridden by
the runtime's per-agent settings (``ctx.settings``, e.g. in tests). Every default stays
on this machine: the export folder is a local path, and the agent opens no sockets."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1 << 20


class HealthSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MAS_HEALTH_", extra="forbid", frozen=True)

    # where exports appear (mounted read-only): export.xml, the Health app's export.zip,
    # Health Auto Export JSON files; searched two levels deep
    export_dir: Path = Path("data/health")
    poll_seconds: float = Field(default=300.0, ge=5, le=86400)
    retention_days: int = Field(default=90, ge=8, le=3660)  # days of aggregates kept in KV
    max_export_mb: int = Field(default=8192, ge=1)  # uncompressed export.xml
    max_json_mb: int = Field(default=32, ge=1)  # JSON is read whole (and takes ~8x in memory)
    # an action parses new files up to this size before answering; bigger ones wait for
    # the poll, so a request never waits for a multi-gigabyte parse
    inline_parse_mb: int = Field(default=64, ge=0)

    day_start_hour: int = Field(default=7, ge=0, le=23)  # the waking window, local time
    day_end_hour: int = Field(default=22, ge=1, le=24)
    active_steps_per_minute: float = Field(default=20.0, gt=0)
    sitting_threshold_minutes: int = Field(default=60, ge=10, le=600)
    reminder_repeat_minutes: int = Field(default=60, ge=5)  # break_due again in one streak
    stale_after_minutes: int = Field(default=60, ge=1)  # older data cannot say "now"
    hrv_baseline_days: int = Field(default=7, ge=1, le=60)
    hrv_decline_pct: float = Field(default=10.0, gt=0, lt=100)

    @model_validator(mode="after")
    def _window(self) -> Self:
        if self.day_start_hour >= self.day_end_hour:
            raise ValueError("day_start_hour must be before day_end_hour")
        return self

    @classmethod
    def load(cls, overrides: dict[str, str] | None = None) -> HealthSettings:
        """The environment, with ``overrides`` (field names) taking precedence."""
        values: dict[str, Any] = dict(overrides or {})
        return cls(**values)

    @property
    def waking(self) -> tuple[int, int]:
        return self.day_start_hour * 60, self.day_end_hour * 60
