"""Each identity, with its real credentials, can do what the policy grants and nothing else.

Every refusal is observed: the server's permission error arrives on the client's
error callback, and the message that would have leaked is shown not to arrive.
"""

from __future__ import annotations

import asyncio

import nats.errors
import pytest
from nats.aio.msg import Msg
from nats.js.api import DiscardPolicy, StreamConfig

from broker import subjects as subj
from broker.policy import load_policy
from tests.conftest import (
    REPO,
    ConnectAs,
    RunningBroker,
    eventually,
    settle,
    wait_for_violation,
)

POLICY = load_policy(REPO / "policy.yaml")
AGENTS = sorted(POLICY.agents)
STATEFUL = sorted(n for n, a in POLICY.agents.items() if a.state)
STATELESS = sorted(n for n, a in POLICY.agents.items() if not a.state)
# A denied JetStream API request is dropped by the server: the client sees a timeout.
REFUSED = (nats.errors.TimeoutError, nats.errors.NoRespondersError, TimeoutError)


def victim_of(agent: str) -> str:
    return next(a for a in AGENTS if a != agent)


def first_action(agent: str) -> str:
    return next(iter(POLICY.agents[agent].actions))


class Inbox:
    """A raw subscription that records what arrives, to prove nothing leaked."""

    def __init__(self) -> None:
        self.messages: list[Msg] = []

    async def cb(self, msg: Msg) -> None:
        self.messages.append(msg)


@pytest.mark.parametrize("agent", AGENTS)
async def test_agent_serves_its_own_commands(connect_as: ConnectAs, agent: str) -> None:
    orch, me = await connect_as("orchestrator"), await connect_as(agent)
    seen = []

    async def handle(msg):  # type: ignore[no-untyped-def]
        seen.append(msg.sender)
        await me.respond(msg, b"done")

    await me.subscribe(subj.commands(agent), handle, queue=agent)
    await settle(me)
    reply = await orch.request(subj.command(agent, first_action(agent)), b"{}", timeout=3)
    assert (reply.sender, reply.data, seen) == (agent, b"done", ["orchestrator"])
    assert not me.violations
    assert not orch.violations


@pytest.mark.parametrize("agent", AGENTS)
async def test_agent_events_reach_the_orchestrator(connect_as: ConnectAs, agent: str) -> None:
    orch, me = await connect_as("orchestrator"), await connect_as(agent)
    got: asyncio.Queue[str] = asyncio.Queue()

    async def handle(msg):  # type: ignore[no-untyped-def]
        await got.put(f"{msg.sender}:{msg.subject}")

    await orch.subscribe("mas.event.>", handle)
    await settle(orch)
    await me.publish(f"mas.event.{agent}.test", b"{}")
    assert await asyncio.wait_for(got.get(), 3) == f"{agent}:mas.event.{agent}.test"


def forbidden_publishes(agent: str) -> list[str]:
    victim = victim_of(agent)
    return [
        subj.command(victim, first_action(victim)),   # command another agent
        f"mas.event.{victim}.spoofed",                # speak as another agent
        "mas.audit.forged",                           # write the audit log
        "mas.admin.approval.decide",                  # approve its own request
        "mas.control.stop",                           # stop containers
        "_INBOX_orchestrator.stolen",                 # answer someone else's request
        f"$KV.{subj.REVOCATIONS_BUCKET}.jti.x",       # lift a revocation
        "$JS.API.STREAM.LIST",                        # enumerate streams
    ]


@pytest.mark.attack("publish to another agent's subjects",
                    threat="a compromised agent sends commands, events or token requests in "
                           "another agent's name")
@pytest.mark.parametrize("agent", AGENTS)
async def test_agent_cannot_publish_outside_its_grants(connect_as: ConnectAs, agent: str) -> None:
    rogue, watcher = await connect_as(agent), await connect_as("orchestrator")
    victim = await connect_as(victim_of(agent))
    leaked, leaked_cmd = Inbox(), Inbox()
    await watcher.nc.subscribe("mas.event.>", cb=leaked.cb)
    await victim.nc.subscribe(subj.commands(victim.identity), cb=leaked_cmd.cb)
    await settle(watcher, victim)
    for subject in forbidden_publishes(agent):
        await rogue.nc.publish(subject, b"attack")
    for subject in forbidden_publishes(agent):
        await wait_for_violation(rogue, "publish", subject)
    await settle(rogue, watcher, victim)
    assert [m.subject for m in leaked.messages] == []
    assert [m.subject for m in leaked_cmd.messages] == []


def forbidden_subscriptions(agent: str) -> list[str]:
    victim = victim_of(agent)
    return [
        subj.commands(victim),          # read another agent's commands
        "_INBOX.>",                     # the shared inbox space
        "_INBOX_orchestrator.>",        # another identity's replies
        f"_INBOX_{victim}.>",
        ">",                            # everything
        "mas.orch.>",                   # other agents' token requests
        "mas.admin.>",                  # operator decisions
    ]


@pytest.mark.attack("read another agent's replies or KV",
                    threat="a compromised agent listens to another agent's commands, another "
                           "identity's inbox or operator decisions")
@pytest.mark.parametrize("agent", AGENTS)
async def test_agent_cannot_subscribe_outside_its_grants(connect_as: ConnectAs, agent: str) -> None:
    rogue, orch = await connect_as(agent), await connect_as("orchestrator")
    victim = await connect_as(victim_of(agent))
    stolen = Inbox()
    for subject in forbidden_subscriptions(agent):
        await rogue.nc.subscribe(subject, cb=stolen.cb)
    for subject in forbidden_subscriptions(agent):
        await wait_for_violation(rogue, "subscription", subject)

    async def answer(msg):  # type: ignore[no-untyped-def]
        await victim.respond(msg, b"private")

    await victim.subscribe(subj.commands(victim.identity), answer)
    await settle(victim, rogue)
    reply = await orch.request(subj.command(victim.identity, first_action(victim.identity)),
                               b"secret", timeout=3)
    assert reply.data == b"private"
    await settle(orch, victim, rogue)
    assert stolen.messages == [], "a refused subscription still received messages"


@pytest.mark.parametrize("agent", STATEFUL)
async def test_stateful_agent_uses_its_own_bucket(connect_as: ConnectAs, agent: str) -> None:
    me = await connect_as(agent)
    kv = await me.nc.jetstream(timeout=3).create_key_value(bucket=subj.kv_bucket(agent))
    await kv.put("cursor", b"42")
    assert (await kv.get("cursor")).value == b"42"
    assert not me.violations


@pytest.mark.attack("read another agent's replies or KV",
                    threat="a compromised agent reads or overwrites another agent's KV state")
@pytest.mark.parametrize("agent", AGENTS)
async def test_agent_cannot_open_another_agents_bucket(connect_as: ConnectAs, agent: str) -> None:
    owner_name = next(a for a in STATEFUL if a != agent)
    owner, rogue = await connect_as(owner_name), await connect_as(agent)
    bucket = subj.kv_bucket(owner_name)
    kv = await owner.nc.jetstream(timeout=3).create_key_value(bucket=bucket)
    await kv.put("secret", b"owner-only")
    js = rogue.nc.jetstream(timeout=0.5)
    with pytest.raises(REFUSED):
        await js.key_value(bucket)
    await wait_for_violation(rogue, "publish", f"$JS.API.STREAM.INFO.KV_{bucket}")
    await rogue.nc.publish(f"$KV.{bucket}.secret", b"overwritten")
    await wait_for_violation(rogue, "publish", f"$KV.{bucket}.secret")
    with pytest.raises(REFUSED):
        await js.get_msg(f"KV_{bucket}", subject=f"$KV.{bucket}.secret", direct=True)
    assert (await kv.get("secret")).value == b"owner-only"


@pytest.mark.parametrize("agent", STATELESS)
async def test_stateless_agent_cannot_create_any_bucket_but_its_ledger(
        connect_as: ConnectAs, agent: str) -> None:
    rogue = await connect_as(agent)
    other = f"{subj.kv_bucket(agent)}_more"
    with pytest.raises(REFUSED):
        await rogue.nc.jetstream(timeout=0.5).create_key_value(bucket=other)
    await wait_for_violation(rogue, "publish", f"$JS.API.STREAM.CREATE.KV_{other}")


async def _audit_stream(orch_js) -> None:  # type: ignore[no-untyped-def]
    await orch_js.add_stream(StreamConfig(
        name=subj.AUDIT_STREAM, subjects=[subj.AUDIT_SUBJECTS], deny_delete=True,
        deny_purge=True, allow_rollup_hdrs=False, discard=DiscardPolicy.NEW, allow_direct=True,
    ))


@pytest.mark.attack("delete or rewrite the audit stream",
                    threat="any identity, even the orchestrator, deletes, purges or shrinks the "
                           "audit stream")
@pytest.mark.parametrize("identity", [*AGENTS, "operator", "orchestrator", "control"])
async def test_nobody_can_delete_or_purge_the_audit_stream(
    connect_as: ConnectAs, identity: str
) -> None:
    orch = await connect_as("orchestrator")
    orch_js = orch.nc.jetstream(timeout=3)
    await _audit_stream(orch_js)
    ack = await orch_js.publish("mas.audit.test", b"record")
    rogue = orch if identity == "orchestrator" else await connect_as(identity)
    js = rogue.nc.jetstream(timeout=0.5)
    for attempt, api in (
        (js.delete_stream(subj.AUDIT_STREAM), f"$JS.API.STREAM.DELETE.{subj.AUDIT_STREAM}"),
        (js.purge_stream(subj.AUDIT_STREAM), f"$JS.API.STREAM.PURGE.{subj.AUDIT_STREAM}"),
        (js.delete_msg(subj.AUDIT_STREAM, ack.seq),
         f"$JS.API.STREAM.MSG.DELETE.{subj.AUDIT_STREAM}"),
    ):
        with pytest.raises(REFUSED):
            await asyncio.wait_for(attempt, 0.5)
        await wait_for_violation(rogue, "publish", api)
    shrunk = (await orch_js.stream_info(subj.AUDIT_STREAM)).config
    shrunk.max_msgs = 1
    with pytest.raises(REFUSED):
        await asyncio.wait_for(js.update_stream(shrunk), 0.5)
    await wait_for_violation(rogue, "publish", f"$JS.API.STREAM.UPDATE.{subj.AUDIT_STREAM}")
    info = await orch_js.stream_info(subj.AUDIT_STREAM)
    assert info.state.last_seq >= ack.seq
    assert info.state.messages >= 1
    assert info.config.max_msgs != 1
    assert (await orch_js.get_msg(subj.AUDIT_STREAM, ack.seq)).data == b"record"


async def test_audit_reader_sees_records_live_but_cannot_write(connect_as: ConnectAs) -> None:
    orch = await connect_as("orchestrator")
    orch_js = orch.nc.jetstream(timeout=3)
    await _audit_stream(orch_js)
    readers = [a for a, cfg in POLICY.agents.items() if "audit" in cfg.read_streams]
    assert readers, "policy grants no agent read access to the audit stream"
    reader = await connect_as(readers[0])
    feed = Inbox()
    await reader.nc.subscribe(subj.AUDIT_FEED, cb=feed.cb)
    await settle(reader)
    await orch_js.publish("mas.audit.read_test", b"visible")
    await eventually(lambda: bool(feed.messages), what="the audit record on the live feed")
    assert [m.data for m in feed.messages] == [b"visible"]
    await reader.nc.publish("mas.audit.forged", b"x")
    await wait_for_violation(reader, "publish", "mas.audit.forged")
    with pytest.raises(REFUSED):
        await reader.nc.jetstream(timeout=0.5).get_msg(subj.AUDIT_STREAM, 1, direct=True)
    non_reader = await connect_as(next(a for a in AGENTS if a not in readers))
    await non_reader.nc.subscribe(subj.AUDIT_FEED, cb=feed.cb)
    await wait_for_violation(non_reader, "subscription", subj.AUDIT_FEED)


async def test_violations_are_in_the_server_log_with_the_authenticated_key(
    connect_as: ConnectAs, broker: RunningBroker
) -> None:
    """The log names the nkey the server authenticated (the connection name is the client's
    own claim and cannot be trusted), so the audit layer can attribute the violation."""
    rogue = await connect_as("notify")
    await rogue.nc.publish("mas.agent.home.call_service", b"unlock")
    await wait_for_violation(rogue, "publish", "mas.agent.home.call_service")
    line = await broker.wait_for_log(
        f'nkey:{rogue.material.nkey_public}" - Publish Violation - Subject '
        '"mas.agent.home.call_service"')
    assert "AGENT_NOTIFY/" in line
