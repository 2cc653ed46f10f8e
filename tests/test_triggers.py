"""Workflow files start themselves: an agent's event or a schedule starts a workflow on a
real broker, through the same engine, tokens and audit as a manual run."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agents.runtime.service import AgentService
from broker.secrets import load_identity
from orchestrator.planners.offline import OfflinePlanner
from orchestrator.service import Orchestrator
from tests.conftest import ConnectAs, RunningBroker, eventually, wait_for_violation
from tests.test_orchestrator import audit_records
from tests.test_runtime import Seen, make_agent

pytestmark = pytest.mark.broker

WORKFLOWS = {
    "on-late": """
name: on-late
description: Tell the owner when a backup is late.
triggers:
  - event: mas.event.backup.late
steps:
  - id: tell
    agent: notify
    action: notify_owner
    args: {text: "%s"}
""",
    "every-minute": """
name: every-minute
description: A heartbeat of the owner's own.
triggers:
  - schedule: every 1m
steps:
  - id: tick
    agent: notify
    action: notify_owner
    args: {text: "tick"}
""",
}


@pytest.fixture
def workflows(tmp_path: Path) -> Path:
    folder = tmp_path / "workflows"
    folder.mkdir()
    for name, text in WORKFLOWS.items():
        (folder / f"{name}.yaml").write_text(text % "slow" if name == "on-late" else text)
    return folder


@pytest.fixture
async def running(fresh_broker: RunningBroker, workflows: Path
                  ) -> AsyncIterator[tuple[Orchestrator, Seen]]:
    orch = Orchestrator(fresh_broker.project.policy(),
                        load_identity(fresh_broker.secrets, "orchestrator"), fresh_broker.url,
                        planner=OfflinePlanner(workflows))
    await orch.start()
    seen = Seen()
    agent = AgentService(make_agent("notify", seen), load_identity(fresh_broker.secrets, "notify"),
                         fresh_broker.url)
    await agent.start()
    await eventually(lambda: agent.registration is not None, timeout=5, what="registration")
    yield orch, seen
    seen.gate.set()
    await agent.stop()
    await orch.stop()


async def test_an_event_starts_its_workflow_once_while_it_is_in_flight(
        running: tuple[Orchestrator, Seen], connect_fresh: ConnectAs) -> None:
    orch, seen = running
    backup = await connect_fresh("backup")
    for _ in range(5):  # a burst: the first run is held in its step by the gate
        await backup.publish("mas.event.backup.late", b'{"name": "photos"}')
    await eventually(lambda: seen.calls == [("notify_owner", "slow")], timeout=10,
                     what="the triggered step")
    await asyncio.sleep(0.3)
    assert seen.calls == [("notify_owner", "slow")]
    seen.gate.set()

    async def finished() -> bool:
        return all(wf.finished for wf in await orch.engine.all())

    for _ in range(200):
        if await finished():
            break
        await asyncio.sleep(0.05)
    [wf] = await orch.engine.all()
    assert (wf.status, wf.planner) == ("completed", "offline/on-late")
    assert wf.request.startswith("event mas.event.backup.late")

    await backup.publish("mas.event.backup.late", b"{}")  # the first run is over: a new one
    await eventually(lambda: len(seen.calls) == 2, timeout=10, what="the second run")
    trail = [(r.kind, r.action, r.detail.get("workflow")) for r in await audit_records(orch.client)
             if r.kind == "workflow" and r.action == "trigger"]
    assert trail == [("workflow", "trigger", "on-late")] * 2


async def test_an_agent_cannot_trigger_in_another_agents_name(
        running: tuple[Orchestrator, Seen], connect_fresh: ConnectAs) -> None:
    orch, seen = running
    health = await connect_fresh("health")
    await health.publish("mas.event.backup.late", b"{}")
    await wait_for_violation(health, "publish", "mas.event.backup.late")
    await asyncio.sleep(0.3)
    assert seen.calls == []
    assert await orch.engine.all() == []


async def test_a_schedule_fires_once_per_period_and_not_for_time_missed(
        running: tuple[Orchestrator, Seen]) -> None:
    orch, seen = running
    start = datetime(2026, 11, 25, 9, 0, 30, tzinfo=UTC)
    clock = [start + timedelta(seconds=40)]
    orch.triggers.now = lambda: clock[0]
    orch.triggers.last_tick = start
    [wf] = await orch.triggers.tick()  # 09:00:30 -> 09:01:10 crosses 09:01:00
    assert wf.planner == "offline/every-minute"
    assert await orch.triggers.tick() == []  # same moment: nothing new
    clock[0] = start + timedelta(seconds=50)
    assert await orch.triggers.tick() == []  # 09:01:20: not yet the next minute
    await eventually(lambda: seen.calls == [("notify_owner", "tick")], timeout=10,
                     what="the scheduled step")
