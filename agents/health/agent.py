"""The health agent: Apple Health exports in, daily figures and walk-break proposals out.

The poll reads new exports from the (read-only) export folder into the KV bucket and
emits ``mas.event.health.break_due`` when the owner has been sitting too long. The
actions answer from the bucket; they first read new files that are small enough to
parse within a request (see ``inline_parse_mb``).
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from agents.health import analysis
from agents.health.harvest import DAY_MINUTES, day_date, day_number
from agents.health.models import BreakDue, CheckIn, CheckOut, DaySummary, SummaryIn
from agents.health.settings import HealthSettings
from agents.health.store import ingest
from agents.health.stored import (
    BREAK,
    DAY_PREFIX,
    META,
    BreakMark,
    DayData,
    Meta,
    day_key,
    to_datetime,
    to_moment,
)
from agents.runtime import Agent, Context, State, load_model, save_model

agent = Agent(
    "health", version="1.0.0", kind="polling", state=True,
    description="Reads Apple Health exports and proposes breaks from sedentary time, "
                "steps and HRV.",
)


@agent.action(description="Steps, sedentary minutes and HRV trend for a day.")
async def daily_summary(args: SummaryIn, ctx: Context) -> DaySummary:
    settings = HealthSettings.load(ctx.settings)
    state = _state(ctx)
    await ingest(state, settings, ctx.log, inline=True)
    day = args.day or await _newest_day(state)
    if day is None:
        return DaySummary(day=None, has_data=False)
    days = await _days(state, day, settings.hrv_baseline_days)
    today = days.pop(day_number(day), None)
    if today is None:
        return DaySummary(day=day, has_data=False)
    return analysis.summarize(today, list(days.values()), settings)


@agent.action(description="Look at recent data and propose a break if one is due.")
async def check_activity(args: CheckIn, ctx: Context) -> CheckOut:
    settings = HealthSettings.load(ctx.settings)
    state = _state(ctx)
    report = await ingest(state, settings, ctx.log, inline=True)
    meta, found = await _assess(state, settings, args.as_of or datetime.now(UTC))
    emitted = False
    if found.due:
        ctx.propose("notify_owner", analysis.explanation(found), agent="notify",
                    args=analysis.notification(found))
        emitted = await _announce(ctx, state, settings, found, args.as_of)
    return CheckOut(
        break_due=found.due, reason=found.reason, sitting_minutes=found.sitting_minutes,
        sitting_since=to_datetime(found.since) if found.since else None,
        steps_today=found.steps_today, hrv_trend_pct=found.hrv_trend,
        confidence=found.confidence, event_emitted=emitted,
        data_until=to_datetime(meta.coverage) if meta else None,
        pending_exports=report.deferred)


@agent.every(HealthSettings.load().poll_seconds)
async def poll(ctx: Context) -> None:
    """Read new exports; announce a due break (once per sitting streak and interval)."""
    settings = HealthSettings.load(ctx.settings)
    state = _state(ctx)
    await ingest(state, settings, ctx.log)
    now = datetime.now(UTC)
    _, found = await _assess(state, settings, now)
    if found.due:
        await _announce(ctx, state, settings, found, now)


def _state(ctx: Context) -> State:
    if ctx.state is None:
        raise RuntimeError("the health agent needs its KV bucket (policy: state: true)")
    return ctx.state


async def _newest_day(state: State) -> date | None:
    days = [k.removeprefix(DAY_PREFIX) for k in await state.keys(DAY_PREFIX)]
    return date.fromisoformat(max(days)) if days else None


async def _days(state: State, last: date, before: int) -> dict[int, DayData]:
    """``last`` and the ``before`` days preceding it that are stored, by day number."""
    found = {}
    for back in range(before + 1):
        day = await load_model(state, day_key(last - timedelta(days=back)), DayData)
        if day is not None:
            found[day.number] = day
    return found


async def _assess(state: State, settings: HealthSettings,
                  when: datetime) -> tuple[Meta | None, analysis.Assessment]:
    meta = await load_model(state, META, Meta)
    now = to_moment(when, meta.offset if meta else 0)
    today = day_date(min(now.minute, meta.coverage_minute if meta else now.minute)
                     // DAY_MINUTES)
    days = await _days(state, today, settings.hrv_baseline_days + 1)
    return meta, analysis.assess(now, meta.coverage if meta else None, days, settings)


async def _announce(ctx: Context, state: State, settings: HealthSettings,
                    found: analysis.Assessment, when: datetime | None) -> bool:
    """Emit break_due unless this streak was announced less than
    ``reminder_repeat_minutes`` ago."""
    if found.since is None or found.sitting_minutes is None:
        return False
    now = to_moment(when or datetime.now(UTC), found.since.offset).minute
    last = await load_model(state, BREAK, BreakMark)
    if last is not None and last.since_minute == found.since.minute \
            and now - last.emitted_minute < settings.reminder_repeat_minutes:
        return False
    await save_model(state, BREAK, BreakMark(since_minute=found.since.minute,
                                             emitted_minute=now))
    await ctx.emit("break_due", BreakDue(
        sitting_minutes=found.sitting_minutes, since=to_datetime(found.since),
        hrv_declining=found.hrv_declining, confidence=found.confidence))
    return True
