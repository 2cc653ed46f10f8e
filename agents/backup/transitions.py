"""Turning successive checks into events: only a change of status is news.

The last status of each backup is kept in memory. A backup seen late or failing for the
first time, or moving between the two, raises ``late`` / ``failing``; one that was late
or failing and is fine again raises ``ok``. A backup that is fine when first seen (as
after a restart) raises nothing, and an unchanged status is not repeated.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from agents.backup.models import BackupEvent, BackupReport, Status
from protocol.explain import Explanation

CONFIDENCE: dict[Status, float] = {"ok": 0.95, "late": 0.95, "failing": 0.8}


@dataclass
class Transitions:
    last: dict[str, Status] = field(default_factory=dict)

    def update(self, reports: list[BackupReport]) -> list[BackupEvent]:
        events = []
        for report in reports:
            previous = self.last.get(report.name)
            self.last[report.name] = report.status
            if report.status != previous and (report.status != "ok" or previous is not None):
                events.append(BackupEvent(backup=report.name, status=report.status,
                                          previous=previous, report=report,
                                          explanation=explain(report, previous)))
        for gone in self.last.keys() - {r.name for r in reports}:
            del self.last[gone]
        return events


@dataclass
class Schedule:
    """Runs at most every ``interval_s`` (the poll ticks faster so that the interval can
    be a setting read at run time)."""

    last: float | None = None

    def due(self, interval_s: float, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if self.last is not None and now - self.last < interval_s:
            return False
        self.last = now
        return True


def explain(report: BackupReport, previous: Status | None) -> Explanation:
    age = "never" if report.age_h is None else f"{report.age_h:g} h ago"
    if report.status == "ok":
        summary = f"Backup {report.name} is healthy again (last one {age})"
        reason = f"It was {previous}; the newest backup is within {report.max_age_h:g} h."
    elif report.status == "late":
        summary = f"Backup {report.name} is late (last one {age})"
        reason = "; ".join(report.problems) + ". Check the job that makes it."
    else:
        summary = f"Backup {report.name} is failing"
        reason = "; ".join(report.problems) + "."
    data = {"backup": report.name, "status": report.status, "previous": previous,
            "age_h": report.age_h, "max_age_h": report.max_age_h,
            "problems": list(report.problems), **report.details}
    return Explanation(summary=summary[:200], reason=reason[:2000], data=data,
                       confidence=CONFIDENCE[report.status])
