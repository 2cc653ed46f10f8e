"""The anomaly agent reads the audit stream through a durable consumer, against a real
broker and the real orchestrator: records appended while it is down are examined when it
is back, replicas examine each record once, and from the agent's side the consumer is the
only thing of the platform's JetStream it can touch."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import nats.errors
import pytest
from nats.js.api import AckPolicy
from pydantic import BaseModel
from structlog.testing import capture_logs

from agents.anomaly import agent as anomaly
from agents.anomaly.alerts import AnomalyAlert
from agents.runtime import Agent, Context, Event
from agents.runtime.service import AgentService
from broker import subjects as subj
from broker.connection import SignedMessage
from broker.revocations import RevocationAuthority
from broker.secrets import load_identity
from orchestrator.audit import open_readers, stream_config
from orchestrator.service import Orchestrator
from protocol.audit import AuditRecord
from tests.conftest import ConnectAs, RunningBroker, eventually, settle, wait_for_violation

pytestmark = pytest.mark.broker

AUDIT = subj.AUDIT_STREAM
REFUSED = (nats.errors.TimeoutError, nats.errors.NoRespondersError, TimeoutError)
NEXT = subj.audit_next("anomaly")  # as PLATFORM names it
NEXT_IMPORTED = subj.audit_next("anomaly", subj.AUDIT_API)  # as anomaly's account does


class Nothing(BaseModel):
    pass


@dataclass
class Seen:
    records: list[tuple[int, str]] = field(default_factory=list)  # record seq, instance


def reader(seen: Seen, instance: str) -> Agent:
    """An agent with anomaly's name (and so its credentials and grants) that notes every
    audit record it is handed."""
    agent = Agent("anomaly", version="0.0.1", kind="reactive")

    @agent.action(description="Nothing.")
    async def recent_alerts(args: Nothing, ctx: Context) -> Nothing:
        return Nothing()

    @agent.on_event("mas.audit.>")
    async def watch(event: Event, ctx: Context) -> None:
        assert event.sender == "orchestrator"
        seen.records.append((AuditRecord.model_validate_json(event.data).seq, instance))

    return agent


@dataclass
class Rig:
    broker: RunningBroker
    connect: ConnectAs
    orch: Orchestrator
    start: Callable[..., Awaitable[AgentService]]


@pytest.fixture
async def rig(fresh_broker: RunningBroker, connect_fresh: ConnectAs) -> AsyncIterator[Rig]:
    anomaly.reset()
    orch = Orchestrator(fresh_broker.project.policy(),
                        load_identity(fresh_broker.secrets, "orchestrator"), fresh_broker.url)
    await orch.start()
    running: list[AgentService] = []

    async def start(agent: Agent = anomaly.agent) -> AgentService:
        service = AgentService(agent, load_identity(fresh_broker.secrets, "anomaly"),
                               fresh_broker.url, register=False)
        await service.start()
        running.append(service)
        return service

    yield Rig(fresh_broker, connect_fresh, orch, start)
    for service in running:
        await service.stop()
    await orch.stop()
    anomaly.reset()


async def consumer_state(orch: Orchestrator) -> tuple[int, int]:
    """(not yet delivered, delivered but not acknowledged) of anomaly's audit consumer."""
    info = await orch.client.nc.jetstream(timeout=3).consumer_info(AUDIT, "anomaly")
    return info.num_pending or 0, info.num_ack_pending or 0


async def drained(orch: Orchestrator) -> None:
    """Every record delivered and acknowledged. Now and then (about one run in five of the
    burst test, already at e6b527a) one delivery is never acknowledged by the agent that
    got it; the server hands the record out again after the ack wait, which is the
    guarantee the agent runtime relies on, so that is how long this may take."""
    deadline = asyncio.get_running_loop().time() + subj.AUDIT_ACK_WAIT_S + 20
    while await consumer_state(orch) != (0, 0):
        assert asyncio.get_running_loop().time() < deadline, await consumer_state(orch)
        await asyncio.sleep(0.05)


async def refuse(orch: Orchestrator, identity: str, count: int) -> list[int]:
    """Append ``count`` refused commands by ``identity`` through the real audit writer;
    returns their sequence numbers."""
    seqs = []
    for _ in range(count):
        await orch.audit_log.record("command", identity, "call_service", "refused",
                                    code="no_token")
        seqs.append(orch.audit_log.last_seq)
    return seqs


async def test_the_orchestrator_makes_the_consumer_each_start_with_bounded_limits(
    rig: Rig,
) -> None:
    js = rig.orch.client.nc.jetstream(timeout=3)
    first = await js.consumer_info(AUDIT, "anomaly")
    config = first.config
    assert config.durable_name == "anomaly"
    assert config.deliver_subject is None  # pull only: nothing is pushed to any subject
    assert config.ack_policy == AckPolicy.EXPLICIT
    assert (config.max_deliver, config.max_ack_pending, config.max_waiting) == (
        subj.AUDIT_MAX_DELIVER, subj.AUDIT_MAX_ACK_PENDING, subj.AUDIT_MAX_WAITING)
    raw = await rig.orch.client.nc.request(f"$JS.API.CONSUMER.INFO.{AUDIT}.anomaly", b"",
                                           timeout=3)
    limits = json.loads(raw.data)["config"]  # fields nats-py does not model
    assert limits["max_batch"] == subj.AUDIT_MAX_BATCH
    assert limits["max_expires"] == int(subj.AUDIT_MAX_EXPIRES_S * 1e9)
    # only agents with read_streams: [audit] get one
    assert (await js.stream_info(AUDIT)).state.consumer_count == 1
    await rig.orch.stop()
    again = Orchestrator(rig.broker.project.policy(),
                         load_identity(rig.broker.secrets, "orchestrator"), rig.broker.url)
    await again.start()  # idempotent: the same consumer, not made anew
    rig.orch = again
    second = await again.client.nc.jetstream(timeout=3).consumer_info(AUDIT, "anomaly")
    assert second.created == first.created
    assert (second.num_pending or 0) > (first.num_pending or 0)  # records kept for it


async def test_a_burst_while_the_agent_is_down_raises_its_alert_when_it_is_back(
    rig: Rig,
) -> None:
    operator = await rig.connect("operator")
    alerts: list[SignedMessage] = []

    async def on_alert(msg: SignedMessage) -> None:
        alerts.append(msg)

    await operator.subscribe("mas.alert.>", on_alert)
    await settle(operator)
    first = await rig.start()
    await first.stop()
    # A pull the stopped instance left on the server would still take a record (handed
    # back only after the ack wait): let it expire so the burst waits for the next one.
    js = rig.orch.client.nc.jetstream(timeout=3)
    deadline = asyncio.get_running_loop().time() + 30
    while (await js.consumer_info(AUDIT, "anomaly")).num_waiting:
        assert asyncio.get_running_loop().time() < deadline, "a pull did not expire"
        await asyncio.sleep(0.1)
    burst = await refuse(rig.orch, "home", 6)
    pending, _ = await consumer_state(rig.orch)
    assert pending >= len(burst)  # kept for the consumer while nobody reads it
    assert alerts == []
    anomaly.reset()  # a new process: nothing learned before
    await rig.start()
    await eventually(lambda: bool(alerts), timeout=20, what="the refusal-burst alert")
    await drained(rig.orch)
    [msg] = [m for m in alerts if m.subject == "mas.alert.refusal_burst"]
    assert msg.sender == "anomaly"
    alert = AnomalyAlert.model_validate_json(msg.data)
    assert alert.identity == "home"
    assert alert.record_ids == burst[:5]


async def test_two_replicas_examine_each_record_once(rig: Rig) -> None:
    seen = Seen()
    await rig.start(reader(seen, "a"))
    await rig.start(reader(seen, "b"))
    appended = await refuse(rig.orch, "backup", 40)
    await eventually(lambda: set(appended) <= {s for s, _ in seen.records}, timeout=30,
                     what="every appended record")
    await drained(rig.orch)
    seqs = [s for s, _ in seen.records]
    assert len(seqs) == len(set(seqs)), "a record was examined twice"
    assert {instance for _, instance in seen.records} <= {"a", "b"}
    last = (await rig.orch.client.nc.jetstream(timeout=3).stream_info(AUDIT)).state.last_seq
    assert set(seqs) >= set(appended)
    assert max(seqs) <= last


async def test_an_agent_up_before_its_consumer_exists_reads_once_it_is_made(
    fresh_broker: RunningBroker, connect_fresh: ConnectAs,
) -> None:
    """Compose may start the agent first: its fetches fail until the orchestrator has
    made the consumer, then the records come."""
    orch = await connect_fresh("orchestrator")
    await RevocationAuthority.start(orch)  # what the agent asks for at start
    js = orch.nc.jetstream(timeout=3)
    await js.add_stream(stream_config())
    seen = Seen()
    service = AgentService(reader(seen, "a"), load_identity(fresh_broker.secrets, "anomaly"),
                           fresh_broker.url, register=False)
    with capture_logs() as logs:
        await service.start()
        try:
            await eventually(lambda: any(e["event"] == "agent.event_fetch_failed"
                                         for e in logs), timeout=20, what="a failed fetch")
            assert await open_readers(js, ["anomaly"]) == []
            record = AuditRecord(seq=1, ts=time.time(), kind="system", identity="orchestrator",
                                 outcome="info", prev_hash="0" * 64)
            await orch.publish("mas.audit.system", record)
            await eventually(lambda: [s for s, _ in seen.records] == [1], timeout=20,
                             what="the record appended after the consumer was made")
        finally:
            await service.stop()


async def test_a_record_not_from_the_orchestrator_is_refused(rig: Rig) -> None:
    """The broker lets only the orchestrator write the stream; the runtime checks again:
    a record whose envelope is not the orchestrator's is never handed to the handler."""
    seen = Seen()
    await rig.start(reader(seen, "a"))
    ok = await refuse(rig.orch, "home", 1)
    await eventually(lambda: ok[0] in {s for s, _ in seen.records}, timeout=20,
                     what="the orchestrator's record")
    operator = await rig.connect("operator")  # a PLATFORM identity, but not the writer
    data = AuditRecord(seq=99, ts=time.time(), kind="system", identity="operator",
                       outcome="info", prev_hash="0" * 64).model_dump_json().encode()
    headers = operator.sealed_headers("mas.audit.system", data)
    js = rig.orch.client.nc.jetstream(timeout=3)
    with capture_logs() as logs:
        await js.publish("mas.audit.system", data, headers=headers)  # stored, in its name
        await drained(rig.orch)  # delivered, refused and terminated
    assert 99 not in {s for s, _ in seen.records}
    refused = [e for e in logs if e["event"] == "agent.event_refused"]
    assert [e["code"] for e in refused] == ["wrong_sender"]


@pytest.mark.parametrize("subject", [
    f"$JS.API.STREAM.DELETE.{AUDIT}",
    f"$JS.API.STREAM.PURGE.{AUDIT}",
    f"$JS.API.STREAM.UPDATE.{AUDIT}",
    f"$JS.API.STREAM.MSG.DELETE.{AUDIT}",
    f"$JS.API.CONSUMER.DELETE.{AUDIT}.anomaly",
    f"$JS.API.CONSUMER.CREATE.{AUDIT}.anomaly",  # create-or-update: would change its limits
    f"$JS.API.CONSUMER.CREATE.{AUDIT}.spy",
    f"$JS.API.CONSUMER.CREATE.{AUDIT}",
    f"$JS.API.CONSUMER.DURABLE.CREATE.{AUDIT}.spy",
    f"$JS.API.CONSUMER.MSG.NEXT.{AUDIT}.anomaly",  # only under the imported name
    f"$JS.API.DIRECT.GET.{AUDIT}",
    f"$JS.API.STREAM.MSG.GET.{AUDIT}",
    f"$JS.API.STREAM.INFO.{AUDIT}",
    f"{subj.AUDIT_API}.CONSUMER.DELETE.{AUDIT}.anomaly",
    f"{subj.AUDIT_API}.CONSUMER.CREATE.{AUDIT}.spy",
    f"{subj.AUDIT_API}.STREAM.PURGE.{AUDIT}",
    f"{subj.AUDIT_API}.CONSUMER.MSG.NEXT.{AUDIT}.operator",
    f"$JS.API.STREAM.INFO.KV_{subj.APPROVALS_BUCKET}",
    f"$JS.API.DIRECT.GET.KV_{subj.APPROVALS_BUCKET}.$KV.{subj.APPROVALS_BUCKET}.x",
    f"$JS.API.STREAM.INFO.{subj.event_stream('home')}",
    f"$JS.API.CONSUMER.MSG.NEXT.{subj.event_stream('home')}.home",
])
async def test_the_anomaly_agent_has_only_its_one_consumer(rig: Rig, subject: str) -> None:
    js = rig.orch.client.nc.jetstream(timeout=3)
    stream_config_now = (await js.stream_info(AUDIT)).config
    consumer_now = (await js.consumer_info(AUDIT, "anomaly")).config
    rogue = await rig.connect("anomaly")
    with pytest.raises(REFUSED):
        await rogue.nc.request(subject, b'{"batch": 1}', timeout=1)
    await wait_for_violation(rogue, "publish", subject)
    js = rig.orch.client.nc.jetstream(timeout=3)
    assert (await js.stream_info(AUDIT)).config == stream_config_now
    assert (await js.stream_info(AUDIT)).state.consumer_count == 1
    assert (await js.consumer_info(AUDIT, "anomaly")).config == consumer_now


async def test_what_anomaly_may_do_reaches_only_its_consumer(rig: Rig) -> None:
    """With its own grants it pulls and acknowledges records (so the test above is not
    refused for some other reason), and the deliveries come back to its own inbox: a
    pull whose reply names an audit subject does not write into the stream."""
    rogue = await rig.connect("anomaly")
    await refuse(rig.orch, "home", 2)
    js = rogue.nc.jetstream(prefix=subj.AUDIT_API, timeout=3)
    sub = await js.pull_subscribe_bind(durable="anomaly", stream=AUDIT)
    [msg] = await sub.fetch(1, timeout=5)  # expires under the consumer's max_expires
    first = AuditRecord.model_validate_json(msg.data)
    assert (first.seq, first.action) == (1, "start")  # the orchestrator's, after it made it
    await msg.ack_sync()  # answered through the import: the ack reached the consumer
    info = await rig.orch.client.nc.jetstream(timeout=3).consumer_info(AUDIT, "anomaly")
    assert info.ack_floor.stream_seq == 1
    before = (await rig.orch.client.nc.jetstream(timeout=3).stream_info(AUDIT)).state.last_seq
    await rogue.nc.publish(NEXT_IMPORTED, b'{"batch": 1, "expires": 1000000000}',
                           reply="mas.audit.injected")
    await settle(rogue)
    await asyncio.sleep(1.5)  # the pull's own expiry: its delivery has gone wherever it goes
    after = (await rig.orch.client.nc.jetstream(timeout=3).stream_info(AUDIT)).state.last_seq
    assert after == before


@pytest.mark.parametrize("identity", ["home", "aggregator", "health"])
async def test_an_agent_without_read_streams_cannot_fetch_or_ack(rig: Rig,
                                                                 identity: str) -> None:
    await refuse(rig.orch, "home", 1)
    before = await consumer_state(rig.orch)
    other = await rig.connect(identity)
    for subject in (NEXT_IMPORTED, NEXT):
        with pytest.raises(REFUSED):
            await other.nc.request(subject, b'{"batch": 1}', timeout=1)
        await wait_for_violation(other, "publish", subject)
    last = rig.orch.audit_log.last_seq
    ack = f"$JS.ACK.{AUDIT}.anomaly.1.{last}.1.0.0"
    await other.nc.publish(ack, b"+ACK")
    await wait_for_violation(other, "publish", ack)
    assert await consumer_state(rig.orch) == before  # still waiting for anomaly
