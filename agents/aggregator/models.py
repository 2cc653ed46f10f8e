"""What the aggregator stores per day and what ``daily_digest`` answers.

Only what an event itself says in one line is kept (its summary and severity), never
the values it carries: a health event's numbers are counted, not stored.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

Counts = dict[str, dict[str, int]]  # source -> kind -> events


class Item(BaseModel):
    """One notable event or alert."""

    model_config = ConfigDict(frozen=True)

    at: datetime  # when it arrived, in the configured time zone
    source: str  # the publishing agent, or "alert"
    kind: str  # the event topic or the alert kind
    sender: str
    summary: Annotated[str, Field(max_length=200)]
    severity: str | None = None


class DayLog(BaseModel):
    """The stored state of one day (key ``digest.<YYYY-MM-DD>``)."""

    day: date
    counts: Counts = Field(default_factory=dict)
    alert_severity: dict[str, int] = Field(default_factory=dict)
    first_at: datetime | None = None
    last_at: datetime | None = None
    notable: list[Item] = Field(default_factory=list)
    alerts: list[Item] = Field(default_factory=list)
    omitted_notable: int = 0
    omitted_alerts: int = 0


class DayIndex(BaseModel):
    """Which days are stored (key ``digest-days``), so pruning needs no key listing."""

    days: list[date] = Field(default_factory=list)


class DigestIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    day: date | None = None  # default: today in the configured time zone


class Digest(BaseModel):
    day: date
    timezone: str
    stored: bool  # False: nothing arrived that day, or it is older than the kept days
    summary: str
    total: int
    by_source: dict[str, int]
    counts: Counts
    alerts_by_severity: dict[str, int]
    notable: list[Item]
    alerts: list[Item]
    omitted_notable: int  # beyond the per-day cap: counted, not listed
    omitted_alerts: int
    first_at: datetime | None
    last_at: datetime | None
