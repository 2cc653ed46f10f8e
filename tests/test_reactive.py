"""Durable events against a real broker: what an agent subscribes to is kept in a stream of
its own account and read through one durable consumer its replicas share, so events
published while it is down are handled when it is back, once, and a failing handler gets
a bounded number of retries. Nobody else can read or steer that stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import nats.errors
import pytest
from pydantic import BaseModel
from structlog.testing import capture_logs

from agents.runtime import Agent, Context, Event
from agents.runtime.feed import FeedSettings
from agents.runtime.service import AgentService
from broker import subjects as subj
from broker.connection import BrokerClient
from broker.secrets import load_identity
from tests.conftest import (
    ConnectAs,
    RunningBroker,
    commander,
    eventually,
    settle,
    wait_for_violation,
)

pytestmark = pytest.mark.broker

STREAM = subj.event_stream("home")
REFUSED = (nats.errors.TimeoutError, nats.errors.NoRespondersError, TimeoutError)


class Nothing(BaseModel):
    pass


class BreakDue(BaseModel):
    n: int


@dataclass
class Handled:
    events: list[tuple[str, int, str]] = field(default_factory=list)  # subject, n, instance
    fail: dict[int, int] = field(default_factory=dict)  # n -> failures still to raise
    always_fail: set[int] = field(default_factory=set)
    attempts: dict[int, int] = field(default_factory=dict)


def home_agent(handled: Handled, instance: str) -> Agent:
    agent = Agent("home", version="0.0.1", kind="reactive")

    @agent.action(description="Nothing.")
    async def list_states(args: Nothing, ctx: Context) -> Nothing:
        return Nothing()

    @agent.on_event("mas.event.health.>")
    async def on_health(event: Event, ctx: Context) -> None:
        assert event.sender == "health"
        n = BreakDue.model_validate_json(event.data).n
        handled.attempts[n] = handled.attempts.get(n, 0) + 1
        if n in handled.always_fail:
            raise RuntimeError("handler bug")
        if handled.fail.get(n, 0) > 0:
            handled.fail[n] -= 1
            raise RuntimeError("transient")
        handled.events.append((event.subject, n, instance))

    return agent


@dataclass
class Rig:
    broker: RunningBroker
    connect: ConnectAs
    health: BrokerClient
    handled: Handled
    start: Callable[..., Awaitable[AgentService]]


@pytest.fixture
async def rig(fresh_broker: RunningBroker, connect_fresh: ConnectAs) -> AsyncIterator[Rig]:
    await commander(connect_fresh)
    health = await connect_fresh("health")
    handled = Handled()
    running: list[AgentService] = []

    async def start(instance: str = "a", **feed: float) -> AgentService:
        service = AgentService(home_agent(handled, instance),
                               load_identity(fresh_broker.secrets, "home"), fresh_broker.url,
                               register=False, feed=FeedSettings(**feed))  # type: ignore[arg-type]
        await service.start()
        running.append(service)
        return service

    yield Rig(fresh_broker, connect_fresh, health, handled, start)
    for service in running:
        await service.stop()


async def consumer_state(service: AgentService) -> tuple[int, int]:
    """(not yet delivered, delivered but not acknowledged) of the agent's consumer."""
    info = await service.client.nc.jetstream(timeout=3).consumer_info(STREAM, "home")
    return info.num_pending or 0, info.num_ack_pending or 0


async def drained(service: AgentService) -> None:
    deadline = asyncio.get_running_loop().time() + 15
    while await consumer_state(service) != (0, 0):
        assert asyncio.get_running_loop().time() < deadline, await consumer_state(service)
        await asyncio.sleep(0.05)


async def test_an_event_sent_while_the_agent_is_down_is_handled_once_when_it_is_back(
    rig: Rig,
) -> None:
    first = await rig.start()
    await first.stop()
    await rig.health.publish("mas.event.health.break_due", BreakDue(n=1))
    await rig.health.sync()
    assert rig.handled.events == []
    again = await rig.start()
    await eventually(lambda: len(rig.handled.events) == 1, timeout=15, what="the stored event")
    await drained(again)
    assert rig.handled.events == [("mas.event.health.break_due", 1, "a")]
    assert rig.handled.attempts == {1: 1}


async def test_replicas_share_one_consumer_and_handle_each_event_once(rig: Rig) -> None:
    a, b = await rig.start("a"), await rig.start("b")
    for n in range(40):
        await rig.health.publish(f"mas.event.health.tick{n % 3}", BreakDue(n=n))
    await eventually(lambda: len(rig.handled.events) >= 40, timeout=30, what="all events")
    await drained(a)
    assert sorted(n for _, n, _ in rig.handled.events) == list(range(40))
    assert {instance for *_, instance in rig.handled.events} <= {"a", "b"}
    assert b.feed is not None
    assert a.feed is not None


async def test_a_failing_handler_is_retried_then_the_event_is_given_up(rig: Rig) -> None:
    rig.handled.fail[1] = 2  # fails twice, then works
    rig.handled.always_fail.add(2)
    with capture_logs() as logs:
        service = await rig.start(max_deliver=3, retry_s=0.05)
        await rig.health.publish("mas.event.health.x", BreakDue(n=1))
        await rig.health.publish("mas.event.health.x", BreakDue(n=2))
        await eventually(lambda: any(e["event"] == "agent.event_given_up" for e in logs),
                         timeout=20, what="the give-up log line")
        await drained(service)
    assert rig.handled.attempts == {1: 3, 2: 3}
    assert [n for _, n, _ in rig.handled.events] == [1]
    given_up = [e for e in logs if e["event"] == "agent.event_given_up"]
    assert len(given_up) == 1
    assert given_up[0]["attempt"] == 3
    assert given_up[0]["subject"] == "mas.event.health.x"


async def test_a_replayed_event_is_stored_but_not_handled_twice(rig: Rig) -> None:
    """health sends one signed event twice, byte for byte: the stream stores both, the
    agent handles the first and refuses the copy (same nonce, other stream sequence)."""
    service = await rig.start()
    data = BreakDue(n=7).model_dump_json().encode()
    subject = "mas.event.health.break_due"
    headers = rig.health.sealed_headers(subject, data)
    with capture_logs() as logs:
        for _ in range(2):
            await rig.health.nc.publish(subject, data, headers=headers)
        await eventually(lambda: any(e["event"] == "agent.event_refused" for e in logs),
                         timeout=15, what="the refused replay")
        await drained(service)
    assert rig.handled.attempts == {7: 1}
    refused = [e for e in logs if e["event"] == "agent.event_refused"]
    assert refused[0]["code"] == "envelope_replayed"


@pytest.mark.parametrize("subject", [
    f"$JS.API.STREAM.INFO.{STREAM}",
    f"$JS.API.CONSUMER.CREATE.{STREAM}.home",
    f"$JS.API.CONSUMER.INFO.{STREAM}.home",
    f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.home",
])
async def test_another_agent_cannot_read_or_steer_the_stream(rig: Rig, subject: str) -> None:
    """aggregator has an event stream of its own (same grants, other names): none of them
    reaches home's stream, and home's stream is in an account it cannot see anyway."""
    await rig.start()
    rogue = await rig.connect("aggregator")
    with pytest.raises(REFUSED):
        await rogue.nc.request(subject, b'{"batch": 1}', timeout=1)
    await wait_for_violation(rogue, "publish", subject)


@pytest.mark.parametrize("subject", [
    f"$JS.API.CONSUMER.CREATE.{STREAM}.spy",
    f"$JS.API.CONSUMER.CREATE.{STREAM}",
    f"$JS.API.STREAM.DELETE.{STREAM}",
    f"$JS.API.STREAM.PURGE.{STREAM}",
    f"$JS.API.DIRECT.GET.{STREAM}",
    f"$JS.API.STREAM.INFO.{subj.event_stream('aggregator')}",
])
async def test_the_agent_itself_has_only_its_one_consumer(rig: Rig, subject: str) -> None:
    await rig.start()
    home = await rig.connect("home")
    with pytest.raises(REFUSED):
        await home.nc.request(subject, b"{}", timeout=1)
    await wait_for_violation(home, "publish", subject)


async def test_events_stored_for_one_agent_are_not_in_another_agents_stream(rig: Rig) -> None:
    """Each stream holds only what its account imports: health's events reach home's
    stream; an event of home's own reaches neither home's stream nor health's account."""
    service = await rig.start()
    home = await rig.connect("home")
    await settle(home)
    await home.publish("mas.event.home.door", BreakDue(n=99))
    await rig.health.publish("mas.event.health.x", BreakDue(n=5))
    await eventually(lambda: 5 in rig.handled.attempts, timeout=15, what="health's event")
    await drained(service)
    info = await service.client.nc.jetstream(timeout=3).stream_info(STREAM)
    assert info.state.messages == 1
    assert 99 not in rig.handled.attempts
