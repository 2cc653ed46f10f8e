"""The backup agent's settings: ``MAS_BACKUP_*`` environment variables. Both sources are
files on this machine (mounted read-only into the container); nothing is fetched."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class BackupSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MAS_BACKUP_", extra="ignore", frozen=True)

    restic_json: Path | None = None  # `restic snapshots --json` output, written by cron
    watch_dir: Path | None = None  # a folder backups are written into
    max_age_h: float = Field(default=26.0, gt=0)  # a daily backup, with two hours' slack
    interval_min: float = Field(default=15.0, ge=0.5, le=24 * 60)
    shrink_ratio: float = Field(default=0.5, ge=0, le=1)  # 0 turns the check off
    unchanged_days: float | None = Field(default=None, gt=0)  # off unless set

    @classmethod
    def load(cls, overrides: Mapping[str, str] | None = None) -> BackupSettings:
        """The environment, with ``overrides`` (field names) taking precedence."""
        values: dict[str, Any] = dict(overrides or {})
        return cls(**values)
