"""Schedules of workflow triggers, in words a person writes in YAML.

Accepted forms (case-insensitive):

- ``every 30m``, ``every 1h``, ``every 2 hours``, ``every 1d``: a fixed interval of at
  least one minute and at most 31 days. Firings are aligned to the Unix epoch (every
  1h fires on the hour, UTC), so they do not drift or depend on when the
  orchestrator started.
- ``daily 08:00``, ``weekdays 08:00``, ``weekends 10:30``, ``mon,wed,fri 18:00``: a
  wall-clock time (24 h) on those days, in the time zone of the datetime passed to
  ``next_after`` (local time for a naive one).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime, time, timedelta

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_UNIT_WORDS = {
    "s": "s", "sec": "s", "secs": "s", "second": "s", "seconds": "s",
    "m": "m", "min": "m", "mins": "m", "minute": "m", "minutes": "m",
    "h": "h", "hr": "h", "hrs": "h", "hour": "h", "hours": "h",
    "d": "d", "day": "d", "days": "d",
}
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_DAY_SETS = {"daily": frozenset(range(7)), "weekdays": frozenset(range(5)),
             "weekends": frozenset({5, 6})}
_EVERY = re.compile(r"^every\s+(\d{1,6})\s*([a-z]+)$")
_AT = re.compile(r"^([a-z,\s]+?)\s+(\d{1,2}):(\d{2})$")
MIN_INTERVAL_S = 60
MAX_INTERVAL_S = 31 * 86400
FORMS = "'every 30m', 'every 1h', 'daily 08:00', 'weekdays 08:00' or 'mon,fri 18:00'"


@dataclass(frozen=True)
class Schedule:
    """Either ``interval_s`` (every N seconds) or ``at`` on ``days`` (0 = Monday)."""

    text: str
    interval_s: int | None = None
    at: time | None = None
    days: frozenset[int] = frozenset()

    def next_after(self, moment: datetime) -> datetime:
        """The first firing strictly after ``moment``, in ``moment``'s time zone."""
        if self.interval_s is not None:
            n = math.floor(moment.timestamp() / self.interval_s) + 1
            return datetime.fromtimestamp(n * self.interval_s, tz=moment.tzinfo)
        if self.at is None or not self.days:
            raise ValueError(f"schedule {self.text!r} has neither an interval nor a time")
        day = moment.date()
        for _ in range(8):
            candidate = datetime.combine(day, self.at, tzinfo=moment.tzinfo)
            if candidate > moment and candidate.weekday() in self.days:
                return candidate
            day += timedelta(days=1)
        raise ValueError(f"schedule {self.text!r} never fires")  # unreachable: a day per week

    def fires_between(self, start: datetime, end: datetime) -> bool:
        """True if the schedule fires in (``start``, ``end``]."""
        return self.next_after(start) <= end


def _days(words: str) -> frozenset[int]:
    words = words.strip()
    if words in _DAY_SETS:
        return _DAY_SETS[words]
    days = set()
    for word in (w.strip() for w in words.split(",")):
        if word not in _DAYS:
            raise ValueError(f"unknown day {word!r}; use daily, weekdays, weekends or "
                             "mon..sun separated by commas")
        days.add(_DAYS.index(word))
    return frozenset(days)


def parse_schedule(text: str) -> Schedule:
    """A ``Schedule``, or ``ValueError`` with a message that shows the accepted forms."""
    spec = " ".join(text.lower().split())
    every = _EVERY.match(spec)
    if every:
        unit = _UNIT_WORDS.get(every.group(2))
        if unit is None:
            raise ValueError(f"unknown unit {every.group(2)!r}; use s, m, h or d")
        seconds = int(every.group(1)) * _UNITS[unit]
        if not MIN_INTERVAL_S <= seconds <= MAX_INTERVAL_S:
            raise ValueError("an interval must be between 1 minute and 31 days")
        return Schedule(text=text, interval_s=seconds)
    at = _AT.match(spec)
    if at:
        hour, minute = int(at.group(2)), int(at.group(3))
        if hour > 23 or minute > 59:
            raise ValueError(f"{at.group(2)}:{at.group(3)} is not a time of day (00:00-23:59)")
        return Schedule(text=text, at=time(hour, minute), days=_days(at.group(1)))
    raise ValueError(f"{text!r} is not a schedule; write {FORMS}")
