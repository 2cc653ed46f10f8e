"""The backup agent: ``check_backups`` on request, and a periodic check that publishes
``mas.event.backup.late`` / ``.failing`` / ``.ok`` when a backup's status changes."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from pydantic import ValidationError

from agents.backup.check import check
from agents.backup.models import CheckBackupsIn, CheckBackupsOut, worst
from agents.backup.settings import BackupSettings
from agents.backup.transitions import Schedule, Transitions
from agents.runtime import Agent, Context

agent = Agent("backup", version="1.0.0", kind="polling",
              description="Checks backup freshness and health (restic snapshots, file "
                          "timestamps).")
TICK_S = 30.0
NOTHING = "no backup source configured: set MAS_BACKUP_RESTIC_JSON or MAS_BACKUP_WATCH_DIR"
transitions = Transitions()
schedule = Schedule()


def _settings(ctx: Context) -> BackupSettings | str:
    try:
        return BackupSettings.load(ctx.settings)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = "MAS_BACKUP_" + str(first["loc"][0] if first["loc"] else "").upper()
        return f"bad setting {name}: {first['msg']}"


@agent.action(description="Report each backup's age and health.")
async def check_backups(args: CheckBackupsIn, ctx: Context) -> CheckBackupsOut:
    """A report only: it does not touch what the periodic check remembers, so it never
    swallows an event."""
    now = datetime.now(UTC)
    settings = _settings(ctx)
    if isinstance(settings, str):
        return CheckBackupsOut(status=None, checked_at=now, error=settings)
    if settings.restic_json is None and settings.watch_dir is None:
        return CheckBackupsOut(status=None, checked_at=now, error=NOTHING)
    reports = await asyncio.to_thread(check, settings, now)
    return CheckBackupsOut(status=worst([r.status for r in reports]), checked_at=now,
                           backups=reports)


@agent.every(TICK_S)
async def watch(ctx: Context) -> None:
    settings = _settings(ctx)
    if isinstance(settings, str):
        ctx.log.warning("backup.not_checked", reason=settings)
        return
    if not schedule.due(settings.interval_min * 60):
        return
    await poll_once(ctx, settings, datetime.now(UTC))


async def poll_once(ctx: Context, settings: BackupSettings, now: datetime) -> None:
    if settings.restic_json is None and settings.watch_dir is None:
        ctx.log.info("backup.not_checked", reason=NOTHING)
        return
    reports = await asyncio.to_thread(check, settings, now)
    for event in transitions.update(reports):
        ctx.log.info("backup.status_changed", backup=event.backup, status=event.status,
                     previous=event.previous)
        await ctx.emit(event.status, event)
