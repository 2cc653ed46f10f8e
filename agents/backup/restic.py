"""Reading ``restic snapshots --json`` and judging each backup it lists.

A backup is one (hostname, path set): the snapshots restic groups by default. Besides
its age, a backup is **failing** when its newest snapshot's summary (restic 0.17 and
later record one) shows that

- it processed no files at all: the source was empty, typically an unmounted disk;
- it processed less than ``shrink_ratio`` of the bytes the snapshot before it did: a
  large part of the source went missing;
- (only with ``unchanged_days`` set) no file was new or changed for that many days:
  the backup keeps copying a source that no longer changes, such as a stale mount.

Snapshots without a summary (restic before 0.17) are judged by age alone.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from itertools import groupby
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from agents.backup.models import BackupReport, Status
from agents.backup.settings import BackupSettings


class ResticOutputError(ValueError):
    pass


class Summary(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    backup_start: datetime | None = None
    backup_end: datetime | None = None
    files_new: int = 0
    files_changed: int = 0
    files_unmodified: int = 0
    dirs_new: int = 0
    dirs_changed: int = 0
    dirs_unmodified: int = 0
    data_blobs: int = 0
    tree_blobs: int = 0
    data_added: int = 0
    data_added_packed: int = 0
    total_files_processed: int = 0
    total_bytes_processed: int = 0


class Snapshot(BaseModel):
    """One entry as restic prints it; restic omits empty fields (uid 0, no tags...)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    time: datetime
    parent: str | None = None
    tree: str
    paths: list[str]
    hostname: str = ""
    username: str = ""
    uid: int = 0
    gid: int = 0
    excludes: list[str] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)
    program_version: str | None = None
    summary: Summary | None = None
    id: str
    short_id: str

    @field_validator("time")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)

    @property
    def key(self) -> str:
        return f"restic:{self.hostname or '?'}:{','.join(sorted(self.paths))}"


SNAPSHOTS = TypeAdapter(list[Snapshot])


def parse_snapshots(raw: bytes) -> list[Snapshot]:
    """Plain ``restic snapshots --json`` output, or its ``--group-by`` form."""
    try:
        data: Any = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ResticOutputError("it is not JSON (was it written while being read?)") from exc
    if isinstance(data, list) and data and all(
            isinstance(g, dict) and "group_key" in g for g in data):
        data = [s for g in data for s in (g.get("snapshots") or [])]
    try:
        return SNAPSHOTS.validate_python(data)
    except ValidationError as exc:
        raise ResticOutputError(
            f"it is not a restic snapshot list ({exc.error_count()} problems)") from None


def hours(delta: timedelta) -> float:
    return round(max(delta.total_seconds(), 0.0) / 3600, 2)


def assess(snapshots: list[Snapshot], settings: BackupSettings,
           now: datetime) -> list[BackupReport]:
    ordered = sorted(snapshots, key=lambda s: (s.key, s.time))
    return [_assess_one(key, list(group), settings, now)
            for key, group in groupby(ordered, key=lambda s: s.key)]


def _assess_one(key: str, history: list[Snapshot], settings: BackupSettings,
                now: datetime) -> BackupReport:
    newest = history[-1]
    age = hours(now - newest.time)
    late = age > settings.max_age_h
    failures = _failures(history, settings, now)
    problems = failures + ([f"the newest snapshot is {age:g} h old, more than "
                            f"{settings.max_age_h:g} h"] if late else [])
    status: Status = "failing" if failures else "late" if late else "ok"
    details: dict[str, Any] = {"snapshot": newest.short_id, "hostname": newest.hostname,
                               "paths": list(newest.paths), "snapshots": len(history)}
    if newest.summary is not None:
        details.update(files=newest.summary.total_files_processed,
                       bytes=newest.summary.total_bytes_processed,
                       files_new=newest.summary.files_new,
                       files_changed=newest.summary.files_changed)
    return BackupReport(name=key, source="restic", status=status, age_h=age,
                        last_backup=newest.time, max_age_h=settings.max_age_h,
                        problems=problems, details=details)


def _failures(history: list[Snapshot], settings: BackupSettings, now: datetime) -> list[str]:
    newest = history[-1].summary
    if newest is None:
        return []
    problems = []
    if newest.total_files_processed == 0:
        problems.append("the newest snapshot backed up no files (is the source mounted?)")
    previous = history[-2].summary if len(history) > 1 else None
    if (previous is not None and previous.total_bytes_processed > 0 and newest.total_files_processed
            and newest.total_bytes_processed
            < settings.shrink_ratio * previous.total_bytes_processed):
        share = newest.total_bytes_processed / previous.total_bytes_processed
        problems.append(f"the newest snapshot covers {share:.0%} of the bytes the one before "
                        "it did (did part of the source go missing?)")
    if settings.unchanged_days is not None:
        quiet = _unchanged_for(history, now)
        if quiet is not None and quiet > timedelta(days=settings.unchanged_days):
            problems.append(f"no file was new or changed for {quiet.days} days "
                            "(is the backup reading a stale copy?)")
    return problems


def _unchanged_for(history: list[Snapshot], now: datetime) -> timedelta | None:
    """How long since the last snapshot that saw a new or changed file; None when the
    recent snapshots carry no summary to tell."""
    since = None
    for snap in reversed(history):
        if snap.summary is None:
            return None
        since = snap.time
        if snap.summary.files_new or snap.summary.files_changed:
            break
    return None if since is None else now - since
