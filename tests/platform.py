"""The platform most orchestrator tests run against: the real orchestrator and the test
notify agent (``tests.test_runtime.make_agent``) on a broker of the test's own, and an
operator talking to them through the admin API.

One place starts and stops it, so the orchestrator, resilience and approvals-watch tests
(and the ``platform`` fixture in tests/conftest.py) all set it up the same way.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from agents.runtime.service import AgentService
from broker.connection import BrokerClient
from broker.secrets import load_identity
from orchestrator.plan import Plan, Step
from orchestrator.service import Orchestrator
from orchestrator.workflows import Workflow
from protocol import admin
from protocol.approvals import Approval, ApprovalList
from security.decisions import sign_decision
from security.keys import SigningKey
from tests.conftest import RunningBroker, eventually
from tests.test_runtime import Seen, make_agent


async def start_orchestrator(broker: RunningBroker, **options: Any) -> Orchestrator:
    """The real orchestrator with the project's policy and its own credentials, started;
    ``options`` go to :class:`Orchestrator` (planner, approval_ttl_s, ...)."""
    orch = Orchestrator(broker.project.policy(), load_identity(broker.secrets, "orchestrator"),
                        broker.url, **options)
    await orch.start()
    return orch


@dataclass
class Platform:
    broker: RunningBroker
    orch: Orchestrator
    operator: BrokerClient
    agent: AgentService
    seen: Seen

    async def restart_orchestrator(self, **options: Any) -> None:
        await self.orch.stop()
        self.orch = await start_orchestrator(self.broker, **options)

    async def admin(self, subject: str, payload: BaseModel | dict[str, object]) -> bytes:
        data = payload if isinstance(payload, BaseModel) else json.dumps(payload).encode()
        reply = await self.operator.request(subject, data, timeout=10)
        assert reply.sender == "orchestrator"
        return reply.data

    async def decide(self, approval: Approval, decision: str = "approve", *,
                     key: SigningKey | None = None, args_hash: str | None = None) -> bytes:
        signed = sign_decision(
            key or load_identity(self.broker.secrets, "operator").signing_key,
            approval_id=approval.id, args_sha256=args_hash or approval.args_sha256,
            decision=decision, reason="checked it", by="operator")  # type: ignore[arg-type]
        return await self.admin(admin.APPROVALS_DECIDE, signed)

    async def run_plan(self, *steps: Step) -> Workflow:
        wf = await self.orch.engine.submit("test", Plan(steps=list(steps), planner="test"))
        return await self.orch.engine.advance(wf.id)

    async def pending(self) -> Approval:
        data = await self.admin(admin.APPROVALS_LIST, {"status": "pending"})
        [approval] = ApprovalList.model_validate_json(data).approvals
        return approval

    async def workflow(self, workflow_id: str) -> Workflow:
        wf = await self.orch.engine.load(workflow_id)
        assert wf is not None
        return wf


@asynccontextmanager
async def running_platform(broker: RunningBroker, operator: BrokerClient
                           ) -> AsyncIterator[Platform]:
    """The orchestrator and the notify agent, once the orchestrator has accepted the
    agent's registration; ``operator`` is the caller's (it decides how it reconnects and
    closes it). Stops both afterwards, releasing any handler still held on ``seen.gate``."""
    orch = await start_orchestrator(broker)
    seen = Seen()
    agent = AgentService(make_agent("notify", seen), load_identity(broker.secrets, "notify"),
                         broker.url)
    await agent.start()
    plat = Platform(broker, orch, operator, agent, seen)
    try:
        await eventually(lambda: plat.agent.registration is not None, timeout=10,
                         what="notify registered and acknowledged")
        yield plat
    finally:
        seen.gate.set()
        await plat.agent.stop()
        await plat.orch.stop()
