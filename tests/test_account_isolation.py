"""Attacks that subject ACLs alone cannot stop, because nats-server does not check the
body or the reply subject of an allowed JetStream request. Each agent lives in its own
account, so whatever it makes the server do stays inside that account.

Each test is one of the exploits a review proved against a single-account config."""

from __future__ import annotations

import asyncio
import json

import nats.errors
import nats.js.errors
import pytest
import structlog
from nats.aio.msg import Msg
from nats.js.api import DiscardPolicy, StreamConfig

from broker import connection
from broker import subjects as subj
from broker.accounts import AGENT_MAX_CONNECTIONS, AGENT_MAX_SUBSCRIPTIONS
from broker.connection import SignedMessage
from broker.errors import BrokerError
from broker.secrets import load_identity
from tests.conftest import ConnectAs, RunningBroker, eventually, settle

REFUSED = (nats.errors.TimeoutError, nats.errors.NoRespondersError, TimeoutError)


async def _audit(js) -> None:  # type: ignore[no-untyped-def]
    await js.add_stream(StreamConfig(
        name=subj.AUDIT_STREAM, subjects=[subj.AUDIT_SUBJECTS], deny_delete=True,
        deny_purge=True, allow_rollup_hdrs=False, discard=DiscardPolicy.NEW, allow_direct=True))


@pytest.mark.attack("read another agent's replies or KV",
                    threat="an agent configures its own stream to capture other identities' "
                           "traffic")
async def test_an_agents_own_stream_cannot_capture_other_traffic(
    connect_fresh: ConnectAs,
) -> None:
    """A stateful agent may create its bucket's stream with any config; extra capture
    subjects only ever see its own account, where no one else's traffic exists."""
    orch, rogue, home = [await connect_fresh(n) for n in ("orchestrator", "health", "home")]
    rogue_js = rogue.nc.jetstream(timeout=3)
    bucket = subj.kv_bucket("health")
    await rogue_js.add_stream(StreamConfig(
        name=f"KV_{bucket}",
        subjects=[f"$KV.{bucket}.>", "mas.agent.home.>", "_INBOX_orchestrator.>",
                  "mas.orch.>", "mas.admin.>", "mas.event.home.>"]))

    async def answer(msg):  # type: ignore[no-untyped-def]
        await home.respond(msg, b'{"door": "unlocked"}')

    await home.subscribe(subj.commands("home"), answer)
    await settle(home)
    reply = await orch.request("mas.agent.home.call_service", b'{"pin": "1234"}', timeout=3)
    assert reply.sender == "home"
    await home.publish("mas.event.home.door", b"{}")
    await asyncio.sleep(0.2)
    info = await rogue_js.stream_info(f"KV_{bucket}")
    assert info.state.messages == 0, "the agent's stream captured another identity's traffic"


@pytest.mark.attack("delete or rewrite the audit stream",
                    threat="an agent injects records into the audit stream through a JetStream "
                           "reply subject")
async def test_a_jetstream_reply_cannot_be_injected_into_the_audit_stream(
    connect_as: ConnectAs,
) -> None:
    """A JetStream API reply goes to whatever reply subject the requester names; from an
    agent's account, ``mas.audit.*`` is not the platform's audit stream."""
    orch, rogue = await connect_as("orchestrator"), await connect_as("aggregator")
    orch_js = orch.nc.jetstream(timeout=3)
    await _audit(orch_js)
    before = (await orch_js.stream_info(subj.AUDIT_STREAM)).state.last_seq
    await rogue.nc.jetstream(timeout=3).create_key_value(bucket=subj.kv_bucket("aggregator"))
    await rogue.nc.publish(f"$JS.API.STREAM.INFO.KV_{subj.kv_bucket('aggregator')}", b"",
                           reply="mas.audit.injected_by_aggregator")
    await rogue.nc.publish(f"$KV.{subj.kv_bucket('aggregator')}.x", b"forged",
                           reply="mas.audit.injected_ack")
    await settle(rogue)
    await asyncio.sleep(0.2)
    assert (await orch_js.stream_info(subj.AUDIT_STREAM)).state.last_seq == before
    ack = await orch_js.publish("mas.audit.next", b"record",
                                headers={"Nats-Expected-Last-Sequence": str(before)})
    assert ack.seq == before + 1


async def test_an_agent_cannot_reserve_more_storage_than_its_limit(
    connect_fresh: ConnectAs,
) -> None:
    rogue = await connect_fresh("health")
    js = rogue.nc.jetstream(timeout=3)
    bucket = subj.kv_bucket("health")
    with pytest.raises(nats.js.errors.APIError, match=r"insufficient|resources|limit|exceed"):
        await js.add_stream(StreamConfig(name=f"KV_{bucket}", subjects=[f"$KV.{bucket}.>"],
                                         max_bytes=1024**3))


async def test_a_stateless_agents_jetstream_holds_only_its_small_ledger(
        connect_as: ConnectAs) -> None:
    """A stateless agent's account has room for its single-use ledger and nothing more: a
    bucket of another name is refused, and one bigger than the reservation too."""
    rogue = await connect_as("notify")
    js = rogue.nc.jetstream(timeout=0.5)
    with pytest.raises(REFUSED):
        await asyncio.wait_for(js.create_key_value(bucket="notify_stash"), 1)
    with pytest.raises(nats.js.errors.APIError, match="insufficient storage"):
        await asyncio.wait_for(js.create_key_value(
            bucket=subj.kv_bucket("notify"), max_bytes=subj.LEDGER_MAX_BYTES * 4), 1)


async def test_one_agent_cannot_take_every_connection(
    fresh_broker: RunningBroker, connect_fresh: ConnectAs
) -> None:
    """Each agent account has its own connection cap; the platform still gets in."""
    material = load_identity(fresh_broker.secrets, "notify")
    held = []
    try:
        for _ in range(AGENT_MAX_CONNECTIONS):
            held.append(await connection.connect(material, fresh_broker.url,
                                                 max_reconnect_attempts=0))
        with pytest.raises(BrokerError, match="maximum account active connections"):
            held.append(await connection.connect(material, fresh_broker.url,
                                                 max_reconnect_attempts=0, connect_timeout=1))
        await fresh_broker.wait_for_log("maximum account active connections exceeded")
        orch = await connect_fresh("orchestrator")
        await orch.nc.flush(timeout=3)
    finally:
        for client in held:
            client.closing = True
            await client.nc.close()


async def test_one_agent_cannot_subscribe_without_bound(
    fresh_broker: RunningBroker, connect_fresh: ConnectAs
) -> None:
    rogue = await connect_fresh("notify")

    async def ignore(_msg: Msg) -> None:
        return None

    for i in range(AGENT_MAX_SUBSCRIPTIONS + 10):
        await rogue.nc.subscribe(f"_INBOX_notify.flood{i}", cb=ignore)
    line = await fresh_broker.wait_for_log("maximum subscriptions exceeded", timeout=5)
    assert f"AGENT_NOTIFY/nkey:{rogue.material.nkey_public}" in line


async def test_stored_messages_cannot_arrive_under_a_foreign_subject(
    connect_fresh: ConnectAs,
) -> None:
    """JetStream push delivery keeps each stored message's subject. An agent that stores
    messages it signed for subjects of its choice and has them pushed to a platform
    service must not get them past the platform's subscription under those names."""
    orch, rogue = await connect_fresh("orchestrator"), await connect_fresh("health")
    seen: list[str] = []

    async def handle(msg: SignedMessage) -> None:
        seen.append(msg.subject)

    await orch.subscribe(subj.REGISTER, handle)
    await settle(orch)
    bucket = subj.kv_bucket("health")
    transform = {"src": f"$KV.{bucket}.*.*.*.*",
                 "dest": "{{wildcard(1)}}.{{wildcard(2)}}.{{wildcard(3)}}.{{wildcard(4)}}"}
    created = await rogue.nc.request(
        f"$JS.API.STREAM.CREATE.KV_{bucket}",
        json.dumps({"name": f"KV_{bucket}", "subjects": [f"$KV.{bucket}.>"],
                    "max_bytes": 1024 * 1024, "subject_transform": transform}).encode(),
        timeout=3)
    assert b'"error"' not in created.data, created.data
    spoofed = "mas.admin.approve.wf1"
    body = b'{"approve": true}'
    await rogue.nc.request(f"$KV.{bucket}.{spoofed}", body, timeout=3,
                           headers=rogue.signer.seal(spoofed, body))
    with structlog.testing.capture_logs() as logs:
        await rogue.nc.request(
            f"$JS.API.CONSUMER.CREATE.KV_{bucket}.relay",
            json.dumps({"stream_name": f"KV_{bucket}", "config": {
                "durable_name": "relay", "deliver_policy": "all", "ack_policy": "none",
                "deliver_subject": subj.REGISTER}}).encode(), timeout=3)
        await eventually(lambda: any(e["event"] == "broker.subject_mismatch" for e in logs),
                         what="the subject-mismatch refusal")
    assert seen == []
    mismatches = [e for e in logs if e["event"] == "broker.subject_mismatch"]
    assert mismatches
    assert mismatches[0]["subject"] == spoofed
