"""What the health agent keeps in its KV bucket (``agent_health``).

``day.YYYY-MM-DD``   one day's aggregates (``DayData``), kept for ``retention_days``
``export.<hash>``    a file already processed (``ExportMark``): the next poll skips it
``meta``             until when the newest export is complete, and its UTC offset
``break.last``       the last break_due event, so one sitting streak is not repeated

Merging is idempotent: the same minute of the same source seen in two files (a new full
export, or a JSON sync overlapping an XML export) is kept once (the larger value), so
re-reading data never double counts it.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict

from agents.health.harvest import DAY_MINUTES, DayAcc, Moment, day_date, day_number

META = "meta"
BREAK = "break.last"
DAY_PREFIX = "day."
EXPORT_PREFIX = "export."


def day_key(day: date) -> str:
    return f"{DAY_PREFIX}{day.isoformat()}"


class DayData(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    day: date
    steps: dict[str, dict[int, float]] = {}  # source -> minute of day -> steps
    hrv: dict[int, float] = {}  # minute of day -> SDNN ms
    workouts: list[tuple[int, int]] = []  # [start, end) minutes of day
    exercise_minutes: int | None = None
    stand_hours: int | None = None
    until: int = 0  # minutes of this day the data is complete for (1440: all of it)
    offset: int = 0  # UTC offset (minutes) of the data

    @property
    def number(self) -> int:
        return day_number(self.day)

    @classmethod
    def from_acc(cls, n: int, acc: DayAcc, coverage: Moment | None) -> DayData:
        if coverage is None or n < coverage.day:
            until = DAY_MINUTES
        else:
            until = coverage.minute % DAY_MINUTES if n == coverage.day else 0
        return cls(
            day=day_date(n),
            steps={src: {m: round(v, 4) for m, v in minutes.items()}
                   for src, minutes in acc.steps.items()},
            hrv={m: round(v, 3) for m, v in acc.hrv.items()},
            workouts=sorted(acc.workouts), exercise_minutes=acc.exercise_minutes,
            stand_hours=acc.stand_hours, until=until,
            offset=coverage.offset if coverage else 0)

    def merged(self, newer: DayData) -> DayData:
        steps = {src: dict(minutes) for src, minutes in self.steps.items()}
        for src, minutes in newer.steps.items():
            mine = steps.setdefault(src, {})
            for minute, value in minutes.items():
                mine[minute] = max(value, mine.get(minute, 0.0))
        return DayData(
            day=self.day, steps=steps, hrv={**self.hrv, **newer.hrv},
            workouts=sorted(set(self.workouts) | set(newer.workouts)),
            exercise_minutes=_newer(self.exercise_minutes, newer.exercise_minutes),
            stand_hours=_newer(self.stand_hours, newer.stand_hours),
            until=max(self.until, newer.until), offset=newer.offset)


def _newer(old: int | None, new: int | None) -> int | None:
    return old if new is None else new


class ExportMark(BaseModel):
    """A file processed once; ``error`` if it was refused (not retried until it changes)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    kind: Literal["xml", "zip", "json"]
    size: int
    parsed_at: datetime
    seconds: float
    days: int = 0
    records: int = 0
    error: str | None = None


class Meta(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    coverage_minute: int  # local wall-clock minutes since 1970-01-01
    offset: int

    @property
    def coverage(self) -> Moment:
        return Moment(self.coverage_minute, self.offset)


class BreakMark(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    since_minute: int
    emitted_minute: int


def to_datetime(moment: Moment) -> datetime:
    """The aware datetime of a wall-clock ``Moment``."""
    zone = timezone(timedelta(minutes=moment.offset))
    return (datetime(1970, 1, 1) + timedelta(minutes=moment.minute)).replace(tzinfo=zone)


def to_moment(when: datetime, offset: int) -> Moment:
    """``when`` in the owner's wall clock (UTC offset ``offset`` minutes)."""
    return Moment(int(when.timestamp() // 60) + offset, offset)
