"""Apple Health exports written the way the iOS Health app writes ``export.xml``.

The same XML declaration, internal DTD, ``HealthData``/``ExportDate``/``Me`` header,
attribute order, indentation and escaped ``device`` descriptions, with records from an
iPhone and an Apple Watch. Two uses:

- tests build small files from explicit elements (``header``, ``record``, ``workout``,
  ``activity_summary``, ``FOOTER``) so the expected figures are known by hand;
- ``write_export`` writes a realistic export of any size (a day holds about 1,000
  records of a dozen types; records are grouped by type as in real exports), in large
  chunks, for the benchmark and the bounded-memory tests.
"""

from __future__ import annotations

import functools
import random
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from xml.sax.saxutils import escape

XML_DECLARATION = '<?xml version="1.0" encoding="UTF-8"?>\n'
# As Apple writes it (HealthKit export version 13, iOS 17), kept verbatim in a data file.
DTD = (Path(__file__).parent / "apple_doctype.dtd").read_text(encoding="utf-8")
ME = (' <Me HKCharacteristicTypeIdentifierDateOfBirth="1986-03-02" '
      'HKCharacteristicTypeIdentifierBiologicalSex="HKBiologicalSexFemale" '
      'HKCharacteristicTypeIdentifierBloodType="HKBloodTypeNotSet" '
      'HKCharacteristicTypeIdentifierFitzpatrickSkinType="HKFitzpatrickSkinTypeNotSet" '
      'HKCharacteristicTypeIdentifierCardioFitnessMedicationsUse="None"/>\n')
FOOTER = "</HealthData>\n"

STEPS = "HKQuantityTypeIdentifierStepCount"
HEART_RATE = "HKQuantityTypeIdentifierHeartRate"
HRV = "HKQuantityTypeIdentifierHeartRateVariabilitySDNN"
DISTANCE = "HKQuantityTypeIdentifierDistanceWalkingRunning"
ACTIVE_ENERGY = "HKQuantityTypeIdentifierActiveEnergyBurned"
BASAL_ENERGY = "HKQuantityTypeIdentifierBasalEnergyBurned"
EXERCISE_TIME = "HKQuantityTypeIdentifierAppleExerciseTime"
STAND_HOUR = "HKCategoryTypeIdentifierAppleStandHour"


@dataclass(frozen=True)
class Source:
    name: str
    version: str
    device: str | None  # the HKDevice description Apple writes into ``device``

    def attrs(self) -> str:
        text = _ATTRS.get(self)
        if text is None:
            text = f' sourceName={_q(self.name)} sourceVersion={_q(self.version)}'
            text += f' device={_q(self.device)}' if self.device else ""
            _ATTRS[self] = text
        return text


_ATTRS: dict[Source, str] = {}


IPHONE = Source("Alex’s iPhone", "17.4.1",
                "<<HKDevice: 0x3023d1e50>, name:iPhone, manufacturer:Apple Inc., model:iPhone, "
                "hardware:iPhone15,2, software:17.4.1>")
WATCH = Source("Alex’s Apple Watch", "10.4",
               "<<HKDevice: 0x3023c8b90>, name:Apple Watch, manufacturer:Apple Inc., "
               "model:Watch, hardware:Watch6,1, software:10.4>")
APP = Source("Pedometer++", "2024.3", None)


_SPECIAL = re.compile(r'[&<>"]')


def _q(value: str) -> str:
    if _SPECIAL.search(value):
        value = escape(value, {'"': "&quot;"})
    return f'"{value}"'


def header(export_date: str, *, locale: str = "en_US") -> str:
    """Everything before the first record; ``export_date`` like ``2024-05-14 18:52:09 -0400``."""
    return (XML_DECLARATION + DTD + f"<HealthData locale={_q(locale)}>\n"
            f" <ExportDate value={_q(export_date)}/>\n" + ME)


def record(kind: str, source: Source, *, start: str, end: str, value: str | float,
           unit: str | None = None, created: str | None = None,
           metadata: Iterable[tuple[str, str]] = (),
           beats: Iterable[tuple[int, str]] = ()) -> str:
    """One ``<Record>``; ``beats`` are (bpm, time) pairs of an HRV metadata list."""
    unit_attr = f" unit={_q(unit)}" if unit is not None else ""
    head = (f" <Record type={_q(kind)}{source.attrs()}{unit_attr} "
            f"creationDate={_q(created or end)} startDate={_q(start)} endDate={_q(end)} "
            f"value={_q(str(value))}")
    children = [f"  <MetadataEntry key={_q(k)} value={_q(v)}/>\n" for k, v in metadata]
    beats = list(beats)
    if beats:
        children.append("  <HeartRateVariabilityMetadataList>\n")
        children += [f"   <InstantaneousBeatsPerMinute bpm=\"{bpm}\" time={_q(t)}/>\n"
                     for bpm, t in beats]
        children.append("  </HeartRateVariabilityMetadataList>\n")
    if not children:
        return head + "/>\n"
    return head + ">\n" + "".join(children) + " </Record>\n"


def workout(source: Source, *, start: str, end: str, minutes: float,
            activity: str = "HKWorkoutActivityTypeWalking", steps: int = 0,
            energy: float = 0.0) -> str:
    """One ``<Workout>`` with the metadata, event and statistics children iOS 17 writes."""
    return (f" <Workout workoutActivityType={_q(activity)} duration=\"{minutes:.4f}\" "
            f"durationUnit=\"min\"{source.attrs()} creationDate={_q(end)} "
            f"startDate={_q(start)} endDate={_q(end)}>\n"
            '  <MetadataEntry key="HKIndoorWorkout" value="0"/>\n'
            '  <MetadataEntry key="HKTimeZone" value="America/New_York"/>\n'
            f'  <WorkoutEvent type="HKWorkoutEventTypeSegment" date={_q(start)} '
            f'duration="{minutes:.4f}" durationUnit="min"/>\n'
            f'  <WorkoutStatistics type="{ACTIVE_ENERGY}" startDate={_q(start)} '
            f'endDate={_q(end)} sum="{energy:.3f}" unit="Cal"/>\n'
            f'  <WorkoutStatistics type="{STEPS}" startDate={_q(start)} endDate={_q(end)} '
            f'sum="{steps}" unit="count"/>\n'
            " </Workout>\n")


def activity_summary(day: str, *, exercise: int, stand_hours: int,
                     energy: float = 350.0) -> str:
    return (f' <ActivitySummary dateComponents="{day}" activeEnergyBurned="{energy:.3f}" '
            'activeEnergyBurnedGoal="500" activeEnergyBurnedUnit="Cal" appleMoveTime="0" '
            f'appleMoveTimeGoal="0" appleExerciseTime="{exercise}" appleExerciseTimeGoal="30" '
            f'appleStandHours="{stand_hours}" appleStandHoursGoal="12"/>\n')


def small_export(path: Path, export_date: str, elements: Iterable[str]) -> Path:
    """A complete export.xml holding exactly ``elements``."""
    path.write_text(header(export_date) + "".join(elements) + FOOTER, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- big exports


@dataclass
class GeneratedExport:
    path: Path
    size: int
    first_day: date
    last_day: date
    export_date: str
    counts: Counter[str] = field(default_factory=Counter)  # record type or element -> written
    # raw step sums per day and device ("watch", "phone"), before any deduplication
    steps: dict[date, dict[str, int]] = field(default_factory=dict)
    watch_days: set[date] = field(default_factory=set)


@dataclass(frozen=True)
class Bout:
    start: int  # seconds after midnight
    seconds: int
    cadence: float  # steps per minute
    phone: bool
    watch: bool


@dataclass
class DayPlan:
    day: date
    text: str  # "YYYY-MM-DD"
    wake: int
    sleep: int
    watch: bool
    bouts: list[Bout]
    workout: Bout | None
    hrv_base: float
    rng: random.Random


class _Spool:
    """One section of the export (a record type, the workouts, the summaries), written
    day by day to its own file in large chunks; ``size`` counts encoded bytes."""

    def __init__(self, path: Path, chunk_bytes: int) -> None:
        self.path = path
        self.file = path.open("wb")
        self.parts: list[str] = []
        self.pending = 0
        self.size = 0
        self.chunk = chunk_bytes

    def add(self, parts: list[str]) -> None:
        self.parts += parts
        self.pending += sum(map(len, parts))
        if self.pending >= self.chunk:
            self.flush()

    def flush(self) -> None:
        data = "".join(self.parts).encode()
        self.file.write(data)
        self.size += len(data)
        self.parts, self.pending = [], 0

    @property
    def approx_size(self) -> int:
        return self.size + self.pending


def write_export(path: Path, *, target_bytes: int | None = None, days: int | None = None,
                 last_day: date = date(2024, 5, 14), seed: int = 7, tz: str = "-0400",
                 chunk_bytes: int = 4 << 20) -> GeneratedExport:
    """A realistic export of ``days`` days ending on ``last_day``, or of at least
    ``target_bytes`` bytes (about one day more) ending near ``last_day``; exported on
    its last day at 21:30.

    Days are generated in order into one spool file per section, then the header and
    the sections are concatenated: grouped by type as in real exports, in one pass."""
    if (days is None) == (target_bytes is None):
        raise ValueError("give days or target_bytes")
    span = days if days is not None else _estimate_days(target_bytes or 0, last_day, seed, tz)
    first = day = last_day - timedelta(days=span - 1)
    counts: Counter[str] = Counter()
    steps: dict[date, dict[str, int]] = {}
    watch_days: set[date] = set()
    with tempfile.TemporaryDirectory(prefix="export-", dir=path.parent) as spool_dir:
        spools = [_Spool(Path(spool_dir) / str(i), chunk_bytes) for i in range(len(_RENDERS))]
        while (days is not None and day <= last_day) or (
                target_bytes is not None and sum(s.approx_size for s in spools) < target_bytes):
            plan = _plan(day, seed, tz)
            watch_days |= {day} if plan.watch else set()
            for spool, render in zip(spools, _RENDERS, strict=True):
                written = _Day(plan, tz, counts, steps)
                render(written)
                spool.add(written.out)
            day += timedelta(days=1)
        last = day - timedelta(days=1)
        export_date = f"{last.isoformat()} 21:30:00 {tz}"
        with path.open("wb") as out:
            out.write(header(export_date).encode())
            for spool in spools:
                spool.flush()
                spool.file.close()
                with spool.path.open("rb") as section:
                    shutil.copyfileobj(section, out, 8 << 20)
            out.write(FOOTER.encode())
    return GeneratedExport(path, path.stat().st_size, first, last, export_date, counts, steps,
                           watch_days)


def _estimate_days(target_bytes: int, last_day: date, seed: int, tz: str) -> int:
    """Where to start so that the target is reached near ``last_day`` (days vary a lot:
    the generation itself decides where to stop)."""
    sample = [_plan(last_day - timedelta(days=i), seed, tz) for i in range(28)]
    per_day = sum(len(s) for p in sample for s in _day_text(p, tz)) / 28
    return max(1, round(target_bytes / per_day))


def _rng(seed: float) -> random.Random:
    return random.Random(seed)  # noqa: S311 (test data, not secrets)


def _plan(day: date, seed: int, tz: str) -> DayPlan:
    rng = _rng(seed * 1_000_003 + day.toordinal())
    wake = rng.randint(6 * 3600 + 1800, 8 * 3600)
    sleep = rng.randint(22 * 3600, 23 * 3600 + 1800)
    watch = rng.random() < 0.9
    bouts: list[Bout] = []
    t = wake + rng.randint(300, 1800)
    while True:
        t += rng.randint(600, 5400)
        seconds = rng.randint(90, 900)
        if t + seconds > sleep - 600:
            break
        bouts.append(Bout(t, seconds, rng.uniform(55, 115), rng.random() < 0.7, watch))
        t += seconds
    workout = None
    if watch and rng.random() < 0.4:
        start = rng.randint(17 * 3600, 19 * 3600)
        workout = Bout(start, rng.randint(1500, 2700), rng.uniform(105, 125), True, True)
        bouts = [b for b in bouts if b.start + b.seconds < start or b.start > start + 2700]
        bouts.append(workout)
        bouts.sort(key=lambda b: b.start)
    return DayPlan(day, day.isoformat(), wake, sleep, watch, bouts, workout,
                   rng.uniform(35, 65), rng)


@dataclass
class _Day:
    """One day being written into one section: what the section needs and what it wrote.

    ``add`` turns seconds after midnight into Apple's timestamps and counts each record,
    so a section only says which records stand where."""

    plan: DayPlan
    tz: str
    counts: Counter[str]
    steps: dict[date, dict[str, int]]  # raw step sums per day and device
    out: list[str] = field(default_factory=list)

    def stamp(self, seconds: int) -> str:
        s = min(seconds, 86399)
        return f"{self.plan.text} {s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d} {self.tz}"

    def rng(self) -> random.Random:
        """The section's own generator, seeded from the day's (sections draw in order)."""
        return _rng(self.plan.rng.random())

    def add(self, kind: str, source: Source, start: int, end: int, value: str | float, *,
            unit: str | None = None, created: int | None = None,
            metadata: Iterable[tuple[str, str]] = (),
            beats: Iterable[tuple[int, str]] = ()) -> None:
        self.out.append(record(kind, source, unit=unit, start=self.stamp(start),
                               end=self.stamp(end), value=value,
                               created=None if created is None else self.stamp(created),
                               metadata=metadata, beats=beats))
        self.counts[kind] += 1


def _chunks(rng: random.Random, start: int, seconds: int, low: int,
            high: int) -> Iterator[tuple[int, int]]:
    t, end = start, start + seconds
    while t < end:
        step = min(rng.randint(low, high), end - t)
        yield t, step
        t += step


def _watch_only(render: Callable[[_Day], None]) -> Callable[[_Day], None]:
    """A section only the Apple Watch writes: nothing on the days it was not worn."""
    @functools.wraps(render)
    def on_watch_days(day: _Day) -> None:
        if day.plan.watch:
            render(day)
    return on_watch_days


def _steps(day: _Day) -> None:
    plan, rng = day.plan, day.rng()
    sums = day.steps.setdefault(plan.day, {"watch": 0, "phone": 0})
    for bout in plan.bouts:
        for source, cls, low, high, shift in ((WATCH, "watch", 40, 240, 0),
                                              (IPHONE, "phone", 200, 600, 7)):
            if not (bout.watch if cls == "watch" else bout.phone):
                continue
            for t, length in _chunks(rng, bout.start + shift, bout.seconds, low, high):
                steps = max(1, round(bout.cadence * length / 60 * rng.uniform(0.9, 1.1)))
                sums[cls] += steps
                day.add(STEPS, source, t, t + length, steps, unit="count",
                        created=t + length + 41)
                day.add(DISTANCE, source, t, t + length, f"{steps * 0.000442:.6f}", unit="mi")


@_watch_only
def _heart(day: _Day) -> None:
    plan = day.plan
    rng, t = day.rng(), plan.wake + 900
    while t < plan.sleep - 900:
        moving = any(b.start <= t < b.start + b.seconds for b in plan.bouts)
        bpm = rng.randint(95, 130) if moving else rng.randint(58, 78)
        day.add(HEART_RATE, WATCH, t, t, bpm, unit="count/min",
                metadata=[("HKMetadataKeyHeartRateMotionContext", "2" if moving else "1")])
        t += rng.randint(180, 420)


@_watch_only
def _hrv(day: _Day) -> None:
    plan = day.plan
    rng = day.rng()
    for _ in range(rng.randint(4, 7)):
        t = rng.randint(plan.wake + 1800, plan.sleep - 1800)
        beats = []
        for i in range(rng.randint(50, 70)):
            s = t + i
            hour = s // 3600 % 12 or 12
            beats.append((rng.randint(55, 80), f"{hour}:{s // 60 % 60:02d}:{s % 60:02d}."
                          f"{rng.randint(0, 99):02d} {'AM' if s < 43200 else 'PM'}"))
        day.add(HRV, WATCH, t, t + 60, f"{plan.hrv_base * rng.uniform(0.8, 1.2):.4f}",
                unit="ms", beats=beats)


@_watch_only
def _energy(day: _Day) -> None:
    plan = day.plan
    rng, t = day.rng(), plan.wake + 600
    while t < plan.sleep - 600:
        length = rng.randint(50, 110)
        day.add(ACTIVE_ENERGY, WATCH, t, t + length, f"{rng.uniform(0.05, 1.4):.3f}",
                unit="Cal")
        t += length + rng.randint(0, 40)
    for t in range(0, 86400 - 1200, 1200):
        day.add(BASAL_ENERGY, WATCH, t, t + 1200, f"{rng.uniform(18, 24):.3f}", unit="Cal")


@_watch_only
def _stand_and_exercise(day: _Day) -> None:
    plan = day.plan
    for hour in range(plan.wake // 3600 + 1, plan.sleep // 3600):
        stood = any(b.start // 3600 == hour for b in plan.bouts)
        day.add(STAND_HOUR, WATCH, hour * 3600, hour * 3600 + 3600,
                "HKCategoryValueAppleStandHourStood" if stood
                else "HKCategoryValueAppleStandHourIdle")
    for bout in plan.bouts:
        if bout.cadence >= 100:
            for minute in range(bout.seconds // 60):
                t = bout.start + minute * 60
                day.add(EXERCISE_TIME, WATCH, t, t + 60, 1, unit="min")


def _workouts(day: _Day) -> None:
    w = day.plan.workout
    if w is None:
        return
    day.counts["Workout"] += 1
    day.out.append(workout(WATCH, start=day.stamp(w.start), end=day.stamp(w.start + w.seconds),
                           minutes=w.seconds / 60, steps=round(w.cadence * w.seconds / 60),
                           energy=w.seconds / 60 * 4.2))


@_watch_only
def _summary(day: _Day) -> None:
    plan = day.plan
    day.counts["ActivitySummary"] += 1
    exercise = sum(b.seconds // 60 for b in plan.bouts if b.cadence >= 100)
    stood = len({b.start // 3600 for b in plan.bouts})
    day.out.append(activity_summary(plan.text, exercise=exercise, stand_hours=stood))


def _day_text(plan: DayPlan, tz: str) -> list[str]:
    """Every element of one day (used to estimate bytes per day)."""
    day = _Day(plan, tz, Counter(), {})
    for render in _RENDERS:
        render(day)
    return day.out


# The sections in the order they stand in the export, each with its own spool.
_RENDERS: tuple[Callable[[_Day], None], ...] = (
    _heart, _steps, _hrv, _energy, _stand_and_exercise, _workouts, _summary)
