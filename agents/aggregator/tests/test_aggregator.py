"""The aggregator: events and alerts are counted into the day they arrive, kept in its
KV state across restarts for a bounded number of days, and read back as a digest."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError
from structlog.testing import capture_logs

from agents.aggregator import agent as aggregator
from agents.aggregator.book import INDEX, day_key
from agents.aggregator.models import Digest
from agents.aggregator.settings import AggregatorSettings
from agents.anomaly.alerts import AnomalyAlert
from agents.runtime import Context, Event, MemoryState
from agents.runtime.testing import serving
from protocol.actions import Completed
from protocol.explain import Explanation
from tests.conftest import ConnectAs, RunningBroker, commander, wait_for_violation

NOON = datetime(2026, 11, 24, 12, 0, tzinfo=UTC).timestamp()
HOUR = 3600.0


class Clock:
    def __init__(self, ts: float) -> None:
        self.ts = ts

    def __call__(self) -> float:
        return self.ts


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock(NOON)
    monkeypatch.setattr(aggregator, "clock", fake)
    return fake


def event(subject: str, payload: dict[str, Any] | bytes, sender: str | None = None) -> Event:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    parts = subject.split(".")
    who = sender or (parts[2] if parts[1] == "event" else "anomaly")
    return Event(subject, data, who)


def explained(summary: str, **fields: Any) -> dict[str, Any]:
    return {**fields, "explanation": {"summary": summary, "reason": "", "data": {},
                                      "confidence": 0.8}}


def alert(kind: str, severity: str, summary: str) -> dict[str, Any]:
    return AnomalyAlert(
        kind=kind, severity=severity, identity="home", ts=NOON, record_ids=[1, 2],
        explanation=Explanation(summary=summary, confidence=0.9)).model_dump(mode="json")


async def digest(ctx: Context, day: date | None = None) -> Digest:
    args = {} if day is None else {"day": day.isoformat()}
    out = await aggregator.agent.invoke("daily_digest", args, ctx)
    assert isinstance(out, Digest)
    return out


async def test_a_day_is_counted_per_source_and_kind_with_its_notable_items(clock: Clock) -> None:
    ctx = Context.offline("aggregator")
    feed = [
        event("mas.event.health.break_due", explained("Sedentary for 95 min: take a break")),
        event("mas.event.health.sample", {"n": 3}),
        event("mas.event.health.sample", {"n": 4}),
        event("mas.event.home.suggestion", explained("Dim the office light for the break")),
        event("mas.event.backup.late", explained("laptop backup is 30 h old", status="late")),
        event("mas.alert.refusal_burst", alert("refusal_burst", "high", "home: 5 refusals")),
        event("mas.alert.quiet_hours_token",
              alert("quiet_hours_token", "medium", "notify asked at 03:18")),
    ]
    for i, e in enumerate(feed):
        clock.ts = NOON + i * 60
        await aggregator.collect(e, ctx)
    out = await digest(ctx)
    assert out.day == date(2026, 11, 24)
    assert out.stored
    assert out.counts == {
        "alert": {"quiet_hours_token": 1, "refusal_burst": 1},
        "backup": {"late": 1},
        "health": {"break_due": 1, "sample": 2},
        "home": {"suggestion": 1},
    }
    assert out.by_source == {"alert": 2, "backup": 1, "health": 3, "home": 1}
    assert out.total == 7
    assert [(i.source, i.kind, i.summary) for i in out.notable] == [
        ("health", "break_due", "Sedentary for 95 min: take a break"),
        ("home", "suggestion", "Dim the office light for the break"),
        ("backup", "late", "laptop backup is 30 h old"),
    ]
    assert [(a.kind, a.severity, a.sender, a.summary) for a in out.alerts] == [
        ("refusal_burst", "high", "anomaly", "home: 5 refusals"),
        ("quiet_hours_token", "medium", "anomaly", "notify asked at 03:18"),
    ]
    assert out.alerts_by_severity == {"high": 1, "medium": 1}
    assert out.first_at == datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
    assert out.last_at == datetime(2026, 11, 24, 12, 6, tzinfo=UTC)
    assert out.summary == ("2026-11-24: 5 events from 3 sources (backup 1, health 3, home 1); "
                           "2 alerts, 1 high")


async def test_health_values_are_counted_not_stored(clock: Clock) -> None:
    state = MemoryState()
    ctx = Context.offline("aggregator", state=state)
    await aggregator.collect(event("mas.event.health.daily", {
        "steps": 12345, "hrv_ms": 41.7,
        "explanation": {"summary": "A quiet day", "data": {"sedentary_min": 487},
                        "reason": "resting heart rate 58", "confidence": 0.7}}), ctx)
    stored = b"".join(state.data.values())
    assert b"A quiet day" in stored
    for value in (b"12345", b"41.7", b"487", b"resting heart rate"):
        assert value not in stored


async def test_days_follow_the_configured_time_zone(clock: Clock) -> None:
    ctx = Context.offline("aggregator", settings={"timezone": "Europe/Berlin"})
    clock.ts = datetime(2026, 11, 24, 22, 30, tzinfo=UTC).timestamp()  # 23:30 in Berlin
    await aggregator.collect(event("mas.event.home.suggestion", {}), ctx)
    clock.ts += HOUR  # 00:30 on the 25th in Berlin, still the 24th in UTC
    await aggregator.collect(event("mas.event.home.suggestion", {}), ctx)
    assert (await digest(ctx, date(2026, 11, 24))).total == 1
    today = await digest(ctx)  # no day given: today, in Berlin
    assert (today.day, today.total, today.timezone) == (date(2026, 11, 25), 1, "Europe/Berlin")
    assert today.first_at is not None
    assert today.first_at.isoformat() == "2026-11-25T00:30:00+01:00"


async def test_a_restart_loses_nothing(clock: Clock) -> None:
    state = MemoryState()
    before = Context.offline("aggregator", state=state)
    await aggregator.collect(event("mas.event.backup.late", explained("nas is late")), before)
    after = Context.offline("aggregator", state=state)  # a new process, the same bucket
    await aggregator.collect(event("mas.event.backup.ok", explained("nas is back")), after)
    out = await digest(after)
    assert out.counts == {"backup": {"late": 1, "ok": 1}}
    assert [i.summary for i in out.notable] == ["nas is late", "nas is back"]


async def test_only_the_kept_days_are_stored(clock: Clock) -> None:
    state = MemoryState()
    await state.put("used-jti.abc", b"1700000000")  # the runtime's ledger shares the bucket
    ctx = Context.offline("aggregator", state=state, settings={"keep_days": "3"})
    for day in range(5):
        clock.ts = NOON + day * 24 * HOUR
        await aggregator.collect(event("mas.event.health.sample", {}), ctx)
    assert sorted(state.data) == sorted([
        INDEX, "used-jti.abc", day_key(date(2026, 11, 26)), day_key(date(2026, 11, 27)),
        day_key(date(2026, 11, 28))])
    gone = await digest(ctx, date(2026, 11, 25))
    assert (gone.stored, gone.total, gone.summary) == (False, 0, "2026-11-25: nothing recorded")
    assert (await digest(ctx, date(2026, 11, 26))).total == 1
    clock.ts = NOON  # a clock set back before the kept range records nothing
    with capture_logs() as logs:
        await aggregator.collect(event("mas.event.health.sample", {}), ctx)
    assert [e["event"] for e in logs] == ["aggregator.too_old"]
    assert day_key(date(2026, 11, 24)) not in state.data


async def test_caps_bound_a_day_and_count_what_they_leave_out(clock: Clock) -> None:
    ctx = Context.offline("aggregator", settings={"max_notable": "2", "max_alerts": "1",
                                                  "max_kinds": "2"})
    for i in range(4):
        await aggregator.collect(event(f"mas.event.home.k{i}", explained(f"item {i}")), ctx)
    for _ in range(3):
        await aggregator.collect(event("mas.alert.error_spike",
                                       alert("error_spike", "high", "errors")), ctx)
    out = await digest(ctx)
    assert out.counts["home"] == {"k0": 1, "k1": 1, "other": 2}
    assert [i.summary for i in out.notable] == ["item 0", "item 1"]
    assert (out.omitted_notable, len(out.alerts), out.omitted_alerts) == (2, 1, 2)
    assert out.alerts_by_severity == {"high": 3}


async def test_untrusted_payloads_are_counted_but_not_kept_as_they_came(clock: Clock) -> None:
    ctx = Context.offline("aggregator")
    for payload in (b"not json", b"[1, 2]", b"[" * 100_000, b'{"summary": 42}', b""):
        await aggregator.collect(event("mas.event.home.odd", payload), ctx)
    await aggregator.collect(event("mas.event.home.odd", {
        "summary": "line one\n\x1b[31mline two\u2028" + "x" * 500,
        "severity": "HIGH; rm -rf"}), ctx)
    await aggregator.collect(event("mas.event.home.a$b", explained("odd kind")), ctx)
    out = await digest(ctx)
    assert out.counts == {"home": {"odd": 6, "other": 1}}
    [messy, odd_kind] = out.notable
    assert messy.summary.startswith("line one [31mline two xxx")
    assert len(messy.summary) == 200
    assert messy.severity is None
    assert (odd_kind.kind, odd_kind.summary) == ("other", "odd kind")


async def test_alerts_from_anyone_but_the_alerting_agents_are_ignored(clock: Clock) -> None:
    ctx = Context.offline("aggregator")
    with capture_logs() as logs:
        await aggregator.collect(
            event("mas.alert.refusal_burst", alert("refusal_burst", "high", "fake"), "home"),
            ctx)
    assert (await digest(ctx)).total == 0
    assert [(e["event"], e["sender"]) for e in logs] == [("aggregator.alert_refused", "home")]


async def test_events_arriving_together_are_all_counted(clock: Clock) -> None:
    """Four subscriptions feed one state; without taking turns, read-change-write loses
    updates."""

    class SlowState(MemoryState):
        async def get(self, key: str) -> bytes | None:
            await asyncio.sleep(0.001)
            return await super().get(key)

    ctx = Context.offline("aggregator", state=SlowState())
    subjects = ["mas.event.health.a", "mas.event.home.b", "mas.event.backup.c"]
    await asyncio.gather(*(aggregator.collect(event(subjects[i % 3], {}), ctx)
                           for i in range(60)))
    assert (await digest(ctx)).by_source == {"backup": 20, "health": 20, "home": 20}


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAS_AGGREGATOR_TIMEZONE", "Asia/Tokyo")
    monkeypatch.setenv("MAS_AGGREGATOR_KEEP_DAYS", "30")
    settings = AggregatorSettings()
    assert (settings.timezone, settings.keep_days) == ("Asia/Tokyo", 30)
    monkeypatch.setenv("MAS_AGGREGATOR_KEEP_DAYS", "0")
    with pytest.raises(ValidationError):
        AggregatorSettings()


# Against a real broker -------------------------------------------------------------------

async def _until(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("the digest never showed the events")
        await asyncio.sleep(0.05)


@pytest.mark.broker
async def test_the_running_agent_digests_what_it_may_read_and_keeps_it_across_a_restart(
    broker: RunningBroker, connect_as: ConnectAs,
) -> None:
    _, caller = await commander(connect_as)

    async def today() -> dict[str, Any]:
        reply = await caller.call("aggregator", "daily_digest", {})
        assert isinstance(reply, Completed), reply
        return reply.output

    async with serving(aggregator.agent, broker.secrets, broker.url):
        before = await today()  # the session's broker may hold earlier counts for today
        start_counts = dict(before["by_source"])

        def grew(out: dict[str, Any], source: str) -> int:
            return int(out["by_source"].get(source, 0)) - int(start_counts.get(source, 0))

        publishers = {name: await connect_as(name)
                      for name in ("health", "home", "backup", "anomaly", "notify")}
        payloads: list[tuple[str, str, BaseModel | bytes]] = [
            ("health", "mas.event.health.break_due",
             json.dumps(explained("95 sedentary minutes: take a break")).encode()),
            ("home", "mas.event.home.suggestion",
             json.dumps(explained("Dim the office light")).encode()),
            ("backup", "mas.event.backup.late",
             json.dumps(explained("nas backup is 30 h old")).encode()),
            ("anomaly", "mas.alert.refusal_burst",
             AnomalyAlert.model_validate(alert("refusal_burst", "high", "home: 5 refusals"))),
            ("notify", "mas.event.notify.sent", b"{}"),  # not granted to the aggregator
        ]
        for name, subject, payload in payloads:
            await publishers[name].publish(subject, payload)
        await publishers["home"].publish("mas.event.health.break_due", b"{}")  # forged
        await wait_for_violation(publishers["home"], "publish", "mas.event.health.break_due")

        async def arrived() -> bool:
            out = await today()
            return all(grew(out, s) >= 1 for s in ("health", "home", "backup", "alert"))

        await _until(arrived)
        out = await today()
        assert {s: grew(out, s) for s in ("health", "home", "backup", "alert", "notify")} == \
            {"health": 1, "home": 1, "backup": 1, "alert": 1, "notify": 0}
        summaries = [i["summary"] for i in out["notable"]]
        assert {"95 sedentary minutes: take a break", "Dim the office light",
                "nas backup is 30 h old"} <= set(summaries)
        assert {"kind": "refusal_burst", "severity": "high", "sender": "anomaly",
                "summary": "home: 5 refusals"}.items() <= out["alerts"][-1].items()

    # a new process: the digest comes from the KV bucket
    async with serving(aggregator.agent, broker.secrets, broker.url):
        assert await today() == out
