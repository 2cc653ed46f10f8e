"""From health records to per-day aggregates, in memory bounded by the retention window.

Every reader (the streaming XML parser, its ElementTree baseline in the benchmark, the
Health Auto Export JSON reader) feeds one ``Harvest``. Times stay in the wall clock of
the record's own UTC offset, as the Health app shows them: a day is that calendar day,
a minute is ``local seconds // 60``. Nothing here knows about NATS or pydantic.

What is kept per day:
- steps per *source* and minute: each record's value is spread evenly over the minutes
  it spans (a record 10:00:30-10:02:30 puts a quarter in 10:00, half in 10:01, a quarter
  in 10:02). Sources are kept apart so that overlapping iPhone and Apple Watch records
  can be deduplicated later (``analysis.chosen_steps``);
- HRV (SDNN, ms) by minute; workouts as minute ranges; the Activity ring figures.
Records that start before the retention cutoff (export date minus ``retention_days``)
are dropped as soon as their type and start date are read.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, timedelta

STEPS = "HKQuantityTypeIdentifierStepCount"
HRV = "HKQuantityTypeIdentifierHeartRateVariabilitySDNN"
EPOCH = date(1970, 1, 1).toordinal()
DAY_MINUTES = 1440
MAX_RECORD_SECONDS = 2 * 86400  # longer step records are not measurements; skipped
SOURCE_RANK = {"watch": 0, "phone": 1, "other": 2}


@dataclass
class DayAcc:
    steps: dict[str, dict[int, float]] = field(default_factory=dict)  # source -> minute -> n
    hrv: dict[int, float] = field(default_factory=dict)  # minute -> SDNN ms
    workouts: set[tuple[int, int]] = field(default_factory=set)  # [start, end) minutes
    exercise_minutes: int | None = None
    stand_hours: int | None = None


@dataclass(frozen=True)
class Moment:
    """A point in the owner's wall-clock time: minutes since 1970-01-01 00:00 local."""

    minute: int
    offset: int  # UTC offset in minutes

    @property
    def day(self) -> int:
        return self.minute // DAY_MINUTES


def day_number(d: date) -> int:
    return d.toordinal() - EPOCH


def day_date(n: int) -> date:
    return date.fromordinal(n + EPOCH)


def device_class(name: str, device: str | None) -> str:
    text = device or ""
    if "model:Watch" in text or ("model:" not in text and "Watch" in name):
        return "watch"
    if "model:iPhone" in text or ("model:" not in text and "iPhone" in name):
        return "phone"
    return "other"


class Harvest:
    def __init__(self, retention_days: int | None = None) -> None:
        self.retention_days = retention_days
        self.since = ""  # records starting before this local date ("YYYY-MM-DD") are dropped
        self.days: dict[int, DayAcc] = {}
        self.export_date: Moment | None = None
        self.latest: Moment | None = None  # newest sample time seen (for files without one)
        self.counts: Counter[str] = Counter()
        self._sources: dict[str, str] = {}
        self._day_seconds: dict[str, int] = {}
        self._offsets: dict[str, int] = {}

    # ----------------------------------------------------------------- times

    def local_seconds(self, stamp: str) -> int:
        """``2019-05-14 18:52:09 -0400`` -> seconds since 1970-01-01 in that wall clock."""
        day = self._day_seconds.get(stamp[:10])
        if day is None:
            day = (date.fromisoformat(stamp[:10]).toordinal() - EPOCH) * 86400
            self._day_seconds[stamp[:10]] = day
        if stamp[10] != " " or stamp[13] != ":" or stamp[16] != ":":
            raise ValueError("not an Apple Health timestamp")
        return day + int(stamp[11:13]) * 3600 + int(stamp[14:16]) * 60 + int(stamp[17:19])

    def offset_seconds(self, stamp: str) -> int:
        text = stamp[20:]
        offset = self._offsets.get(text)
        if offset is None:
            if len(text) != 5 or text[0] not in "+-":
                raise ValueError("not a UTC offset")
            offset = int(text[1:3]) * 3600 + int(text[3:5]) * 60
            offset = -offset if text[0] == "-" else offset
            self._offsets[text] = offset
        return offset

    def moment(self, stamp: str) -> Moment:
        return Moment(self.local_seconds(stamp) // 60, self.offset_seconds(stamp) // 60)

    def source_key(self, name: str, device: str | None) -> str:
        """``watch:1a2b3c4d``: the device class and a hash of the source's name, so the
        owner's device names are never stored."""
        key = self._sources.get(name)
        if key is None:
            digest = hashlib.blake2b(name.encode(), digest_size=4).hexdigest()
            key = self._sources[name] = f"{device_class(name, device)}:{digest}"
        return key

    def _day(self, n: int) -> DayAcc:
        acc = self.days.get(n)
        if acc is None:
            acc = self.days[n] = DayAcc()
        return acc

    # ----------------------------------------------------------------- XML

    def element(self, name: str, attrs: dict[str, str]) -> None:
        """The start of one element of export.xml (an expat StartElementHandler)."""
        if name == "Record":
            kind = attrs.get("type")
            if kind in (STEPS, HRV):
                self._record(kind, attrs)
        elif name == "Workout":
            self._guard(self._workout, attrs)
        elif name == "ActivitySummary":
            self._guard(self._summary, attrs)
        elif name == "ExportDate":
            self._guard(self._export_date, attrs)

    def element_list(self, name: str, attrs: list[str]) -> None:
        """``element`` for expat's ``ordered_attributes`` ([name, value, ...]): only the
        elements kept become dicts. Apple writes ``type`` first; otherwise it is looked up."""
        if name == "Record":
            kind = attrs[1] if attrs and attrs[0] == "type" else _lookup(attrs, "type")
            if kind in (STEPS, HRV):
                self._record(kind, dict(zip(attrs[::2], attrs[1::2], strict=True)))
        elif name in _OTHER_ELEMENTS:
            self.element(name, dict(zip(attrs[::2], attrs[1::2], strict=True)))

    def _record(self, kind: str, attrs: dict[str, str]) -> None:
        try:
            start = attrs["startDate"]
            if start < self.since:
                self.counts["old"] += 1
                return
            if kind == STEPS:
                self.add_steps(self.source_key(attrs["sourceName"], attrs.get("device")),
                               start, attrs["endDate"], float(attrs["value"]))
            else:
                self.add_hrv(start, float(attrs["value"]))
        except (KeyError, ValueError, IndexError):
            self.counts["invalid"] += 1

    def _guard(self, handler: Callable[[dict[str, str]], None], attrs: dict[str, str]) -> None:
        try:
            handler(attrs)
        except (KeyError, ValueError, IndexError):
            self.counts["invalid"] += 1

    def _workout(self, attrs: dict[str, str]) -> None:
        if attrs["endDate"] < self.since:
            self.counts["old"] += 1
            return
        self.add_workout(attrs["startDate"], attrs["endDate"])

    def _summary(self, attrs: dict[str, str]) -> None:
        day = attrs["dateComponents"]
        if day < self.since:
            return
        self.add_summary(date.fromisoformat(day), _int(attrs.get("appleExerciseTime")),
                         _int(attrs.get("appleStandHours")))

    def _export_date(self, attrs: dict[str, str]) -> None:
        self.set_export_date(attrs["value"])

    # ----------------------------------------------------------------- facts

    def set_export_date(self, stamp: str) -> None:
        self.export_date = self.moment(stamp)
        if self.retention_days is not None:
            first = day_date(self.export_date.day) - timedelta(days=self.retention_days)
            self.since = first.isoformat()

    def note(self, moment: Moment) -> None:
        if self.latest is None or moment.minute > self.latest.minute:
            self.latest = moment

    def add_steps(self, source: str, start: str, end: str, value: float) -> None:
        t0 = self.local_seconds(start)
        length = (self.local_seconds(end) - self.offset_seconds(end)) - \
            (t0 - self.offset_seconds(start))
        self.add_steps_local(source, t0, t0 + length, value)
        self.note(Moment((t0 + length) // 60, self.offset_seconds(end) // 60))

    def add_steps_local(self, source: str, t0: int, t1: int, value: float) -> None:
        """Spread ``value`` steps over [t0, t1) (local seconds), minute by minute."""
        if value <= 0 or t1 - t0 > MAX_RECORD_SECONDS or t1 < t0:
            self.counts["invalid"] += 1
            return
        self.counts["steps"] += 1
        minute = t0 // 60
        if t1 == t0 or t1 <= (minute + 1) * 60:  # within one minute: most watch records
            self._add_minute(source, minute, value)
            return
        per_second = value / (t1 - t0)
        while minute * 60 < t1:
            overlap = min(t1, minute * 60 + 60) - max(t0, minute * 60)
            self._add_minute(source, minute, overlap * per_second)
            minute += 1

    def _add_minute(self, source: str, minute: int, value: float) -> None:
        day, of_day = divmod(minute, DAY_MINUTES)
        by_minute = self._day(day).steps.setdefault(source, {})
        by_minute[of_day] = by_minute.get(of_day, 0.0) + value

    def add_hrv(self, start: str, value: float) -> None:
        if not 0 < value < 1000:
            raise ValueError("HRV out of range")
        moment = self.moment(start)
        self.counts["hrv"] += 1
        self._day(moment.day).hrv[moment.minute % DAY_MINUTES] = value
        self.note(moment)

    def add_workout(self, start: str, end: str) -> None:
        first = self.local_seconds(start) // 60
        last = -(-self.local_seconds(end) // 60)  # the minute the workout ends in counts
        if not 0 <= last - first <= MAX_RECORD_SECONDS // 60:
            raise ValueError("workout times out of order")
        self.counts["workouts"] += 1
        while first < last:
            day, of_day = divmod(first, DAY_MINUTES)
            until = min(last - day * DAY_MINUTES, DAY_MINUTES)
            self._day(day).workouts.add((of_day, until))
            first = (day + 1) * DAY_MINUTES
        self.note(Moment(last, self.offset_seconds(end) // 60))

    def add_summary(self, day: date, exercise: int | None, stand_hours: int | None) -> None:
        self.counts["summaries"] += 1
        acc = self._day(day_number(day))
        acc.exercise_minutes = exercise
        acc.stand_hours = stand_hours

    @property
    def coverage(self) -> Moment | None:
        """Until when the data is complete: the export date, else the newest sample."""
        return self.export_date or self.latest


_OTHER_ELEMENTS = frozenset({"Workout", "ActivitySummary", "ExportDate"})


def _lookup(attrs: list[str], key: str) -> str | None:
    for i in range(0, len(attrs) - 1, 2):
        if attrs[i] == key:
            return attrs[i + 1]
    return None


def _int(text: str | None) -> int | None:
    return None if text is None else round(float(text))
