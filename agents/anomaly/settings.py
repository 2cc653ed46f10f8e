"""The anomaly agent's thresholds and windows, from ``MAS_ANOMALY_*`` variables.

Every detector is deterministic: its windows run on the records' own timestamps, so a
recorded stream replays to the same alerts whatever the wall clock says.
"""

from __future__ import annotations

from datetime import time
from typing import Annotated
from zoneinfo import ZoneInfo

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from agents.runtime.settings import TimeZoneName

PLATFORM_IDENTITIES = frozenset({"orchestrator", "control", "operator"})

# What each threshold is, with the bounds that make it meaningful.
Seconds = Annotated[float, Field(gt=0)]  # a window or a cooldown
Count = Annotated[int, Field(ge=1)]
Factor = Annotated[float, Field(ge=1)]  # times the baseline
Share = Annotated[float, Field(ge=0, le=1)]  # of all results, 0 to 1
NotNegative = Annotated[float, Field(ge=0)]


class AnomalySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MAS_ANOMALY_", extra="ignore", frozen=True)

    # refusals, denied token requests, broker violations and failed logins per identity
    burst_window_s: Seconds = 60.0
    burst_threshold: int = Field(default=5, ge=2)

    # token requests inside [quiet_start, quiet_end) local time (may wrap midnight)
    timezone: TimeZoneName = "UTC"
    quiet_start: time = time(0, 0)
    quiet_end: time = time(6, 0)
    quiet_cooldown_s: Seconds = 3600.0

    # comma-separated; when set, anything else is unknown (the policy's identities);
    # when empty, identities seen during the first `learning_s` of records are the baseline
    known_identities: str = ""
    learning_s: NotNegative = 3600.0
    identity_cooldown_s: Seconds = 3600.0

    # share of `error` outcomes among command results, window vs. baseline
    error_window_s: Seconds = 600.0
    error_min_samples: Count = 10
    error_min_errors: Count = 5
    error_factor: Factor = 3.0
    error_min_increase: Share = 0.15
    error_prior_rate: Share = 0.02
    error_prior_weight: NotNegative = 50.0

    # distinct sensitive-action requests (token_request / approval_requested) per window
    sensitive_window_s: Seconds = 3600.0
    sensitive_min_count: Count = 6
    sensitive_factor: Factor = 3.0
    sensitive_prior_per_hour: NotNegative = 0.5
    sensitive_prior_hours: NotNegative = 6.0

    recent_max: int = Field(default=200, ge=1, le=10_000)

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def known(self) -> frozenset[str]:
        """The configured identity list (empty: learn the baseline instead)."""
        return frozenset(n.strip() for n in self.known_identities.split(",") if n.strip())
