"""The anomaly agent's thresholds and windows, from ``MAS_ANOMALY_*`` variables.

Every detector is deterministic: its windows run on the records' own timestamps, so a
recorded stream replays to the same alerts whatever the wall clock says.
"""

from __future__ import annotations

from datetime import time
from zoneinfo import ZoneInfo

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from agents.runtime.settings import TimeZoneName

PLATFORM_IDENTITIES = frozenset({"orchestrator", "control", "operator"})


class AnomalySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MAS_ANOMALY_", extra="ignore", frozen=True)

    # refusals, denied token requests, broker violations and failed logins per identity
    burst_window_s: float = Field(default=60.0, gt=0)
    burst_threshold: int = Field(default=5, ge=2)

    # token requests inside [quiet_start, quiet_end) local time (may wrap midnight)
    timezone: TimeZoneName = "UTC"
    quiet_start: time = time(0, 0)
    quiet_end: time = time(6, 0)
    quiet_cooldown_s: float = Field(default=3600.0, gt=0)

    # comma-separated; when set, anything else is unknown (the policy's identities);
    # when empty, identities seen during the first `learning_s` of records are the baseline
    known_identities: str = ""
    learning_s: float = Field(default=3600.0, ge=0)
    identity_cooldown_s: float = Field(default=3600.0, gt=0)

    # share of `error` outcomes among command results, window vs. baseline
    error_window_s: float = Field(default=600.0, gt=0)
    error_min_samples: int = Field(default=10, ge=1)
    error_min_errors: int = Field(default=5, ge=1)
    error_factor: float = Field(default=3.0, ge=1)
    error_min_increase: float = Field(default=0.15, ge=0, le=1)
    error_prior_rate: float = Field(default=0.02, ge=0, le=1)
    error_prior_weight: float = Field(default=50.0, ge=0)

    # distinct sensitive-action requests (token_request / approval_requested) per window
    sensitive_window_s: float = Field(default=3600.0, gt=0)
    sensitive_min_count: int = Field(default=6, ge=1)
    sensitive_factor: float = Field(default=3.0, ge=1)
    sensitive_prior_per_hour: float = Field(default=0.5, ge=0)
    sensitive_prior_hours: float = Field(default=6.0, ge=0)

    recent_max: int = Field(default=200, ge=1, le=10_000)

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def known(self) -> frozenset[str]:
        """The configured identity list (empty: learn the baseline instead)."""
        return frozenset(n.strip() for n in self.known_identities.split(",") if n.strip())
