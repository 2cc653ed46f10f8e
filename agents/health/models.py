"""The health agent's action inputs and outputs, and the event it emits."""

from __future__ import annotations

from datetime import date, datetime

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field


class SummaryIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    day: date | None = Field(default=None, description="Local date; default: the newest day")


class DaySummary(BaseModel):
    day: date | None
    has_data: bool
    steps: int = 0  # iPhone and Apple Watch deduplicated (see the README)
    sedentary_minutes: int = 0
    active_minutes: int = 0
    workout_minutes: int = 0
    hrv_mean_ms: float | None = None
    hrv_samples: int = 0
    hrv_trend_pct: float | None = None  # against the days before
    exercise_minutes: int | None = None  # from the Activity rings, when the export has them
    stand_hours: int | None = None
    covered_until: datetime | None = None  # the data for the day is complete until then
    sources: list[str] = Field(default_factory=list)  # device classes with steps that day


class CheckIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    as_of: AwareDatetime | None = Field(default=None, description="Default: now")


class CheckOut(BaseModel):
    break_due: bool
    reason: str
    sitting_minutes: int | None = None
    sitting_since: datetime | None = None
    steps_today: int = 0
    hrv_trend_pct: float | None = None
    confidence: float = 0.0
    data_until: datetime | None = None
    event_emitted: bool = False
    pending_exports: list[str] = Field(default_factory=list)  # waiting for the next poll


class BreakDue(BaseModel):
    """``mas.event.health.break_due``: enough for a light or a digest, no raw values."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sitting_minutes: int
    since: datetime
    hrv_declining: bool
    confidence: float
