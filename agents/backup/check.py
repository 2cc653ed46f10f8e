"""One check of every configured source: the restic snapshot list and the watched folder.

The snapshot list is reported on itself too, as the backup named ``restic``: failing
when it is missing, unreadable or empty, late when the cron job stopped rewriting it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from agents.backup.folder import assess_folder
from agents.backup.models import BackupReport, Status
from agents.backup.restic import ResticOutputError, assess, hours, parse_snapshots
from agents.backup.settings import BackupSettings

MAX_JSON_BYTES = 32 * 1024 * 1024
RESTIC = "restic"


def check(settings: BackupSettings, now: datetime) -> list[BackupReport]:
    """Blocking file reads: run it in a thread."""
    reports: list[BackupReport] = []
    if settings.restic_json is not None:
        reports += restic_reports(settings.restic_json, settings, now)
    if settings.watch_dir is not None:
        reports.append(assess_folder(settings.watch_dir, settings, now))
    return reports


def restic_reports(path: Path, settings: BackupSettings, now: datetime) -> list[BackupReport]:
    def source(status: Status, problems: list[str], age_h: float | None = None,
               snapshots: int | None = None) -> BackupReport:
        return BackupReport(name=RESTIC, source="restic", status=status, age_h=age_h,
                            max_age_h=settings.max_age_h, problems=problems,
                            details={} if snapshots is None else {"snapshots": snapshots})

    try:
        with path.open("rb") as f:
            written = datetime.fromtimestamp(path.stat().st_mtime, UTC)
            raw = f.read(MAX_JSON_BYTES + 1)
    except OSError as exc:
        return [source("failing", [f"cannot read the snapshot list {path}: "
                                   f"{exc.strerror or type(exc).__name__}"])]
    age = hours(now - written)
    if len(raw) > MAX_JSON_BYTES:
        return [source("failing", [f"the snapshot list is larger than {MAX_JSON_BYTES} bytes"],
                       age_h=age)]
    try:
        snapshots = parse_snapshots(raw)
    except ResticOutputError as exc:
        return [source("failing", [f"the snapshot list cannot be read: {exc}"], age_h=age)]
    if not snapshots:
        return [source("failing", ["restic lists no snapshots"], age_h=age)]
    stale = age > settings.max_age_h
    problems = [f"the snapshot list was last written {age:g} h ago: is the cron job that "
                "runs `restic snapshots --json` still running?"] if stale else []
    listed = source("late" if stale else "ok", problems, age_h=age, snapshots=len(snapshots))
    return [listed, *assess(snapshots, settings, now)]
