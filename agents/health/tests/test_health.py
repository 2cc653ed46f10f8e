"""The health agent: exact figures on small exports written in Apple's format, the
deduplication and sedentary rules, the break proposal and event, the XML attacks the
parser must refuse, KV memory of processed files, and one run over the real broker."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import tracemalloc
import zipfile
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agents.health import parser as xml_parser
from agents.health import store
from agents.health.agent import agent, poll
from agents.health.analysis import chosen_steps
from agents.health.export_gen import (
    APP,
    FOOTER,
    HRV,
    IPHONE,
    STEPS,
    WATCH,
    activity_summary,
    header,
    record,
    small_export,
    workout,
    write_export,
)
from agents.health.harvest import Harvest, day_number
from agents.health.models import BreakDue, CheckOut, DaySummary
from agents.health.parser import ExportError, UnsafeExport, read_export
from agents.health.settings import HealthSettings
from agents.health.stored import DayData, day_key
from agents.runtime import Context, MemoryState, Proposal
from agents.runtime.testing import collect, serving
from tests.conftest import commander

TZ = "-0400"
EDT = timezone(timedelta(hours=-4))
DAY = "2024-05-14"
BIG = 1 << 40


def ts(day: str, clock: str, tz: str = TZ) -> str:
    return f"{day} {clock} {tz}"


def steps(source: Any, day: str, start: str, end: str, value: int,
          end_day: str | None = None) -> str:
    return record(STEPS, source, unit="count", start=ts(day, start),
                  end=ts(end_day or day, end), value=value,
                  metadata=[("HKMetadataKeySyncIdentifier", "4:1A2B"),
                            ("HKMetadataKeySyncVersion", "1")])


def hrv(day: str, clock: str, value: float) -> str:
    return record(HRV, WATCH, unit="ms", start=ts(day, clock), end=ts(day, clock),
                  value=value, beats=[(62, "8:00:01.12 AM"), (64, "8:00:02.05 AM")])


def context(folder: Path, state: MemoryState | None = None, **settings: str) -> Context:
    return Context.offline("health", state=state,
                           settings={"export_dir": str(folder), **settings})


async def summary(ctx: Context, day: str) -> DaySummary:
    result = await agent.invoke("daily_summary", {"day": day}, ctx)
    assert isinstance(result, DaySummary)
    return result


async def check(ctx: Context, when: str) -> CheckOut:
    result = await agent.invoke("check_activity", {"as_of": when}, ctx)
    assert isinstance(result, CheckOut)
    return result


# --------------------------------------------------------------------------- figures


async def test_steps_per_day_are_exact_sums_and_a_record_over_midnight_is_split(
        tmp_path: Path) -> None:
    small_export(tmp_path / "export.xml", ts(DAY, "21:30:00"), [
        steps(IPHONE, "2024-05-13", "09:00:00", "09:05:00", 500),
        steps(IPHONE, "2024-05-13", "12:00:00", "12:10:00", 1000),
        steps(IPHONE, "2024-05-13", "23:50:00", "00:10:00", 200, end_day=DAY),  # 10 + 10 min
        steps(IPHONE, DAY, "08:00:00", "08:01:00", 77),
        record("HKQuantityTypeIdentifierHeartRate", WATCH, unit="count/min",
               start=ts(DAY, "08:00:00"), end=ts(DAY, "08:00:00"), value=71),
    ])
    ctx = context(tmp_path)
    assert (await summary(ctx, "2024-05-13")).steps == 1600
    today = await summary(ctx, DAY)
    assert today.steps == 177
    assert today.sources == ["phone"]
    assert today.covered_until == datetime(2024, 5, 14, 21, 30, tzinfo=EDT)


async def test_overlapping_iphone_and_watch_steps_count_once_by_source_priority(
        tmp_path: Path) -> None:
    small_export(tmp_path / "export.xml", ts(DAY, "21:30:00"), [
        steps(WATCH, DAY, "10:00:00", "10:05:00", 500),  # 100/min, 10:00-10:04
        steps(IPHONE, DAY, "10:00:00", "10:10:00", 800),  # 80/min, 10:00-10:09
        steps(APP, DAY, "10:08:00", "10:12:00", 400),  # 100/min, 10:08-10:11
    ])
    result = await summary(context(tmp_path), DAY)
    # watch for 10:00-10:04, iPhone for 10:05-10:09, the app for 10:10-10:11 only;
    # a plain sum would say 1700, the largest single source 800
    assert result.steps == 500 + 400 + 200
    assert result.sources == ["watch", "phone", "other"]


async def test_sedentary_minutes_are_waking_minutes_without_steps_or_workout(
        tmp_path: Path) -> None:
    small_export(tmp_path / "export.xml", ts(DAY, "12:00:00"), [
        steps(WATCH, "2024-05-13", "09:00:00", "09:30:00", 3000),  # 30 active minutes
        steps(WATCH, "2024-05-13", "10:00:00", "10:05:00", 50),  # 10/min: still sitting
        steps(WATCH, "2024-05-13", "06:00:00", "06:10:00", 1000),  # before the waking window
        workout(WATCH, start=ts("2024-05-13", "18:00:00"), end=ts("2024-05-13", "18:45:00"),
                minutes=45, activity="HKWorkoutActivityTypeCycling"),
        activity_summary("2024-05-13", exercise=41, stand_hours=9),
        steps(WATCH, DAY, "08:00:00", "08:20:00", 2000),
    ])
    ctx = context(tmp_path)
    full = await summary(ctx, "2024-05-13")
    assert full.sedentary_minutes == 15 * 60 - 30 - 45
    assert (full.active_minutes, full.workout_minutes) == (30 + 10 + 45, 45)
    assert (full.exercise_minutes, full.stand_hours) == (41, 9)
    # the export was taken at noon: only 07:00-12:00 of that day is known
    assert (await summary(ctx, DAY)).sedentary_minutes == 5 * 60 - 20


async def test_hrv_trend_is_the_day_against_the_week_before(tmp_path: Path) -> None:
    week = [54, 50, 54, 50, 54, 50, 54]  # May 7..13: mean 366 / 7 = 52.29 ms
    small_export(tmp_path / "export.xml", ts(DAY, "21:30:00"), [
        hrv("2024-05-06", "08:00:00", 90),  # eight days back: outside the baseline
        *[hrv(f"2024-05-{7 + i:02d}", "08:00:00", v) for i, v in enumerate(week)],
        hrv(DAY, "08:00:00", 44), hrv(DAY, "20:00:00", 41)])
    result = await summary(context(tmp_path), DAY)
    assert (result.hrv_samples, result.hrv_mean_ms) == (2, 42.5)
    assert result.hrv_trend_pct == -18.7  # (42.5 - 52.29) / 52.29


async def test_a_day_without_data_says_so(tmp_path: Path) -> None:
    small_export(tmp_path / "export.xml", ts(DAY, "21:30:00"),
                 [steps(IPHONE, DAY, "08:00:00", "08:01:00", 10)])
    ctx = context(tmp_path)
    assert await summary(ctx, "2024-01-01") == DaySummary(day=date(2024, 1, 1), has_data=False)
    newest = await agent.invoke("daily_summary", {}, ctx)
    assert newest.day == date(2024, 5, 14)


# --------------------------------------------------------------------------- breaks


def sitting_export(folder: Path, exported: str = "15:00:00") -> Path:
    """Walked 11:55-12:00 (450 steps), then sat until the export at 15:00; HRV 50 ms
    every morning of the week before, 40 and 45 ms today: -15%."""
    return small_export(folder / "export.xml", ts(DAY, exported), [
        steps(WATCH, DAY, "11:55:00", "12:00:00", 450),
        *[hrv(f"2024-05-{d:02d}", "08:00:00", 50) for d in range(7, 14)],
        hrv(DAY, "08:00:00", 40), hrv(DAY, "09:00:00", 45)])


async def test_a_due_break_is_proposed_to_notify_with_its_explanation(tmp_path: Path) -> None:
    sitting_export(tmp_path)
    ctx = context(tmp_path)
    out = await check(ctx, "2024-05-14T15:05:00-04:00")
    assert out.break_due
    assert out.sitting_minutes == 180
    assert out.sitting_since == datetime(2024, 5, 14, 12, 0, tzinfo=EDT)
    assert (out.steps_today, out.hrv_trend_pct, out.confidence) == (450, -15.0, 0.85)
    [proposal] = ctx.proposals
    assert (proposal.agent, proposal.action) == ("notify", "notify_owner")
    assert proposal.args == {
        "title": "Time for a walk break",
        "message": "You have been sitting for 3 hours. A few minutes of walking now will "
                   "do you good.",
        "priority": "default"}
    assert proposal.explanation.reason == \
        "Sedentary for 3 hours, heart rate variability declining"
    assert proposal.explanation.data == {"sitting_time": 180, "hrv_trend": "-15%",
                                         "step_count": 450}
    assert proposal.explanation.confidence == 0.85
    Proposal.model_validate(proposal.model_dump())  # what the runtime sends back
    assert ctx.published == [("mas.event.health.break_due", BreakDue(
        sitting_minutes=180, since=datetime(2024, 5, 14, 12, 0, tzinfo=EDT),
        hrv_declining=True, confidence=0.85))]
    assert out.event_emitted


async def test_no_break_when_active_recently_data_stale_or_at_night(tmp_path: Path) -> None:
    sitting_export(tmp_path, exported="12:40:00")
    ctx = context(tmp_path)
    recent = await check(ctx, "2024-05-14T12:45:00-04:00")
    assert (recent.break_due, recent.sitting_minutes) == (False, 40)
    stale = await check(ctx, "2024-05-14T15:05:00-04:00")  # 145 minutes after the export
    assert not stale.break_due
    assert stale.reason == "the newest data is 145 minutes old"
    assert ctx.proposals == []
    assert ctx.published == []
    night = tmp_path / "night"
    night.mkdir()
    small_export(night / "export.xml", ts(DAY, "23:10:00"), [
        steps(WATCH, DAY, "11:55:00", "12:00:00", 450)])
    late = await check(context(night), "2024-05-14T23:15:00-04:00")
    assert (late.break_due, late.reason) == (False, "outside the waking hours")


async def test_a_sitting_streak_is_announced_once_per_reminder_interval(tmp_path: Path) -> None:
    sitting_export(tmp_path)
    ctx = context(tmp_path, stale_after_minutes="240")
    first = await check(ctx, "2024-05-14T15:05:00-04:00")
    again = await check(ctx, "2024-05-14T15:30:00-04:00")
    later = await check(ctx, "2024-05-14T16:06:00-04:00")
    assert (first.event_emitted, again.event_emitted, later.event_emitted) == (True, False, True)
    assert len(ctx.published) == 2
    assert len(ctx.proposals) == 3  # every check that finds a break proposes it


async def test_the_poll_reads_new_exports_once_and_announces_a_break(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # an owner whose clock says 15:00 right now, whatever time the test runs
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    local_noon = now.replace(hour=15, minute=0)
    offset = round((local_noon - now).total_seconds() / 60)
    if offset > 14 * 60:
        offset -= 24 * 60
    if offset < -12 * 60:
        offset += 24 * 60
    sign, hhmm = ("-" if offset < 0 else "+"), divmod(abs(offset), 60)
    tz = f"{sign}{hhmm[0]:02d}{hhmm[1]:02d}"
    local = now + timedelta(minutes=offset)
    day = local.date().isoformat()
    (tmp_path / "export.xml").write_text(
        header(ts(day, local.strftime("%H:%M:%S"), tz)) +
        record(STEPS, WATCH, unit="count", start=ts(day, "11:50:00", tz),
               end=ts(day, "11:55:00", tz), value=500) + FOOTER, encoding="utf-8")
    parsed: list[Path] = []
    real = store.read_file

    def spy(path: Path, settings: HealthSettings) -> Harvest:
        parsed.append(path)
        return real(path, settings)

    monkeypatch.setattr(store, "read_file", spy)
    state = CountingState()
    ctx = Context.offline("health", state=state, settings={"export_dir": str(tmp_path)})
    await poll(ctx)
    assert parsed == [tmp_path / "export.xml"]
    assert [s for s, _ in ctx.published] == ["mas.event.health.break_due"]
    event = ctx.published[0][1]
    assert isinstance(event, BreakDue)
    assert event.sitting_minutes == 185
    assert not event.hrv_declining
    writes = state.writes
    assert writes > 0

    await poll(ctx)  # the same file: no parse, no write, no second event
    assert parsed == [tmp_path / "export.xml"]
    assert state.writes == writes
    assert len(ctx.published) == 1

    (tmp_path / "apple_health_export").mkdir()
    newer = tmp_path / "apple_health_export" / "export.xml"
    newer.write_text((tmp_path / "export.xml").read_text(encoding="utf-8").replace(
        'value="500"', 'value="600"'), encoding="utf-8")
    await poll(ctx)
    assert parsed[1:] == [newer]


class CountingState(MemoryState):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    async def put(self, key: str, value: bytes) -> None:
        self.writes += 1
        await super().put(key, value)

    async def delete(self, key: str) -> None:
        self.writes += 1
        await super().delete(key)


# --------------------------------------------------------------------------- KV memory


async def test_processed_exports_are_remembered_and_broken_ones_not_retried(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small_export(tmp_path / "export.xml", ts(DAY, "21:30:00"),
                 [steps(IPHONE, DAY, "08:00:00", "08:01:00", 70)])
    (tmp_path / "broken.json").write_text("{not json", encoding="utf-8")
    state = CountingState()
    settings = HealthSettings.load({"export_dir": str(tmp_path)})
    with capture_logs() as logs:
        first = await store.ingest(state, settings, _log())
    assert (sorted(first.parsed), first.failed) == (["export.xml"], ["broken.json"])
    marks = {k: json.loads(v) for k, v in state.data.items() if k.startswith("export.")}
    assert sorted(((m["name"], m["error"]) for m in marks.values()), key=repr) == \
        [("broken.json", "not valid JSON"), ("export.xml", None)]
    calls: list[Path] = []
    monkeypatch.setattr(store, "read_file", lambda p, s: calls.append(p))
    writes = state.writes
    second = await store.ingest(state, settings, _log())
    assert (second.parsed, second.failed, second.skipped, calls) == ([], [], 2, [])
    assert state.writes == writes
    # what is logged: file names and counts, never a health value
    read = next(e for e in logs if e["event"] == "health.export_read")
    assert set(read) == {"event", "log_level", "file", "kind", "mib", "seconds", "days",
                         "records", "invalid"}


async def test_the_zip_from_the_health_app_is_read_without_extracting(tmp_path: Path) -> None:
    inner = small_export(tmp_path / "inner.xml", ts(DAY, "21:30:00"),
                         [steps(WATCH, DAY, "08:00:00", "08:02:00", 240)])
    with zipfile.ZipFile(tmp_path / "export.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.write(inner, "apple_health_export/export.xml")
        archive.writestr("apple_health_export/export_cda.xml", "<ClinicalDocument/>")
    inner.unlink()
    assert (await summary(context(tmp_path), DAY)).steps == 240
    assert names(tmp_path) == ["export.zip"]  # nothing extracted next to it


def test_a_corrupt_zip_is_an_export_error(tmp_path: Path) -> None:
    member = "apple_health_export/export.xml"
    with zipfile.ZipFile(tmp_path / "export.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(member, header(ts(DAY, "21:30:00")) + FOOTER)
    raw = bytearray((tmp_path / "export.zip").read_bytes())
    start = 30 + len(member)  # the deflate data follows the local file header
    raw[start:start + 8] = b"\xff" * 8
    (tmp_path / "export.zip").write_bytes(bytes(raw))
    with pytest.raises(ExportError, match=r"corrupt zip archive \(zlib.error\)"):
        read_export(tmp_path / "export.zip", retention_days=None, max_bytes=BIG)
    (tmp_path / "other.zip").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(ExportError, match="not a zip archive"):
        read_export(tmp_path / "other.zip", retention_days=None, max_bytes=BIG)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


async def test_health_auto_export_json_merges_with_the_xml_export_without_double_counting(
        tmp_path: Path) -> None:
    small_export(tmp_path / "export.xml", ts(DAY, "09:00:00"),
                 [steps(WATCH, DAY, "08:00:00", "08:02:00", 240)])  # 120 + 120
    sync = {"data": {"metrics": [
        {"name": "step_count", "units": "count", "data": [
            {"qty": 120, "date": ts(DAY, "08:00:00"), "source": WATCH.name},  # already known
            {"qty": 120, "date": ts(DAY, "08:01:00"), "source": WATCH.name},
            {"qty": 90, "date": ts(DAY, "09:30:00"), "source": WATCH.name},
            {"qty": "lots", "date": ts(DAY, "09:31:00")}]},
        {"name": "heart_rate_variability", "units": "ms", "data": [
            {"qty": 48.5, "date": ts(DAY, "09:40:00")}]},
        {"name": "heart_rate", "units": "bpm", "data": [
            {"Min": 60, "Avg": 64, "Max": 70, "date": ts(DAY, "09:50:00")}]}],
        "workouts": [{"id": "w1", "name": "Walking", "start": ts(DAY, "10:00:00"),
                      "end": ts(DAY, "10:30:00"), "duration": 1800}]}}
    (tmp_path / "HealthAutoExport-2024-05-14.json").write_text(json.dumps(sync),
                                                               encoding="utf-8")
    result = await summary(context(tmp_path), DAY)
    assert result.steps == 240 + 90
    assert (result.hrv_samples, result.workout_minutes) == (1, 30)
    # the heart-rate sample at 09:50 is the newest data; the workout ended at 10:30
    assert result.covered_until == datetime(2024, 5, 14, 10, 30, tzinfo=EDT)


# --------------------------------------------------------------------------- XML attacks


class Trap:
    """A loopback HTTP server that records every request: an export must never make
    the parser fetch anything."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        trap = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                trap.requests.append(self.path)
                body = b'<!ENTITY leak "fetched">'
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def trap() -> Iterator[Trap]:
    server = Trap()
    yield server
    server.close()


def with_dtd(extra: str, body: str) -> bytes:
    """Apple's header with ``extra`` declarations slipped into its internal DTD."""
    text = header(ts(DAY, "21:30:00")).replace("]>\n", extra + "\n]>\n", 1)
    return (text + body + FOOTER).encode()


def parse(data: bytes) -> Harvest:
    harvest = Harvest()
    xml_parser.parse_xml(io.BytesIO(data), harvest, max_bytes=BIG)
    return harvest


def test_the_real_header_and_escaped_device_strings_parse() -> None:
    harvest = parse(with_dtd("", steps(WATCH, DAY, "08:00:00", "08:01:00", 30)))
    assert harvest.counts["steps"] == 1
    [day] = harvest.days.values()
    [source] = day.steps
    assert source.startswith("watch:")  # read from the escaped `device` description
    assert WATCH.name not in source


def test_billion_laughs_in_the_internal_dtd_is_refused_before_any_expansion() -> None:
    lols = ['<!ENTITY lol0 "lol">'] + [
        f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(1, 10)]
    bomb = with_dtd("\n".join(lols), record(STEPS, WATCH, unit="count",
                    start=ts(DAY, "08:00:00"), end=ts(DAY, "08:01:00"), value="&lol9;"))
    tracemalloc.start()
    try:
        with pytest.raises(UnsafeExport, match="declares an entity"):
            parse(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20  # 10^9 "lol"s would be 3 GB


def test_an_external_entity_is_never_read(tmp_path: Path, trap: Trap) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-VALUE", encoding="utf-8")
    for target in (secret.as_uri(), f"{trap.url}/xxe"):
        doc = with_dtd(f'<!ENTITY xxe SYSTEM "{target}">',
                       ' <Record type="HKQuantityTypeIdentifierStepCount" sourceName="&xxe;" '
                       f'unit="count" startDate="{ts(DAY, "08:00:00")}" '
                       f'endDate="{ts(DAY, "08:01:00")}" value="5"/>\n')
        with pytest.raises(UnsafeExport) as refused:
            parse(doc)
        assert "TOP-SECRET" not in str(refused.value)
    assert trap.requests == []


def test_parameter_entities_and_external_dtds_are_never_fetched(trap: Trap) -> None:
    parameter = with_dtd(f'<!ENTITY % remote SYSTEM "{trap.url}/evil.dtd">\n%remote;', "")
    with pytest.raises(UnsafeExport, match="parameter entity"):
        parse(parameter)
    external = (f'<?xml version="1.0"?>\n<!DOCTYPE HealthData SYSTEM "{trap.url}/apple.dtd">\n'
                f'<HealthData locale="en_US"><ExportDate value="{ts(DAY, "21:30:00")}"/>'
                "</HealthData>").encode()
    with pytest.raises(UnsafeExport, match="external DTD"):
        parse(external)
    assert trap.requests == []


def test_undeclared_entities_and_foreign_documents_are_refused() -> None:
    with pytest.raises(ExportError, match="undefined entity"):
        parse(with_dtd("", '<Me name="&nbsp;"/>'))
    with pytest.raises(ExportError, match="root element"):
        parse(b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>')


def test_one_giant_token_is_refused_without_buffering_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(xml_parser, "MAX_TOKEN_BYTES", 2 << 20)
    stream = io.BytesIO(with_dtd("", f' <Record type="{STEPS}" sourceName="'
                                 + "A" * (32 << 20) + '"/>\n'))
    with pytest.raises(UnsafeExport, match="single piece of markup"):
        xml_parser.parse_xml(stream, Harvest(), max_bytes=BIG)
    assert stream.tell() <= 4 << 20  # stopped after 3 chunks of the 32 MiB value


async def test_a_refused_export_leaves_the_state_clean_and_other_files_are_read(
        tmp_path: Path) -> None:
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "export.xml").write_bytes(
        with_dtd('<!ENTITY a "aaaaaaaaaa">', steps(WATCH, DAY, "08:00:00", "08:01:00", 5)))
    small_export(tmp_path / "export.xml", ts(DAY, "21:30:00"),
                 [steps(IPHONE, DAY, "09:00:00", "09:01:00", 33)])
    state = MemoryState()
    assert (await summary(context(tmp_path, state), DAY)).steps == 33
    marks = [json.loads(v) for k, v in state.data.items() if k.startswith("export.")]
    assert sorted(((m["name"], m["error"]) for m in marks), key=repr) == [
        ("export.xml", "refused: the DTD declares an entity"), ("export.xml", None)]


# --------------------------------------------------------------------------- big exports


def test_a_generated_export_parses_to_the_generator_counts(tmp_path: Path) -> None:
    made = write_export(tmp_path / "export.xml", days=21)
    harvest = read_export(made.path, retention_days=None, max_bytes=BIG)
    assert harvest.counts["steps"] == made.counts[STEPS]
    assert harvest.counts["hrv"] == made.counts[HRV]
    assert harvest.counts["workouts"] == made.counts["Workout"]
    assert harvest.counts["summaries"] == made.counts["ActivitySummary"]
    assert harvest.counts["invalid"] == 0
    assert made.watch_days  # both kinds of day: with and without the watch
    assert made.watch_days != set(made.steps)
    for day, raw in made.steps.items():
        total = round(sum(chosen_steps(DayData.from_acc(
            day_number(day), harvest.days[day_number(day)], harvest.coverage)).values()))
        if day in made.watch_days:
            assert raw["watch"] <= total < raw["watch"] + raw["phone"]
        else:
            assert total == raw["phone"]


def test_parsing_memory_does_not_grow_with_the_file(tmp_path: Path) -> None:
    made = write_export(tmp_path / "export.xml", target_bytes=24 << 20)
    tracemalloc.start()
    try:
        harvest = read_export(made.path, retention_days=8, max_bytes=BIG)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert harvest.counts["steps"] > 0
    assert len(harvest.days) == 9
    assert made.size > 20 << 20
    assert peak < 6 << 20


# --------------------------------------------------------------------------- settings


def test_settings_come_from_the_environment_and_stay_local(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert HealthSettings.load().export_dir == Path("data/health")  # inside the project
    monkeypatch.setenv("MAS_HEALTH_SITTING_THRESHOLD_MINUTES", "45")
    assert HealthSettings.load().sitting_threshold_minutes == 45
    assert HealthSettings.load({"sitting_threshold_minutes": "90"}).sitting_threshold_minutes == 90
    with pytest.raises(ValueError, match="Extra inputs"):
        HealthSettings.load({"export_dri": "/tmp"})
    with pytest.raises(ValueError, match="before"):
        HealthSettings.load({"day_start_hour": "22", "day_end_hour": "7"})


def _log() -> Any:
    import structlog

    return structlog.get_logger("test")


# --------------------------------------------------------------------------- broker


async def test_the_agent_answers_over_the_real_broker(
        broker: Any, connect_as: Any, tmp_path: Path) -> None:
    from protocol.actions import Completed

    orch, caller = await commander(connect_as)
    events = await collect(orch, "mas.event.health.>")
    sitting_export(tmp_path)
    async with serving(agent, broker.secrets, broker.url,
                       settings={"export_dir": str(tmp_path)}) as service:
        try:
            state = service.context.state
            assert state is not None
            for key in await state.keys():  # a bucket left by an earlier run of this session
                await state.delete(key)
            reply = await caller.call("health", "daily_summary", {"day": DAY})
            assert isinstance(reply, Completed), reply
            assert (reply.output["steps"], reply.output["hrv_trend_pct"]) == (450, -15.0)
            reply = await caller.call("health", "check_activity",
                                      {"as_of": "2024-05-14T15:05:00-04:00"})
            assert isinstance(reply, Completed), reply
            assert reply.output["break_due"] is True
            [proposal] = reply.proposals
            assert (proposal.agent, proposal.action, proposal.explanation.confidence) == \
                ("notify", "notify_owner", 0.85)
            for _ in range(200):
                if events:
                    break
                await asyncio.sleep(0.01)
            [event] = events
            assert (event.subject, event.sender) == ("mas.event.health.break_due", "health")
            assert BreakDue.model_validate_json(event.data).sitting_minutes == 180
            keys = await state.keys()  # the real KV bucket remembers the export and the days
            assert day_key(date(2024, 5, 14)) in keys
            assert any(k.startswith("export.") for k in keys)
        finally:
            if service.context.state is not None:
                for key in await service.context.state.keys():
                    await service.context.state.delete(key)
