"""Attacks that subject ACLs alone cannot stop, because nats-server does not check the
body or the reply subject of an allowed JetStream request. Each agent lives in its own
account, so whatever it makes the server do stays inside that account.

Each test is one of the exploits a review proved against a single-account config."""

from __future__ import annotations

import asyncio

import nats.errors
import pytest
from nats.js.api import DiscardPolicy, StreamConfig

from broker import subjects as subj
from tests.conftest import ConnectAs, settle

REFUSED = (nats.errors.TimeoutError, nats.errors.NoRespondersError, TimeoutError)


async def _audit(js) -> None:  # type: ignore[no-untyped-def]
    await js.add_stream(StreamConfig(
        name=subj.AUDIT_STREAM, subjects=[subj.AUDIT_SUBJECTS], deny_delete=True,
        deny_purge=True, allow_rollup_hdrs=False, discard=DiscardPolicy.NEW, allow_direct=True))


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


async def test_a_stateless_agent_has_no_jetstream_at_all(connect_as: ConnectAs) -> None:
    rogue = await connect_as("notify")
    with pytest.raises(REFUSED):
        await asyncio.wait_for(rogue.nc.jetstream(timeout=0.5).create_key_value(
            bucket=subj.kv_bucket("notify")), 1)
