"""The per-day counters and summaries in the agent's KV state.

One key per day (``digest.<YYYY-MM-DD>``) plus an index of the stored days
(``digest-days``). A day is written after every event, so a restart loses nothing;
when a new day opens, days older than ``keep_days`` are deleted. The bucket is shared
with the runtime's single-use ledger, so only keys with these names are ever touched.
"""

from __future__ import annotations

import asyncio
from datetime import date, datetime, timedelta
from weakref import WeakKeyDictionary

from agents.aggregator.gist import Origin, gist
from agents.aggregator.models import DayIndex, DayLog, Digest, Item
from agents.aggregator.settings import AggregatorSettings
from agents.runtime import State, load_model, save_model, update_model

PREFIX = "digest."
INDEX = "digest-days"
OTHER = "other"

# Events arrive on several subscriptions at once; each day is read, changed and written
# back, so the writers of one state take turns.
_locks: WeakKeyDictionary[State, asyncio.Lock] = WeakKeyDictionary()


def day_key(day: date) -> str:
    return f"{PREFIX}{day.isoformat()}"


class DayBook:
    def __init__(self, state: State, settings: AggregatorSettings) -> None:
        self.state = state
        self.settings = settings

    def local(self, ts: float) -> datetime:
        return datetime.fromtimestamp(ts, self.settings.zone).replace(microsecond=0)

    def _lock(self) -> asyncio.Lock:
        lock = _locks.get(self.state)
        if lock is None:
            lock = _locks[self.state] = asyncio.Lock()
        return lock

    async def record(self, where: Origin, data: bytes, sender: str, ts: float) -> bool:
        """Count one message (and keep its summary if it has one). False if its day is
        older than the days kept."""
        at = self.local(ts)
        key = day_key(at.date())

        def added(log: DayLog | None) -> DayLog:  # may run again if a replica wrote first
            log = DayLog(day=at.date()) if log is None else log.model_copy(deep=True)
            self._add(log, where, data, sender, at)
            return log

        async with self._lock():
            if await load_model(self.state, key, DayLog) is None \
                    and not await self._open(at.date()):
                return False
            # compare-and-set: replicas (`--scale aggregator=2`) share the bucket
            await update_model(self.state, key, DayLog, added)
        return True

    def _add(self, log: DayLog, where: Origin, data: bytes, sender: str, at: datetime) -> None:
        kinds = log.counts.setdefault(where.source, {})
        kind = where.kind if where.kind in kinds or len(kinds) < self.settings.max_kinds \
            else OTHER
        kinds[kind] = kinds.get(kind, 0) + 1
        log.first_at = log.first_at or at
        log.last_at = at
        said = gist(data)
        if where.source == "alert":
            severity = said.severity or "unknown"
            log.alert_severity[severity] = log.alert_severity.get(severity, 0) + 1
            summary = said.summary or f"{where.kind} alert"
            if len(log.alerts) < self.settings.max_alerts:
                log.alerts.append(Item(at=at, source="alert", kind=where.kind, sender=sender,
                                       summary=summary, severity=said.severity))
            else:
                log.omitted_alerts += 1
        elif said.summary is not None:
            if len(log.notable) < self.settings.max_notable:
                log.notable.append(Item(at=at, source=where.source, kind=where.kind,
                                        sender=sender, summary=said.summary,
                                        severity=said.severity))
            else:
                log.omitted_notable += 1

    async def _open(self, day: date) -> bool:
        """List ``day`` in the index and prune days that fell out of the kept range.
        The index is written before a day's key exists and after its key is gone, so a
        crash at any point leaves no stored day unlisted."""
        index = await load_model(self.state, INDEX, DayIndex) or DayIndex()
        cutoff = max([*index.days, day]) - timedelta(days=self.settings.keep_days - 1)
        if day < cutoff:
            return False
        listed = sorted({*index.days, day})
        if listed != index.days:
            await save_model(self.state, INDEX, DayIndex(days=listed))
        dropped = [d for d in listed if d < cutoff]
        for old in dropped:
            await self.state.delete(day_key(old))
        if dropped:
            await save_model(self.state, INDEX, DayIndex(days=[d for d in listed if d >= cutoff]))
        return True

    async def days(self) -> list[date]:
        index = await load_model(self.state, INDEX, DayIndex)
        return index.days if index else []

    async def digest(self, day: date) -> Digest:
        log = await load_model(self.state, day_key(day), DayLog)
        stored = log is not None
        log = log or DayLog(day=day)
        by_source = {s: sum(kinds.values()) for s, kinds in sorted(log.counts.items())}
        total = sum(by_source.values())
        return Digest(
            day=day, timezone=self.settings.timezone, stored=stored,
            summary=_summary(day, total, by_source, log.alert_severity),
            total=total, by_source=by_source,
            counts={s: dict(sorted(k.items())) for s, k in sorted(log.counts.items())},
            alerts_by_severity=dict(sorted(log.alert_severity.items())),
            notable=log.notable, alerts=log.alerts, omitted_notable=log.omitted_notable,
            omitted_alerts=log.omitted_alerts, first_at=log.first_at, last_at=log.last_at)


def _summary(day: date, total: int, by_source: dict[str, int],
             severity: dict[str, int]) -> str:
    if not total:
        return f"{day.isoformat()}: nothing recorded"
    events = {s: n for s, n in by_source.items() if s != "alert"}
    parts = [f"{sum(events.values())} events from {len(events)} sources"
             + (f" ({', '.join(f'{s} {n}' for s, n in events.items())})" if events else "")]
    alerts = sum(severity.values())
    if alerts:
        high = severity.get("high", 0) + severity.get("critical", 0)
        parts.append(f"{alerts} alerts" + (f", {high} high" if high else ""))
    return f"{day.isoformat()}: " + "; ".join(parts)
