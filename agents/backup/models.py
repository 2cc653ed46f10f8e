"""The backup agent's reports, action input and output, and events."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from protocol.explain import Explanation

Status = Literal["ok", "late", "failing"]
SEVERITY: dict[Status, int] = {"ok": 0, "late": 1, "failing": 2}


class BackupReport(BaseModel):
    """One backup (a restic host and path set, or the watched folder), or the restic
    snapshot list itself (``name == "restic"``: is it readable and recent?)."""

    model_config = ConfigDict(frozen=True)

    name: str
    source: Literal["restic", "folder"]
    status: Status
    age_h: float | None = None  # since the newest backup (for "restic": since it was written)
    last_backup: datetime | None = None
    max_age_h: float
    problems: list[str] = Field(default_factory=list)  # why it is not ok
    details: dict[str, JsonValue] = Field(default_factory=dict)


class CheckBackupsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CheckBackupsOut(BaseModel):
    status: Status | None  # the worst of all backups; None when nothing was checked
    checked_at: datetime
    backups: list[BackupReport] = Field(default_factory=list)
    error: str | None = None  # nothing to check, or a bad setting


class BackupEvent(BaseModel):
    """``mas.event.backup.<status>``, published when a backup's status changes."""

    model_config = ConfigDict(frozen=True)

    backup: str
    status: Status
    previous: Status | None
    report: BackupReport
    explanation: Explanation


def worst(statuses: list[Status]) -> Status:
    return max(statuses, key=SEVERITY.__getitem__, default="ok")
