"""A step whose agent does not answer is sent again a bounded number of times, each retry
audited, with the same idempotency key; an agent that comes back in time runs it once."""

from __future__ import annotations

import asyncio

import pytest

from agents.runtime.service import AgentService
from broker.secrets import load_identity
from orchestrator import engine
from orchestrator.plan import Plan, Step
from tests.conftest import RunningBroker
from tests.platform import Platform
from tests.test_orchestrator import audit_records
from tests.test_runtime import Seen, make_agent

pytestmark = pytest.mark.broker
NOTE = Step(id="s1", agent="notify", action="notify_owner", args={"text": "hello"})


@pytest.fixture(autouse=True)
def _quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "RETRY_DELAY_S", 0.3)


async def test_an_agent_that_never_answers_fails_the_step_after_bounded_audited_retries(
        platform: Platform) -> None:
    await platform.agent.stop()
    wf = await platform.run_plan(NOTE)

    step = wf.steps["s1"]
    assert (wf.status, step.status, step.code) == ("failed", "failed", "unreachable")
    assert step.attempts == engine.MAX_ATTEMPTS
    trail = [r for r in await audit_records(platform.operator) if r.workflow_id == wf.id
             and r.kind == "command"]
    assert [(r.outcome, r.code) for r in trail] == [
        ("pending", ""), ("error", "retrying"), ("pending", ""), ("error", "retrying"),
        ("pending", ""), ("error", "unreachable")]
    assert platform.seen.calls == []


async def test_an_agent_back_within_the_retries_runs_the_step_once(
        platform: Platform, fresh_broker: RunningBroker,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "RETRY_DELAY_S", 3.0)  # room for the agent to start
    await platform.agent.stop()
    wf = await platform.orch.engine.submit("test", Plan(steps=[NOTE], planner="test"))
    task = platform.orch.engine.start(wf.id)
    retried: list[str] = []

    async def first_attempt_failed() -> None:
        while not retried:
            trail = await audit_records(platform.operator)
            retried.extend(r.code for r in trail if r.code == "retrying")
            await asyncio.sleep(0.05)

    await asyncio.wait_for(first_attempt_failed(), 10)
    seen = Seen()
    agent = AgentService(make_agent("notify", seen), load_identity(fresh_broker.secrets, "notify"),
                         fresh_broker.url)
    await agent.start()
    try:
        done = await asyncio.wait_for(task, 30)
        assert done.status == "completed", done
        assert done.steps["s1"].attempts >= 2
        assert seen.calls == [("notify_owner", "hello")]
    finally:
        await agent.stop()


async def test_advancing_a_finished_or_rejected_workflow_changes_nothing(
        platform: Platform) -> None:
    rejected = await platform.orch.engine.submit(
        "test", Plan(steps=[Step(id="s1", agent="notify", action="no_such")], planner="test"))
    assert rejected.status == "rejected"
    again = await platform.orch.engine.advance(rejected.id)
    assert (again.status, again.reason) == ("rejected", rejected.reason)
    done = await platform.run_plan(NOTE)
    assert done.status == "completed"
    assert (await platform.orch.engine.advance(done.id)).steps == done.steps
    assert platform.seen.calls == [("notify_owner", "hello")]
