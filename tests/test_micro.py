"""Discovery through the NATS services API (nats.micro) against a real broker: the operator
finds every running agent and the orchestrator with $SRV.PING/INFO/STATS, each listing
exactly the actions it registered; no identity can answer for another's name."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from nats.aio.msg import Msg
from nats.micro.service import ServiceInfo, ServicePing, ServiceStats

from agents.runtime.service import AgentService
from broker.connection import BrokerClient
from broker.policy import Policy
from broker.secrets import load_identity
from mas.agent_cli import load_agent
from orchestrator.service import Orchestrator
from tests.conftest import ConnectAs, RunningBroker, eventually, settle, wait_for_violation
from tests.platform import start_orchestrator

pytestmark = pytest.mark.broker


async def ask(client: BrokerClient, subject: str, *, expect: int = 1,
              timeout: float = 10.0) -> list[dict[str, Any]]:
    """Every answer to one request on ``subject``: waits for ``expect`` of them, then a
    little longer for any extra."""
    inbox = f"_INBOX_{client.identity}.{uuid.uuid4().hex}"
    answers: list[dict[str, Any]] = []

    async def collect(msg: Msg) -> None:
        answers.append(json.loads(msg.data))

    sub = await client.nc.subscribe(inbox, cb=collect)
    await settle(client)
    await client.nc.publish(subject, b"", reply=inbox)
    try:
        await eventually(lambda: len(answers) >= expect, timeout=timeout,
                         what=f"{expect} answers on {subject}")
        await client.nc.flush()
        await asyncio.sleep(0.3)
    finally:
        await sub.unsubscribe()
    return answers


@dataclass
class Running:
    policy: Policy
    orch: Orchestrator
    agents: dict[str, list[AgentService]]
    operator: BrokerClient


@pytest.fixture
async def running(fresh_broker: RunningBroker, connect_fresh: ConnectAs
                  ) -> AsyncIterator[Running]:
    orch = await start_orchestrator(fresh_broker)
    policy = orch.policy
    agents: dict[str, list[AgentService]] = {}
    for name in sorted(policy.agents):
        for _ in range(2 if name == "home" else 1):
            service = AgentService(load_agent(name), load_identity(fresh_broker.secrets, name),
                                   fresh_broker.url, register=False)
            await service.start()
            agents.setdefault(name, []).append(service)
    operator = await connect_fresh("operator")
    yield Running(policy, orch, agents, operator)
    for services in agents.values():
        for service in services:
            await service.stop()
    await orch.stop()


async def test_the_operator_discovers_every_agent_with_its_registered_actions(
    running: Running,
) -> None:
    for name, services in running.agents.items():
        agent = services[0].agent
        answers = await ask(running.operator, f"$SRV.INFO.{name}", expect=len(services))
        assert len(answers) == len(services)
        infos = [ServiceInfo.from_dict(a) for a in answers]
        assert {i.id for i in infos} == {s.discovery.id for s in services if s.discovery}
        for info in infos:
            assert (info.name, info.version) == (name, agent.version)
            assert info.metadata["kind"] == agent.kind
            listed = {e.name: e for e in info.endpoints}
            assert set(listed) == set(agent.actions) == set(running.policy.agents[name].actions)
            for action, definition in agent.actions.items():
                endpoint = listed[action]
                assert endpoint.subject == f"mas.agent.{name}.{action}"
                assert endpoint.queue_group == name
                assert endpoint.metadata is not None
                assert endpoint.metadata["sensitive"] == str(definition.sensitive).lower()
                assert definition.sensitive == running.policy.agents[name].actions[action].sensitive
                assert endpoint.metadata["description"] == definition.description
                assert json.loads(endpoint.metadata["schema"]) == \
                    definition.input_model.model_json_schema()


async def test_every_replica_answers_a_ping_for_its_name(running: Running) -> None:
    answers = await ask(running.operator, "$SRV.PING.home", expect=2)
    pings = [ServicePing.from_dict(a) for a in answers]
    assert len(pings) == 2
    assert {p.name for p in pings} == {"home"}
    one = running.agents["home"][0].discovery
    assert one is not None
    only = await ask(running.operator, f"$SRV.PING.home.{one.id}")
    assert [ServicePing.from_dict(a).id for a in only] == [one.id]


async def test_the_orchestrator_is_discoverable_and_counts_its_requests(
    running: Running,
) -> None:
    (info,) = [ServiceInfo.from_dict(a)
               for a in await ask(running.operator, "$SRV.INFO.orchestrator")]
    assert info.name == "orchestrator"
    subjects = {e.subject for e in info.endpoints}
    assert {"mas.orch.register", "mas.orch.token.request"} <= subjects


async def test_one_bare_ping_from_the_operator_reaches_every_service(running: Running) -> None:
    """$SRV.PING crosses into every agent account (one import of the same subject from
    each), so `nats micro ls` run as the operator lists the whole platform."""
    instances = 1 + sum(len(s) for s in running.agents.values())
    answers = await ask(running.operator, "$SRV.PING", expect=instances)
    assert len(answers) == instances
    assert {a["name"] for a in answers} == {"orchestrator", *running.policy.agents}


async def test_stats_count_the_commands_an_agent_served(running: Running) -> None:
    reply = await running.orch.caller.call("anomaly", "recent_alerts", {"limit": 5})
    assert reply.status == "ok"
    (stats,) = [ServiceStats.from_dict(a)
                for a in await ask(running.operator, "$SRV.STATS.anomaly")]
    (endpoint,) = [e for e in stats.endpoints if e.name == "recent_alerts"]
    assert endpoint.num_requests == 1
    assert endpoint.num_errors == 0
    assert endpoint.processing_time > 0


@pytest.mark.parametrize("subject", [
    "$SRV.INFO.notify", "$SRV.PING.notify.x", "$SRV.STATS.orchestrator", "$SRV.>",
])
async def test_an_agent_cannot_answer_for_another_name(
    fresh_broker: RunningBroker, connect_fresh: ConnectAs, subject: str,
) -> None:
    """home subscribes to another service's discovery subject: refused by the broker, and
    a request for that name finds nobody to answer it."""
    rogue, operator = await connect_fresh("home"), await connect_fresh("operator")

    async def lie(msg: Msg) -> None:
        await msg.respond(json.dumps({"name": "notify", "endpoints": []}).encode())

    await rogue.nc.subscribe(subject, cb=lie)
    await wait_for_violation(rogue, "subscription", subject)
    asked = subject.replace(">", "INFO.notify")
    with pytest.raises(AssertionError, match="answers"):
        await ask(operator, asked, timeout=1.5)


async def test_an_agent_cannot_send_discovery_requests(
    fresh_broker: RunningBroker, connect_fresh: ConnectAs,
) -> None:
    rogue = await connect_fresh("home")
    await rogue.nc.publish("$SRV.INFO.notify", b"")
    await wait_for_violation(rogue, "publish", "$SRV.INFO.notify")
