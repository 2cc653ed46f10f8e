"""Judging a folder that backups are written into, by its files' timestamps.

The folder is one backup: its age is that of the newest file anywhere under it (hidden
files, such as rsync's or a dump's temporary files, are skipped; symlinks are not
followed). It is **failing** when the folder is missing or unreadable, holds no files,
or its newest file is empty (a dump that died before writing anything); **late** when
the newest file is older than ``max_age_h``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from agents.backup.models import BackupReport, Status
from agents.backup.restic import hours
from agents.backup.settings import BackupSettings

MAX_ENTRIES = 100_000  # a bound on one scan's work


@dataclass
class Newest:
    path: str = ""
    mtime: float = 0.0
    size: int = 0
    files: int = 0
    entries: int = 0
    unreadable: int = 0


def scan(root: Path) -> Newest:
    """The newest regular file under ``root``; raises ``OSError`` if root is unreadable."""
    found = Newest()
    pending = [str(root)]
    os.scandir(root).close()  # the root itself must be readable
    while pending and found.entries < MAX_ENTRIES:
        try:
            with os.scandir(pending.pop()) as entries:
                for entry in entries:
                    found.entries += 1
                    if entry.name.startswith("."):
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(entry.path)
                    elif entry.is_file(follow_symlinks=False):
                        stat = entry.stat(follow_symlinks=False)
                        found.files += 1
                        if stat.st_mtime > found.mtime:
                            found.path = os.path.relpath(entry.path, root)
                            found.mtime, found.size = stat.st_mtime, stat.st_size
        except OSError:
            found.unreadable += 1
    return found


def assess_folder(root: Path, settings: BackupSettings, now: datetime) -> BackupReport:
    name = f"folder:{root}"
    try:
        newest = scan(root)
    except OSError as exc:
        return BackupReport(name=name, source="folder", status="failing",
                            max_age_h=settings.max_age_h,
                            problems=[f"cannot read the folder: "
                                      f"{exc.strerror or type(exc).__name__}"])
    details = {"files": newest.files, "newest_file": newest.path,
               "newest_size": newest.size, "complete_scan": newest.entries < MAX_ENTRIES,
               "unreadable_dirs": newest.unreadable}
    if newest.files == 0:
        return BackupReport(name=name, source="folder", status="failing",
                            max_age_h=settings.max_age_h, details=details,
                            problems=["the folder holds no backup files"])
    last = datetime.fromtimestamp(newest.mtime, UTC)
    age = hours(now - last)
    problems = []
    status: Status = "ok"
    if newest.size == 0:
        status = "failing"
        problems.append(f"the newest file ({newest.path}) is empty")
    if age > settings.max_age_h:
        status = "failing" if status == "failing" else "late"
        problems.append(f"the newest file is {age:g} h old, more than {settings.max_age_h:g} h")
    return BackupReport(name=name, source="folder", status=status, age_h=age, last_backup=last,
                        max_age_h=settings.max_age_h, problems=problems, details=details)
