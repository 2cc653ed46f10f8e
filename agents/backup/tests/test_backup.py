"""The backup agent on hand-written ``restic snapshots --json`` fixtures (restic 0.17 with
summaries, 0.14 without), on a real restic when one is installed, and on a folder."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agents.backup.agent import agent, poll_once, schedule, transitions
from agents.backup.check import check
from agents.backup.models import BackupEvent, BackupReport, CheckBackupsOut, Status
from agents.backup.restic import ResticOutputError, parse_snapshots
from agents.backup.settings import BackupSettings
from agents.backup.transitions import Schedule, Transitions
from agents.runtime import Context
from agents.runtime.testing import collect, serving, without_settings_env
from protocol.actions import Completed
from tests.conftest import ConnectAs, RunningBroker, commander, eventually

FIXTURES = Path(__file__).parent / "fixtures"
NOW = datetime(2024, 3, 10, 9, 0, tzinfo=UTC)  # an hour after the laptop's last snapshot
NAS = "restic:nas:/srv/photos"
LAPTOP = "restic:laptop:/home/alice"


def fixture() -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads((FIXTURES / "snapshots.json").read_text())
    return data


def write(path: Path, snapshots: object, written: datetime = NOW) -> Path:
    path.write_text(json.dumps(snapshots))
    os.utime(path, (written.timestamp(), written.timestamp()))
    return path


def settings(**values: object) -> BackupSettings:
    return BackupSettings.load({k: str(v) for k, v in values.items()})


def events(ctx: Context) -> list[tuple[str, BackupEvent]]:
    published = [(subject, event) for subject, event in ctx.published
                 if isinstance(event, BackupEvent)]
    assert len(published) == len(ctx.published)
    return published


def by_name(reports: list[BackupReport]) -> dict[str, BackupReport]:
    return {r.name: r for r in reports}


@pytest.fixture(autouse=True)
def _fresh_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    transitions.last.clear()
    schedule.last = None
    without_settings_env(monkeypatch, BackupSettings)


def test_restic_output_is_read_field_by_field() -> None:
    snapshots = parse_snapshots((FIXTURES / "snapshots.json").read_bytes())
    assert [s.short_id for s in snapshots] == \
        ["5552b132", "b3a43354", "203d5383", "6d105e68", "edbbdda1"]
    nas = snapshots[3]
    assert nas.time == datetime(2024, 3, 10, 1, 0, 4, 102938, tzinfo=UTC)
    assert (nas.uid, nas.gid, nas.username) == (0, 0, "root")  # restic omits uid 0
    assert nas.parent == snapshots[1].id
    assert nas.summary is not None
    assert nas.summary.total_bytes_processed == 214095376226
    assert (snapshots[4].uid, snapshots[4].tags) == (1000, [])
    legacy = parse_snapshots((FIXTURES / "snapshots_0.14.json").read_bytes())
    assert legacy[0].summary is None
    assert legacy[0].key == "restic:db1:/etc,/var/lib/postgresql/dumps"


def test_the_group_by_form_reads_like_the_plain_one() -> None:
    plain = fixture()
    grouped = [{"group_key": {"hostname": host, "paths": None, "tags": None},
                "snapshots": [s for s in plain if s["hostname"] == host]}
               for host in ("nas", "laptop")]
    assert {s.id for s in parse_snapshots(json.dumps(grouped).encode())} == \
        {s["id"] for s in plain}


@pytest.mark.parametrize("raw", [b'[{"time": "2024-03-10T', b'{"snapshots": []}',
                                 b'[{"time": "yesterday", "id": "x"}]', b"\x00\xff"])
def test_anything_else_is_refused(raw: bytes) -> None:
    with pytest.raises(ResticOutputError):
        parse_snapshots(raw)


def test_fresh_snapshots_are_ok_with_their_age(tmp_path: Path) -> None:
    path = write(tmp_path / "snapshots.json", fixture())
    reports = by_name(check(settings(restic_json=path), NOW))
    assert set(reports) == {"restic", NAS, LAPTOP}
    assert {r.status for r in reports.values()} == {"ok"}
    assert reports[NAS].age_h == 8.0
    assert reports[LAPTOP].age_h == 1.5
    assert reports[NAS].details == {
        "snapshot": "6d105e68", "hostname": "nas", "paths": ["/srv/photos"], "snapshots": 3,
        "files": 48249, "bytes": 214095376226, "files_new": 7, "files_changed": 1}
    assert reports["restic"].details == {"snapshots": 5}


def test_a_backup_older_than_the_limit_is_late(tmp_path: Path) -> None:
    path = write(tmp_path / "s.json", fixture(), written=NOW + timedelta(hours=20))
    reports = by_name(check(settings(restic_json=path), NOW + timedelta(hours=20)))
    assert reports[NAS].status == "late"
    assert reports[NAS].problems == ["the newest snapshot is 28 h old, more than 26 h"]
    assert reports[LAPTOP].status == "ok"
    assert reports["restic"].status == "ok"


def test_a_snapshot_list_the_cron_stopped_writing_is_late(tmp_path: Path) -> None:
    path = write(tmp_path / "s.json", fixture(), written=NOW - timedelta(hours=30))
    listed = by_name(check(settings(restic_json=path), NOW))["restic"]
    assert listed.status == "late"
    assert "cron job" in listed.problems[0]


def test_a_snapshot_of_nothing_is_failing(tmp_path: Path) -> None:
    data = fixture()
    data[3]["summary"].update(total_files_processed=0, total_bytes_processed=0, files_new=0,
                              files_changed=0, files_unmodified=0)
    report = by_name(check(settings(restic_json=write(tmp_path / "s.json", data)), NOW))[NAS]
    assert report.status == "failing"
    assert report.problems == ["the newest snapshot backed up no files (is the source mounted?)"]


def test_a_snapshot_much_smaller_than_the_one_before_is_failing(tmp_path: Path) -> None:
    data = fixture()
    data[3]["summary"].update(total_files_processed=9000, total_bytes_processed=21409537622)
    path = write(tmp_path / "s.json", data)
    report = by_name(check(settings(restic_json=path), NOW))[NAS]
    assert report.status == "failing"
    assert report.problems[0].startswith("the newest snapshot covers 10% of the bytes")
    off = by_name(check(settings(restic_json=path, shrink_ratio=0), NOW))[NAS]
    assert off.status == "ok"


def test_unchanged_files_for_too_long_is_failing_only_when_asked(tmp_path: Path) -> None:
    data = [s for s in fixture() if s["hostname"] == "nas"]
    for snap in data[1:]:
        snap["summary"].update(files_new=0, files_changed=0)
    path = write(tmp_path / "s.json", data)
    assert by_name(check(settings(restic_json=path), NOW))[NAS].status == "ok"
    quiet = by_name(check(settings(restic_json=path, unchanged_days=1), NOW))[NAS]
    assert quiet.status == "failing"
    assert quiet.problems == ["no file was new or changed for 2 days "
                              "(is the backup reading a stale copy?)"]
    assert by_name(check(settings(restic_json=path, unchanged_days=3), NOW))[NAS].status == "ok"


def test_snapshots_without_a_summary_are_judged_by_age(tmp_path: Path) -> None:
    raw = json.loads((FIXTURES / "snapshots_0.14.json").read_text())
    path = write(tmp_path / "s.json", raw)
    [_, db] = check(settings(restic_json=path, unchanged_days=1), NOW - timedelta(days=1))
    assert (db.status, db.age_h) == ("ok", 6.0)
    [_, old] = check(settings(restic_json=path), NOW)
    assert (old.status, old.age_h) == ("late", 30.0)


@pytest.mark.parametrize(("content", "problem"), [
    (None, "cannot read the snapshot list"),
    ('[{"time": "2024-03-10T0', "the snapshot list cannot be read: it is not JSON"),
    ("[]", "restic lists no snapshots"),
])
def test_an_unreadable_or_empty_snapshot_list_is_failing(
        tmp_path: Path, content: str | None, problem: str) -> None:
    path = tmp_path / "snapshots.json"
    if content is not None:
        path.write_text(content)
    [report] = check(settings(restic_json=path), NOW)
    assert (report.name, report.status) == ("restic", "failing")
    assert report.problems[0].startswith(problem)


def backup_file(folder: Path, name: str, at: datetime, content: bytes = b"dump") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    os.utime(path, (at.timestamp(), at.timestamp()))
    return path


def test_a_folder_is_judged_by_its_newest_file(tmp_path: Path) -> None:
    folder = tmp_path / "dumps"
    backup_file(folder, "2024-03-08.sql.gz", NOW - timedelta(hours=55))
    backup_file(folder, "old/2024-03-09.sql.gz", NOW - timedelta(hours=31))
    backup_file(folder, ".2024-03-10.sql.gz.partial", NOW - timedelta(minutes=5))
    [report] = check(settings(watch_dir=folder), NOW)
    assert (report.name, report.source, report.status) == (f"folder:{folder}", "folder", "late")
    assert report.age_h == 31.0
    assert report.details["newest_file"] == "old/2024-03-09.sql.gz"
    assert report.details["files"] == 2
    backup_file(folder, "2024-03-10.sql.gz", NOW - timedelta(hours=2))
    [fresh] = check(settings(watch_dir=folder), NOW)
    assert (fresh.status, fresh.age_h, fresh.problems) == ("ok", 2.0, [])


def test_an_empty_newest_file_or_an_empty_or_missing_folder_is_failing(tmp_path: Path) -> None:
    folder = tmp_path / "dumps"
    folder.mkdir()
    [empty] = check(settings(watch_dir=folder), NOW)
    assert (empty.status, empty.problems) == ("failing", ["the folder holds no backup files"])
    backup_file(folder, "a.sql.gz", NOW - timedelta(hours=1), b"")
    [truncated] = check(settings(watch_dir=folder), NOW)
    assert truncated.status == "failing"
    assert truncated.problems == ["the newest file (a.sql.gz) is empty"]
    [missing] = check(settings(watch_dir=tmp_path / "unmounted"), NOW)
    assert missing.status == "failing"
    assert missing.problems[0].startswith("cannot read the folder")


def test_symlinks_out_of_the_folder_are_not_followed(tmp_path: Path) -> None:
    folder, elsewhere = tmp_path / "dumps", tmp_path / "elsewhere"
    backup_file(folder, "a.tar", NOW - timedelta(hours=40))
    (folder / "link.tar").symlink_to(backup_file(elsewhere, "new.tar", NOW))
    [report] = check(settings(watch_dir=folder), NOW)
    assert (report.status, report.details["newest_file"]) == ("late", "a.tar")


def test_only_changes_of_status_become_events() -> None:
    memory = Transitions()

    def report(status: Status) -> list[BackupReport]:
        return [BackupReport(name="b", source="folder", status=status, age_h=1.0, max_age_h=26,
                             problems=[] if status == "ok" else ["x"])]

    sequence: list[Status] = ["ok", "ok", "late", "late", "failing", "failing", "ok", "ok"]
    seen = [[(e.status, e.previous) for e in memory.update(report(s))] for s in sequence]
    assert seen == [[], [], [("late", "ok")], [], [("failing", "late")], [],
                    [("ok", "failing")], []]
    fresh = Transitions()
    assert [(e.status, e.previous) for e in fresh.update(report("late"))] == [("late", None)]
    fresh.update([])
    assert fresh.last == {}


def test_the_schedule_runs_once_per_interval() -> None:
    every = Schedule()
    assert [every.due(60, now=t) for t in (0, 30, 59.9, 60, 100, 121)] == \
        [True, False, False, True, False, True]


async def test_the_poll_publishes_late_then_ok_with_an_explanation(tmp_path: Path) -> None:
    path = write(tmp_path / "s.json", fixture())
    ctx = Context.offline("backup", settings={"restic_json": str(path)})
    configured = BackupSettings.load(ctx.settings)
    await poll_once(ctx, configured, NOW)
    assert ctx.published == []
    later = NOW + timedelta(hours=20)
    os.utime(path, (later.timestamp(), later.timestamp()))
    await poll_once(ctx, configured, later)
    await poll_once(ctx, configured, later + timedelta(minutes=15))
    [(subject, event)] = events(ctx)
    assert subject == "mas.event.backup.late"
    assert isinstance(event, BackupEvent)
    assert (event.backup, event.status, event.previous) == (NAS, "late", "ok")
    assert event.explanation.summary == f"Backup {NAS} is late (last one 28 h ago)"
    assert "more than 26 h" in event.explanation.reason
    assert event.explanation.data["snapshot"] == "6d105e68"
    assert event.explanation.confidence == 0.95
    data = fixture()
    data.append({**data[3], "time": "2024-03-11T02:00:02.000000001+01:00",
                 "id": "f" * 64, "short_id": "ffffffff"})
    write(path, data, written=later)
    await poll_once(ctx, configured, later)
    assert [(s, e.backup, e.previous) for s, e in events(ctx)[1:]] == \
        [("mas.event.backup.ok", NAS, "late")]


async def test_an_unreadable_list_raises_failing_once(tmp_path: Path) -> None:
    path = write(tmp_path / "s.json", fixture())
    ctx = Context.offline("backup", settings={"restic_json": str(path)})
    configured = BackupSettings.load(ctx.settings)
    await poll_once(ctx, configured, NOW)
    path.write_text('[{"time": ')
    await poll_once(ctx, configured, NOW)
    await poll_once(ctx, configured, NOW)
    [(subject, event)] = events(ctx)
    assert (subject, event.backup) == ("mas.event.backup.failing", "restic")
    assert "not JSON" in event.explanation.reason


async def test_check_backups_reports_without_touching_the_polls_memory(tmp_path: Path) -> None:
    path = write(tmp_path / "s.json", fixture(), written=datetime.now(UTC))
    ctx = Context.offline("backup", settings={"restic_json": str(path)})
    out = await agent.invoke("check_backups", {}, ctx)
    assert isinstance(out, CheckBackupsOut)
    assert [r.name for r in out.backups] == ["restic", LAPTOP, NAS]
    assert out.status == "late"  # the fixture's snapshots are from March 2024
    assert out.backups[0].status == "ok"  # the list itself was just written
    assert transitions.last == {}
    assert ctx.published == []


async def test_with_no_source_the_answer_says_what_to_set() -> None:
    out = await agent.invoke("check_backups", {}, Context.offline("backup"))
    assert out.status is None
    assert out.error is not None
    assert "MAS_BACKUP_RESTIC_JSON" in out.error
    bad = await agent.invoke("check_backups", {},
                             Context.offline("backup", settings={"max_age_h": "-1"}))
    assert bad.error is not None
    assert bad.error.startswith("bad setting MAS_BACKUP_MAX_AGE_H")


def restic(*args: str, repo: Path) -> bytes:
    env = {**os.environ, "RESTIC_REPOSITORY": str(repo), "RESTIC_PASSWORD": "test-only",
           "RESTIC_CACHE_DIR": str(repo.parent / "cache")}
    return subprocess.run(["restic", *args], env=env, check=True, capture_output=True,
                          timeout=60).stdout


@pytest.mark.skipif(shutil.which("restic") is None,
                    reason="restic is not installed (apt-get install restic); the fixtures "
                           "cover its output format")
def test_real_restic_output(tmp_path: Path) -> None:
    source, repo = tmp_path / "data", tmp_path / "repo"
    backup_file(source, "notes.txt", datetime.now(UTC))
    restic("init", repo=repo)
    restic("backup", "--tag", "nightly", str(source), repo=repo)
    restic("backup", str(source), repo=repo)
    out = tmp_path / "snapshots.json"
    out.write_bytes(restic("snapshots", "--json", repo=repo))
    reports = by_name(check(settings(restic_json=out, unchanged_days=1), datetime.now(UTC)))
    [name] = [n for n in reports if n != "restic"]
    assert name.endswith(f":{source}")
    assert reports[name].status == "ok"
    assert reports[name].details["snapshots"] == 2
    grouped = restic("snapshots", "--json", "--group-by", "host", repo=repo)
    assert len(parse_snapshots(grouped)) == 2


@pytest.mark.broker
async def test_the_running_agent_answers_and_publishes_a_transition(
        tmp_path: Path, broker: RunningBroker, connect_as: ConnectAs) -> None:
    orch, caller = await commander(connect_as)
    events = await collect(orch, "mas.event.backup.>")
    folder = tmp_path / "dumps"
    backup_file(folder, "db.sql.gz", datetime.now(UTC) - timedelta(hours=1))
    fast = dataclasses.replace(agent, polls=[dataclasses.replace(p, seconds=0.05, jitter=0)
                                             for p in agent.polls])
    async with serving(fast, broker.secrets, broker.url,
                       settings={"watch_dir": str(folder), "interval_min": "0.5"}):
        reply = await caller.call("backup", "check_backups", {})
        assert isinstance(reply, Completed), reply
        assert reply.output["status"] == "ok"
        out = CheckBackupsOut.model_validate(reply.output)
        assert [r.name for r in out.backups] == [f"folder:{folder}"]
        await eventually(lambda: schedule.last is not None, timeout=5, what="the first poll")
        assert events == []
        os.remove(folder / "db.sql.gz")
        schedule.last = None  # next tick checks again
        await eventually(lambda: bool(events), timeout=5, what="a failing event")
        [msg] = events
        assert (msg.subject, msg.sender) == ("mas.event.backup.failing", "backup")
        event = BackupEvent.model_validate_json(msg.data)
        assert event.explanation.reason == "the folder holds no backup files."
