"""The anomaly agent: recorded-style audit streams with injected attacks replay through
the detectors; each attack class raises exactly its own alert, normal days none."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from structlog.testing import capture_logs

from agents.anomaly import agent as anomaly
from agents.anomaly.alerts import AnomalyAlert
from agents.anomaly.detectors import in_quiet_hours
from agents.anomaly.settings import AnomalySettings
from agents.anomaly.tests import traffic
from agents.anomaly.tests.traffic import ATTACKS, Day, normal_day, write
from agents.anomaly.watcher import Watcher
from agents.runtime import Context, Event
from agents.runtime.testing import collect, serving
from broker.revocations import RevocationAuthority
from broker.secrets import load_identity
from orchestrator.audit import open_readers, stream_config
from orchestrator.dispatch import AgentCaller
from protocol.actions import Completed
from protocol.audit import AuditRecord
from security.tokens import TokenIssuer
from tests.conftest import ConnectAs, RunningBroker, eventually, wait_for_violation

ALL_KINDS = sorted(ATTACKS)


@pytest.fixture(autouse=True)
def _fresh_watcher() -> Iterator[None]:
    anomaly.reset()
    yield
    anomaly.reset()


def replay(records: list[AuditRecord], **overrides: object) -> list[AnomalyAlert]:
    return Watcher(AnomalySettings(**overrides)).feed_all(records)  # type: ignore[arg-type]


# Normal traffic -------------------------------------------------------------------------

@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(min_value=0, max_value=2**32 - 1))
def test_a_normal_day_raises_no_alert(seed: int) -> None:
    stream = write(normal_day(seed))
    kinds = {(r.kind, r.outcome) for r in stream.records}
    # the day is not trivially quiet: it has what every detector looks at
    assert {("command", "ok"), ("token_issued", "ok"), ("token_request", "pending"),
            ("approval_requested", "pending"), ("registration", "ok")} <= kinds
    assert len(stream.records) > 100
    assert replay(stream.records) == []


@pytest.mark.parametrize("tz", ["Europe/Berlin", "America/Los_Angeles", "Asia/Tokyo"])
def test_normal_days_in_other_time_zones_raise_no_alert(tz: str) -> None:
    for seed in range(5):
        assert replay(write(normal_day(seed, tz=tz)).records, timezone=tz) == []


def test_normal_traffic_does_fail_and_refuse_now_and_then() -> None:
    """Without this the no-false-positive claim would be about a stream with no noise."""
    outcomes = [(r.kind, r.outcome) for s in range(20) for r in write(normal_day(s)).records]
    assert outcomes.count(("command", "error")) >= 20
    assert outcomes.count(("command", "refused")) >= 10
    assert ("approval_decided", "denied") in outcomes
    assert ("auth_failure", "refused") in outcomes


# Each attack raises exactly its alert ---------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("attack", ALL_KINDS)
def test_each_attack_raises_exactly_its_alert(attack: str, seed: int) -> None:
    stream = write(normal_day(seed) + ATTACKS[attack](seed + 1000))
    alerts = replay(stream.records)
    assert [a.kind for a in alerts] == [attack]
    [alert] = alerts
    assert alert.record_ids
    assert set(alert.record_ids) <= set(stream.tags[attack])
    assert alert.explanation.summary
    assert alert.explanation.reason
    assert alert.explanation.data
    assert 0.5 <= alert.explanation.confidence <= 0.95


def test_all_attacks_in_one_day_raise_one_alert_each() -> None:
    drafts = normal_day(7)
    for i, attack in enumerate(ALL_KINDS):
        drafts += ATTACKS[attack](100 + i)
    stream = write(drafts)
    alerts = replay(stream.records)
    assert sorted(a.kind for a in alerts) == ALL_KINDS
    for alert in alerts:
        assert set(alert.record_ids) <= set(stream.tags[alert.kind])


def test_a_refusal_burst_names_the_identity_and_the_records_it_counted() -> None:
    stream = write(normal_day(3) + traffic.refusal_burst(1, identity="home"))
    [alert] = replay(stream.records)
    injected = stream.tags["refusal_burst"]
    assert alert.identity == "home"
    assert alert.record_ids == injected[:5]  # the five that reached the threshold
    assert alert.severity == "high"  # broker violations among them
    assert alert.explanation.data == {
        "count": 5, "threshold": 5, "window_s": 60.0,
        "by_cause": {"violation:publish_violation": 3, "command:token_wrong_audience": 2}}
    assert alert.explanation.summary == "home: 5 refusals or violations in 60 s"


def test_a_token_request_at_night_is_explained_in_local_time() -> None:
    stream = write(normal_day(4) + traffic.quiet_hours_token(1, at=3.3))
    [alert] = replay(stream.records)
    request = next(r for r in stream.records if r.seq in stream.tags["quiet_hours_token"]
                   and r.kind == "token_request")
    assert alert.record_ids == [request.seq]
    assert alert.identity == "notify"
    data = alert.explanation.data
    assert data["local_time"] == "2026-11-24 03:18:00"
    assert (data["quiet_start"], data["quiet_end"], data["timezone"]) == ("00:00", "06:00", "UTC")
    assert data["action"] == "send_message"
    assert "03:18" in alert.explanation.summary


def test_quiet_hours_follow_the_configured_time_zone() -> None:
    # 06:30 in Berlin is 05:30 UTC (November: UTC+1)
    stream = write(traffic.quiet_hours_token(1, tz="Europe/Berlin", at=6.5))
    assert [a.kind for a in replay(stream.records)] == ["quiet_hours_token"]
    assert replay(stream.records, timezone="Europe/Berlin") == []
    night = write(traffic.quiet_hours_token(1, tz="Europe/Berlin", at=23.5))
    assert replay(night.records, timezone="Europe/Berlin") == []
    [late] = replay(night.records, timezone="Europe/Berlin", quiet_start="22:00")
    assert late.explanation.data["local_time"] == "2026-11-24 23:30:00"


def test_quiet_hours_may_wrap_past_midnight() -> None:
    wrap = (time(22), time(6))
    assert in_quiet_hours(time(23, 59), *wrap)
    assert in_quiet_hours(time(0, 0), *wrap)
    assert in_quiet_hours(time(5, 59), *wrap)
    assert not in_quiet_hours(time(6, 0), *wrap)
    assert not in_quiet_hours(time(21, 59), *wrap)
    assert not in_quiet_hours(time(3), time(4), time(4))  # start == end: no quiet hours


def test_a_new_identity_alerts_once_after_the_learning_period() -> None:
    stream = write(normal_day(5) + traffic.new_identity(1, identity="printer", at=14.1))
    [alert] = replay(stream.records)
    assert alert.identity == "printer"
    assert alert.record_ids == stream.tags["new_identity"][:1]
    assert alert.severity == "high"  # it came as a failed login
    data = alert.explanation.data
    assert (data["mode"], data["first_kind"], data["first_outcome"]) == \
        ("learned", "auth_failure", "refused")
    assert data["known_count"] == 3 + len(traffic.AGENTS)  # platform identities + agents


def test_an_identity_first_seen_while_learning_is_baseline() -> None:
    stream = write(normal_day(5) + traffic.new_identity(1, identity="printer", at=0.5))
    assert replay(stream.records) == []


def test_with_a_known_identity_list_anything_else_alerts_even_at_once() -> None:
    known = ",".join(traffic.AGENTS)
    start = write(normal_day(6) + traffic.new_identity(1, identity="printer", at=0.02))
    alerts = replay(start.records, known_identities=known)
    assert [(a.kind, a.identity, a.explanation.data["mode"]) for a in alerts] == \
        [("new_identity", "printer", "list")]
    # an unknown identity that keeps coming back is raised again once per cooldown
    again = write(traffic.new_identity(1, identity="printer", at=1)
                  + traffic.new_identity(2, identity="printer", at=1.5)
                  + traffic.new_identity(3, identity="printer", at=2.1))
    assert len(replay(again.records, known_identities=known)) == 2


def test_an_error_spike_compares_the_window_with_the_baseline() -> None:
    stream = write(normal_day(8) + traffic.error_spike(1))
    [alert] = replay(stream.records)
    data = alert.explanation.data
    assert alert.identity == "home"
    assert isinstance(data["window_errors"], int)
    assert data["window_errors"] >= 5
    assert isinstance(data["window_rate"], float)
    assert isinstance(data["baseline_rate"], float)
    assert data["window_rate"] >= 3 * data["baseline_rate"]
    assert data["baseline_rate"] < 0.1
    assert data["by_code"] == {"handler_error": data["window_errors"]}
    errors = {r.seq for r in stream.records if r.outcome == "error"}
    assert set(alert.record_ids) <= errors


def test_the_error_baseline_is_learned_and_only_a_rise_past_the_factor_alerts() -> None:
    """Six hours at 10 % failures teach the baseline; then 25 % for ten minutes is below
    three times that (no alert), 50 % is above it (one alert)."""
    d = Day(9)
    clock = [d.at(1)]

    def phase(commands: int, every: int) -> float:
        began = clock[0]
        for i in range(commands):  # one command every 20 s
            failed = i % every == 0
            d.step(clock[0], "home", "get_state", outcome="error" if failed else "ok",
                   code="handler_error" if failed else "")
            clock[0] += 20
        return began

    phase(6 * 180, 10)
    worse = phase(30, 4)
    worst = phase(30, 2)
    records = write(d.drafts).records
    [alert] = replay(records)
    assert alert.ts >= worst
    data = alert.explanation.data
    assert isinstance(data["baseline_rate"], float)
    assert isinstance(data["window_rate"], float)
    assert 0.08 < data["baseline_rate"] < 0.12
    assert data["window_rate"] >= 3 * data["baseline_rate"]
    # without the factor, the smaller rise would already have been raised
    assert worse <= replay(records, error_factor=1.0)[0].ts < worst


def test_a_few_errors_among_many_commands_are_not_a_spike() -> None:
    """5 of 40 (12.5 %) is over three times the 2 % prior, but not 15 points above it."""
    d = Day(9)
    for i in range(40):  # one every 15 s: all inside one ten-minute window
        failed = i % 8 == 0
        d.step(d.at(10) + i * 15, "home", "get_state", outcome="error" if failed else "ok",
               code="handler_error" if failed else "")
    records = write(d.drafts).records
    assert replay(records) == []
    assert [a.kind for a in replay(records, error_min_increase=0.0)] == ["error_spike"]


def test_a_steady_high_rate_of_sensitive_requests_becomes_the_baseline() -> None:
    d = Day(13)
    for i in range(12 * 8):  # eight approval prompts an hour for twelve hours
        d.sensitive(d.at(8) + i * 450, "home", "call_service", decide=False)
    records = write(d.drafts).records
    alerts = replay(records)
    assert alerts, "the start of the flood stands out against the prior"
    assert all(a.kind == "sensitive_rise" for a in alerts)
    assert max(a.ts for a in alerts) < d.at(8 + 4), "once learned, the same rate is normal"
    first_baseline = alerts[0].explanation.data["baseline_per_hour"]
    assert isinstance(first_baseline, float)
    assert first_baseline < 1


def test_a_flood_of_approval_prompts_is_a_sensitive_rise() -> None:
    stream = write(normal_day(10) + traffic.sensitive_rise(1, count=9))
    [alert] = replay(stream.records)
    data = alert.explanation.data
    assert alert.identity == "home"
    assert data["count"] == 6  # a token request and its approval prompt count once
    assert data["expected_in_window"] is not None
    assert alert.severity == "high"


def test_five_sensitive_requests_in_an_hour_are_not_enough() -> None:
    stream = write(normal_day(10) + traffic.sensitive_rise(1, count=5))
    assert replay(stream.records) == []


# Rate limits, duplicates, settings, recordings -------------------------------------------

def test_a_sustained_burst_alerts_once_per_window() -> None:
    stream = write(traffic.refusal_burst(1, count=30))  # one every 4 s for two minutes
    alerts = replay(stream.records)
    assert [a.kind for a in alerts] == ["refusal_burst"] * 2
    assert alerts[1].ts - alerts[0].ts >= 60
    assert not set(alerts[0].record_ids) & set(alerts[1].record_ids)


def test_a_redelivered_record_is_not_counted_twice() -> None:
    records = write(traffic.refusal_burst(1, count=4)).records
    watcher = Watcher()
    assert watcher.feed_all(records + records) == []
    assert watcher.duplicates == 4
    assert watcher.records_seen == 4


def test_thresholds_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    records = write(traffic.refusal_burst(1, count=3)).records
    assert Watcher().feed_all(records) == []
    monkeypatch.setenv("MAS_ANOMALY_BURST_THRESHOLD", "3")
    monkeypatch.setenv("MAS_ANOMALY_TIMEZONE", "Europe/Berlin")
    configured = Watcher()
    assert configured.settings.timezone == "Europe/Berlin"
    [alert] = configured.feed_all(records)
    assert alert.explanation.data["threshold"] == 3
    monkeypatch.setenv("MAS_ANOMALY_TIMEZONE", "Mars/Olympus_Mons")
    with pytest.raises(ValidationError, match="unknown time zone"):
        AnomalySettings()


def test_a_recorded_stream_replays_to_the_same_alerts(tmp_path: Path) -> None:
    drafts = normal_day(11)
    for i, attack in enumerate(ALL_KINDS):
        drafts += ATTACKS[attack](200 + i)
    stream = write(drafts)
    path = tmp_path / "audit.jsonl"
    traffic.save(stream.records, path)
    assert traffic.load(path) == stream.records
    assert replay(traffic.load(path)) == replay(stream.records)


# The agent's handlers ----------------------------------------------------------------------

async def _deliver(records: list[AuditRecord], ctx: Context) -> None:
    for record in records:
        await anomaly.watch(Event(f"mas.audit.{record.kind}", record.model_dump_json().encode(),
                                  "orchestrator"), ctx)


async def test_alerts_are_published_on_their_subject_and_listed_newest_first() -> None:
    ctx = Context.offline("anomaly")
    drafts = normal_day(12) + traffic.refusal_burst(1) + traffic.new_identity(2)
    await _deliver(write(drafts).records, ctx)
    assert [(s, type(p).__name__) for s, p in ctx.published] == [
        ("mas.alert.refusal_burst", "AnomalyAlert"), ("mas.alert.new_identity", "AnomalyAlert")]
    out = await anomaly.agent.invoke("recent_alerts", {}, ctx)
    assert [a.kind for a in out.alerts] == ["new_identity", "refusal_burst"]
    assert out.alerts[1] == ctx.published[0][1]
    assert out.raised == {"refusal_burst": 1, "new_identity": 1}
    assert out.records_seen == len(write(drafts).records)
    assert out.learning is False
    only = await anomaly.agent.invoke("recent_alerts", {"kind": "refusal_burst"}, ctx)
    assert [a.kind for a in only.alerts] == ["refusal_burst"]
    one = await anomaly.agent.invoke("recent_alerts", {"limit": 1}, ctx)
    assert [a.kind for a in one.alerts] == ["new_identity"]


async def test_a_malformed_record_is_logged_without_its_content() -> None:
    ctx = Context.offline("anomaly")
    with capture_logs() as logs:
        await anomaly.watch(Event("mas.audit.command", b'{"seq": "secret-value"}',
                                  "orchestrator"), ctx)
    assert ctx.published == []
    assert [e["event"] for e in logs] == ["anomaly.bad_record"]
    assert "secret-value" not in repr(logs)
    out = await anomaly.agent.invoke("recent_alerts", {}, ctx)
    assert out.records_seen == 0


async def test_the_context_settings_configure_the_agent() -> None:
    ctx = Context.offline("anomaly", settings={"burst_threshold": "2"})
    await _deliver(write(traffic.refusal_burst(1, count=2)).records, ctx)
    assert [s for s, _ in ctx.published] == ["mas.alert.refusal_burst"]


# Against a real broker -------------------------------------------------------------------

@pytest.mark.broker
async def test_the_running_agent_alerts_on_audit_records_and_answers_recent_alerts(
    fresh_broker: RunningBroker, connect_fresh: ConnectAs,
) -> None:
    """A broker of its own: the records published here must not land in an audit stream
    another test created on the shared one. The agent reads them from the stream through
    the consumer the orchestrator makes for it (tests/test_audit_feed.py has the rest)."""
    orch = await connect_fresh("orchestrator")
    await RevocationAuthority.start(orch)
    js = orch.nc.jetstream(timeout=3)
    await js.add_stream(stream_config())
    assert await open_readers(js, ["anomaly"]) == []
    issuer = TokenIssuer("orchestrator",
                         load_identity(fresh_broker.secrets, "orchestrator").signing_key)
    alerts = await collect(orch, "mas.alert.>")
    async with serving(anomaly.agent, fresh_broker.secrets, fresh_broker.url):
        home = await connect_fresh("home")  # an agent cannot write audit records
        forged = write(traffic.refusal_burst(9, identity="notify")).records
        for record in forged:
            await home.publish(f"mas.audit.{record.kind}", record)
        await wait_for_violation(home, "publish", f"mas.audit.{forged[0].kind}")

        records = write(traffic.refusal_burst(1, identity="home", count=6)).records
        for record in records:
            await orch.publish(f"mas.audit.{record.kind}", record)
        await orch.sync()
        await eventually(lambda: bool(alerts), timeout=20, what="an alert")
        [msg] = alerts
        assert (msg.subject, msg.sender) == ("mas.alert.refusal_burst", "anomaly")
        published = AnomalyAlert.model_validate_json(msg.data)
        assert published.identity == "home"
        assert published.record_ids == [r.seq for r in records[:5]]

        reply = await AgentCaller(orch, issuer).call("anomaly", "recent_alerts", {})
        assert isinstance(reply, Completed), reply
        assert reply.output["records_seen"] == len(records)  # none of the forged ones
        assert reply.output["raised"] == {"refusal_burst": 1}
        listed = reply.output["alerts"]
        assert isinstance(listed, list)
        assert [AnomalyAlert.model_validate(a) for a in listed] == [published]
