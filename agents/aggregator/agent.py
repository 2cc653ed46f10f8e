"""The aggregator agent: every event and alert it may read is counted into the day it
arrived (in the configured time zone); ``daily_digest`` reads one day back."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime

from agents.aggregator.book import DayBook
from agents.aggregator.gist import origin
from agents.aggregator.models import Digest, DigestIn
from agents.aggregator.settings import AggregatorSettings
from agents.runtime import Agent, Context, Event

agent = Agent(
    "aggregator", version="1.0.0", kind="stateful", state=True,
    description="Builds a daily digest from the events it may read.",
)

clock: Callable[[], float] = time.time  # when a message arrived; tests replace it


def _settings(ctx: Context) -> AggregatorSettings:
    return AggregatorSettings(**ctx.settings)  # type: ignore[arg-type]


def _book(ctx: Context) -> DayBook:
    if ctx.state is None:
        raise RuntimeError("the aggregator needs its KV bucket (policy: state: true)")
    return DayBook(ctx.state, _settings(ctx))


@agent.on_event("mas.event.health.>")
@agent.on_event("mas.event.home.>")
@agent.on_event("mas.event.backup.>")
@agent.on_event("mas.alert.>")
async def collect(event: Event, ctx: Context) -> None:
    where = origin(event.subject)
    if where is None:
        return
    book = _book(ctx)
    if where.source == "alert" and event.sender not in book.settings.alerters:
        ctx.log.warning("aggregator.alert_refused", subject=event.subject, sender=event.sender)
        return
    if not await book.record(where, event.data, event.sender, clock()):
        ctx.log.info("aggregator.too_old", subject=event.subject)


@agent.action(description="The digest for one day.")
async def daily_digest(args: DigestIn, ctx: Context) -> Digest:
    book = _book(ctx)
    day = args.day or datetime.fromtimestamp(clock(), book.settings.zone).date()
    return await book.digest(day)
