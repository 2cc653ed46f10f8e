"""Signed envelopes across the real broker: receivers refuse forged, replayed, unsigned
and re-addressed messages before any handler sees them."""

from __future__ import annotations

import asyncio

import pytest
import structlog
from nats.aio.msg import Msg

from broker.connection import SignedMessage
from broker.errors import BrokerError
from security.envelope import H_SENDER, EnvelopeSigner
from security.errors import EnvelopeError
from security.keys import SigningKey
from tests.conftest import ConnectAs, settle, wait_for_violation


class Receiver:
    """Records what a BrokerClient subscription accepted and what it refused (by code)."""

    def __init__(self) -> None:
        self.accepted: list[SignedMessage] = []
        self.refused: asyncio.Queue[str] = asyncio.Queue()
        self.any: asyncio.Queue[None] = asyncio.Queue()

    async def handler(self, msg: SignedMessage) -> None:
        self.accepted.append(msg)
        await self.any.put(None)

    async def on_refused(self, msg: Msg, exc: EnvelopeError) -> None:
        await self.refused.put(exc.code)
        await self.any.put(None)

    async def next_refusal(self) -> str:
        return await asyncio.wait_for(self.refused.get(), 3)


async def _orchestrator_listening(connect_as: ConnectAs):  # type: ignore[no-untyped-def]
    orch = await connect_as("orchestrator")
    rx = Receiver()
    await orch.subscribe("mas.event.>", rx.handler, on_refused=rx.on_refused)
    await settle(orch)
    return orch, rx


async def test_message_signed_by_one_agent_claiming_to_be_another_is_refused(
    connect_as: ConnectAs,
) -> None:
    _orch, rx = await _orchestrator_listening(connect_as)
    rogue = await connect_as("health")
    subject = "mas.event.health.alarm"
    headers = EnvelopeSigner("health", rogue.material.signing_key).seal(subject, b"{}")
    headers[H_SENDER] = "home"
    await rogue.nc.publish(subject, b"{}", headers=headers)
    assert await rx.next_refusal() == "envelope_unknown_sender"
    forged = EnvelopeSigner("orchestrator", SigningKey.generate()).seal(subject, b"{}")
    await rogue.nc.publish(subject, b"{}", headers=forged)
    assert await rx.next_refusal() == "envelope_unknown_sender"
    assert rx.accepted == []


async def test_replayed_message_is_refused(connect_as: ConnectAs) -> None:
    _orch, rx = await _orchestrator_listening(connect_as)
    agent = await connect_as("backup")
    subject = "mas.event.backup.late"
    headers = agent.signer.seal(subject, b'{"late": true}')
    await agent.nc.publish(subject, b'{"late": true}', headers=headers)
    await asyncio.wait_for(rx.any.get(), 3)
    assert [m.sender for m in rx.accepted] == ["backup"]
    await agent.nc.publish(subject, b'{"late": true}', headers=headers)
    assert await rx.next_refusal() == "envelope_replayed"
    assert len(rx.accepted) == 1


async def test_unsigned_message_is_refused(connect_as: ConnectAs) -> None:
    _orch, rx = await _orchestrator_listening(connect_as)
    agent = await connect_as("notify")
    await agent.nc.publish("mas.event.notify.sent", b"{}")
    assert await rx.next_refusal() == "envelope_malformed"
    assert rx.accepted == []


async def test_message_moved_to_another_subject_is_refused(connect_as: ConnectAs) -> None:
    _orch, rx = await _orchestrator_listening(connect_as)
    agent = await connect_as("home")
    headers = agent.signer.seal("mas.event.home.door_closed", b"{}")
    await agent.nc.publish("mas.event.home.door_open", b"{}", headers=headers)
    assert await rx.next_refusal() == "envelope_bad_signature"


async def test_tampered_payload_is_refused(connect_as: ConnectAs) -> None:
    _orch, rx = await _orchestrator_listening(connect_as)
    agent = await connect_as("aggregator")
    subject = "mas.event.aggregator.digest"
    headers = agent.signer.seal(subject, b'{"steps": 450}')
    await agent.nc.publish(subject, b'{"steps": 45000}', headers=headers)
    assert await rx.next_refusal() == "envelope_bad_signature"


async def test_replies_are_signed_and_carry_the_trace(connect_as: ConnectAs) -> None:
    orch, agent = await connect_as("orchestrator"), await connect_as("health")
    traces: list[str | None] = []

    async def handle(msg: SignedMessage) -> None:
        traces.append(msg.trace_id)
        await agent.respond(msg, b'{"ok": true}')

    await agent.subscribe("mas.agent.health.daily_summary", handle, queue="health")
    await settle(agent)
    reply = await orch.request("mas.agent.health.daily_summary", b"{}", timeout=3)
    assert reply.sender == "health"
    assert reply.data == b'{"ok": true}'
    assert traces
    assert traces[0] is not None
    assert len(traces[0]) == 32
    assert reply.trace_id is not None


async def test_permission_violation_becomes_a_structured_log_event(connect_as: ConnectAs) -> None:
    rogue = await connect_as("anomaly")
    with structlog.testing.capture_logs() as logs:
        await rogue.nc.publish("mas.agent.home.call_service", b"unlock")
        await wait_for_violation(rogue, "publish", "mas.agent.home.call_service")
    events = [e for e in logs if e["event"] == "broker.permission_violation"]
    assert events == [{"event": "broker.permission_violation", "log_level": "warning",
                       "identity": "anomaly", "operation": "publish",
                       "subject": "mas.agent.home.call_service"}]


async def test_a_reply_cannot_be_aimed_at_another_agents_subject(
    connect_as: ConnectAs,
) -> None:
    """A requester cannot aim the responder's signed reply at someone else's subject:
    across accounts the server confines the reply to the requester's own account, and
    within one account ``respond()`` refuses anything but the requester's inbox."""
    orch, rogue = await connect_as("orchestrator"), await connect_as("notify")
    victim = await connect_as("home")
    refused: list[str] = []
    stolen: asyncio.Queue[bytes] = asyncio.Queue()

    async def answer(msg: SignedMessage) -> None:
        try:
            await orch.respond(msg, b'{"token": "for-notify"}')
        except BrokerError as exc:
            refused.append(str(exc))

    async def victim_cb(msg: Msg) -> None:
        await stolen.put(msg.data)

    await orch.subscribe("mas.orch.token.request", answer)
    await victim.nc.subscribe("mas.agent.home.call_service", cb=victim_cb)
    await settle(orch, victim)
    body = b'{"action": "x"}'
    headers = rogue.signer.seal("mas.orch.token.request", body)
    await rogue.nc.publish("mas.orch.token.request", body, reply="mas.agent.home.call_service",
                           headers=headers)
    await asyncio.sleep(0.3)
    await settle(orch, victim)
    assert stolen.empty()


async def test_respond_refuses_a_foreign_reply_subject(connect_as: ConnectAs) -> None:
    orch = await connect_as("orchestrator")
    request = SignedMessage(subject="mas.orch.token.request", data=b"{}", sender="notify",
                            token=None, trace_id=None, reply="mas.agent.home.call_service",
                            nonce="n" * 22)
    with pytest.raises(BrokerError, match="not notify's inbox"):
        await orch.respond(request, b"{}")
