"""Event and schedule triggers: the repository's YAML workflows start themselves.

A workflow file may say ``event: mas.event.backup.late`` or ``schedule: daily 08:00``
(see ``planners.workflow_files``). This module decides *when* one starts; the engine
runs it like any other plan, through the same validation, tokens and approvals.

- Events arrive as signed envelopes on ``mas.event.>``; the sender must be the agent the
  subject names (the broker already enforces that; this is the second check, so a
  broker misconfiguration alone does not let one agent trigger as another).
- An event starts a workflow only if the same workflow, started by an event, is not
  still in flight: a burst of events cannot queue up a burst of workflows.
- Schedules are looked at every ``TICK_S``; a firing missed while the orchestrator was
  down is not made up afterwards (a morning check at noon helps nobody).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Protocol

import structlog

from broker.connection import SignedMessage
from orchestrator.planners.workflow_files import Workflow as WorkflowFile
from orchestrator.workflows import Workflow

log = structlog.get_logger("mas.orchestrator")
TICK_S = 20.0
EVENTS = "mas.event.>"
EVENT_PREFIX = "mas.event."


class Library(Protocol):
    """Where the workflow files come from (the offline planner holds them)."""

    def for_event(self, subject: str) -> list[WorkflowFile]: ...

    def due(self, start: datetime, end: datetime) -> list[WorkflowFile]: ...


Launch = Callable[[WorkflowFile, str, str | None], Awaitable[Workflow]]
Lookup = Callable[[str], Awaitable[Workflow | None]]


def event_sender_ok(subject: str, sender: str) -> bool:
    """``mas.event.<agent>.…`` may come only from ``<agent>``."""
    parts = subject.split(".")
    return len(parts) >= 4 and subject.startswith(EVENT_PREFIX) and parts[2] == sender


class Triggers:
    def __init__(self, library: Library, launch: Launch, lookup: Lookup, *,
                 now: Callable[[], datetime] = lambda: datetime.now().astimezone()) -> None:
        self.library = library
        self.launch = launch
        self.lookup = lookup
        self.now = now
        self.last_tick = now()
        self._by_event: dict[str, str] = {}  # workflow name -> id of its event-started run
        self._lock = asyncio.Lock()

    async def on_event(self, msg: SignedMessage) -> list[Workflow]:
        if not event_sender_ok(msg.subject, msg.sender):
            log.warning("orchestrator.event_sender_mismatch", subject=msg.subject,
                        sender=msg.sender)
            return []
        started = []
        async with self._lock:  # one decision at a time, so two events cannot both start it
            for file in self.library.for_event(msg.subject):
                running = self._by_event.get(file.name)
                if running is not None:
                    wf = await self.lookup(running)
                    if wf is not None and not wf.finished:
                        log.info("orchestrator.trigger_skipped", workflow=file.name,
                                 subject=msg.subject, running=running)
                        continue
                wf = await self.launch(file, f"event {msg.subject}", msg.trace_id)
                self._by_event[file.name] = wf.id
                started.append(wf)
        return started

    async def tick(self) -> list[Workflow]:
        """Start every workflow whose schedule fired since the last tick."""
        now = self.now()
        start, self.last_tick = self.last_tick, now
        return [await self.launch(file, f"schedule at {now.isoformat(timespec='minutes')}",
                                  None)
                for file in self.library.due(start, now)]

    async def run_schedule(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                await self.tick()
            except Exception as exc:  # one bad tick must not stop every later one
                log.warning("orchestrator.schedule_failed", error=type(exc).__name__)
