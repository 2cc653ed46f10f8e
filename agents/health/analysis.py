"""Steps, sedentary time, HRV trend and the break decision, from stored days. Pure
functions: no I/O, no clock.

**Overlapping iPhone and Apple Watch steps** are deduplicated per minute by source
priority, as the Health app does with its default priorities: in each minute the steps
of the highest-ranked source that recorded anything in that minute count (Apple Watch,
then iPhone, then other apps; ties by source), the others are dropped. So an iPhone
walk record overlapping a Watch record counts only for the minutes the Watch missed.

**Active** minutes have at least ``active_steps_per_minute`` (deduplicated) steps or lie
in a workout. **Sedentary** minutes are the other minutes of the waking window
(``day_start_hour``..``day_end_hour``), counted only up to where the day's data ends.

**HRV trend** is the mean SDNN of a recent window against the mean of the
``hrv_baseline_days`` before it, in percent: for a day summary the day against the
days before; for a break check the last 24 hours against the days before those.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from statistics import fmean

from pydantic import JsonValue

from agents.health.harvest import DAY_MINUTES, SOURCE_RANK, Moment, day_date
from agents.health.models import DaySummary
from agents.health.settings import HealthSettings
from agents.health.stored import DayData, to_datetime
from agents.runtime import Explanation

BASE_CONFIDENCE = 0.6
LONG_SITTING_BONUS = 0.1  # sitting at least twice the threshold
HRV_BONUS = 0.15  # HRV declining as well


def _rank(source: str) -> tuple[int, str]:
    return SOURCE_RANK.get(source.split(":", 1)[0], len(SOURCE_RANK)), source


def chosen_steps(day: DayData) -> dict[int, float]:
    """Deduplicated steps per minute of the day."""
    chosen: dict[int, float] = {}
    for source in sorted(day.steps, key=_rank):
        for minute, steps in day.steps[source].items():
            chosen.setdefault(minute, steps)
    return chosen


def workout_minutes(day: DayData) -> set[int]:
    return {m for start, end in day.workouts for m in range(start, end)}


def active_minutes(day: DayData, settings: HealthSettings) -> set[int]:
    walking = {m for m, n in chosen_steps(day).items() if n >= settings.active_steps_per_minute}
    return walking | workout_minutes(day)


def sedentary_minutes(day: DayData, settings: HealthSettings) -> int:
    wake, sleep = settings.waking
    active = active_minutes(day, settings)
    return sum(1 for m in range(wake, min(sleep, day.until)) if m not in active)


def hrv_between(days: Iterable[DayData], after: int, until: int) -> list[float]:
    """HRV samples in (after, until], absolute wall-clock minutes."""
    values = []
    for day in days:
        base = day.number * DAY_MINUTES
        values += [v for m, v in day.hrv.items() if after < base + m <= until]
    return values


def trend_pct(recent: list[float], baseline: list[float]) -> float | None:
    if not recent or not baseline:
        return None
    before = fmean(baseline)
    return round((fmean(recent) - before) / before * 100, 1)


def day_hrv_trend(day: DayData, history: list[DayData], settings: HealthSettings) -> float | None:
    start = day.number * DAY_MINUTES
    baseline = hrv_between(history, start - settings.hrv_baseline_days * DAY_MINUTES - 1,
                           start - 1)
    return trend_pct(list(day.hrv.values()), baseline)


@dataclass(frozen=True)
class Assessment:
    due: bool
    reason: str
    sitting_minutes: int | None = None
    since: Moment | None = None
    steps_today: int = 0
    hrv_trend: float | None = None
    hrv_declining: bool = False
    confidence: float = 0.0

    def explanation_data(self) -> dict[str, JsonValue]:
        """The figures the proposal is based on (the issue's keys)."""
        return {"sitting_time": self.sitting_minutes,
                "hrv_trend": None if self.hrv_trend is None else f"{self.hrv_trend:+.0f}%",
                "step_count": self.steps_today}


def assess(now: Moment, coverage: Moment | None, days: dict[int, DayData],
           settings: HealthSettings) -> Assessment:
    """Is a break due at ``now``? ``days`` by day number, today and the days before."""
    if coverage is None:
        return Assessment(False, "no health data yet")
    age = now.minute - coverage.minute
    if age > settings.stale_after_minutes:
        return Assessment(False, f"the newest data is {age} minutes old")
    t = min(now.minute, coverage.minute)
    n, minute = divmod(t, DAY_MINUTES)
    wake, sleep = settings.waking
    if not wake <= minute < sleep:
        return Assessment(False, "outside the waking hours")
    today = days.get(n) or DayData(day=day_date(n), until=minute, offset=coverage.offset)
    active = [m for m in active_minutes(today, settings) if m < minute]
    start = max([wake] + [m + 1 for m in active])
    sitting = minute - start
    steps = round(sum(v for m, v in chosen_steps(today).items() if m < minute))
    history = list(days.values())
    baseline_start = t - DAY_MINUTES * (1 + settings.hrv_baseline_days)
    trend = trend_pct(hrv_between(history, t - DAY_MINUTES, t),
                      hrv_between(history, baseline_start, t - DAY_MINUTES))
    declining = trend is not None and trend <= -settings.hrv_decline_pct
    threshold = settings.sitting_threshold_minutes
    since = Moment(n * DAY_MINUTES + start, coverage.offset)
    if sitting < threshold:
        return Assessment(False, f"active {sitting} minutes ago", sitting, since, steps, trend,
                          declining)
    confidence = BASE_CONFIDENCE + (LONG_SITTING_BONUS if sitting >= 2 * threshold else 0.0) \
        + (HRV_BONUS if declining else 0.0)
    parts = [f"Sedentary for {duration(sitting)}"]
    if declining:
        parts.append("heart rate variability declining")
    return Assessment(True, ", ".join(parts), sitting, since, steps, trend, declining,
                      round(confidence, 2))


def duration(minutes: int) -> str:
    hours, rest = divmod(minutes, 60)
    if hours == 0:
        return f"{rest} minutes"
    text = f"{hours} hour{'s' if hours != 1 else ''}"
    return text if rest == 0 else f"{text} {rest} minutes"


def summarize(day: DayData, history: list[DayData], settings: HealthSettings) -> DaySummary:
    """One day's figures; ``history`` holds the days before it (for the HRV trend)."""
    chosen = chosen_steps(day)
    hrv = list(day.hrv.values())
    end = Moment(day.number * DAY_MINUTES + day.until, day.offset)
    return DaySummary(
        day=day.day, has_data=True, steps=round(sum(chosen.values())),
        sedentary_minutes=sedentary_minutes(day, settings),
        active_minutes=len(active_minutes(day, settings)),
        workout_minutes=len(workout_minutes(day)),
        hrv_mean_ms=round(fmean(hrv), 1) if hrv else None, hrv_samples=len(hrv),
        hrv_trend_pct=day_hrv_trend(day, history, settings),
        exercise_minutes=day.exercise_minutes, stand_hours=day.stand_hours,
        covered_until=to_datetime(end),
        sources=sorted({s.split(":", 1)[0] for s, minutes in day.steps.items() if minutes},
                       key=lambda c: SOURCE_RANK.get(c, len(SOURCE_RANK))))


def explanation(a: Assessment) -> Explanation:
    return Explanation(summary=f"Suggest a walk break after {duration(a.sitting_minutes or 0)} "
                               "of sitting",
                       reason=a.reason, data=a.explanation_data(),
                       confidence=a.confidence)


def notification(a: Assessment) -> dict[str, JsonValue]:
    """Arguments for notify.notify_owner: no health figures beyond the sitting time, since
    a push message leaves the machine."""
    return {"title": "Time for a walk break",
            "message": f"You have been sitting for {duration(a.sitting_minutes or 0)}. "
                       "A few minutes of walking now will do you good.",
            "priority": "default"}
