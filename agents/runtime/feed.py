"""Durable event delivery: the events an agent subscribes to, kept for it while it is down.

The agent's own NATS account holds a stream ``EVENTS_<agent>`` over the event subjects
it declares with ``on_event`` (events reach that account only through the imports the
policy grants), file-backed and bounded (``broker.subjects.EVENT_STREAM_*``, oldest
dropped first). One durable pull consumer named after the agent is shared by all its
replicas, so each event is handled once whatever ``--scale`` says. The agent creates
both at start (idempotent); the broker lets it touch only these two
(``broker.permissions._event_feed``).

An event is acknowledged after its handler returns. A handler that raises gets the
event again later, up to ``max_deliver`` times in all; then it is dropped with a log
line. Envelope checks stay: the signature, a sender the subject belongs to
(``senders.sender_allowed``), and freshness measured when the stream stored the event
rather than when it is read, so a stored event is not stale because its reader was
down, while a replay published later is. A replay inside that window has a new stream
sequence under a nonce already seen and is refused (per process, like the live path).
``audit_feed.AuditFeed`` reads the platform's audit stream the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
import structlog
from nats.aio.msg import Msg
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from agents.runtime.context import Context, Event
from agents.runtime.declare import EventDef
from agents.runtime.senders import sender_allowed
from broker import subjects as subj
from broker import tracecontext
from broker.connection import BrokerClient
from security.envelope import DEFAULT_WINDOW_MS, EnvelopeVerifier, NonceCache
from security.errors import EnvelopeError, EnvelopeReplayed, EnvelopeStale

log = structlog.get_logger("mas.agent")
FETCH_S = 5.0
MAX_NONCES = 100_000


@dataclass(frozen=True)
class FeedSettings:
    max_deliver: int = subj.EVENT_MAX_DELIVER
    retry_s: float = 1.0  # first redelivery delay; doubles each time, up to retry_max_s
    retry_max_s: float = 30.0
    ack_wait_s: float = 60.0  # a handler still running after this gets the event again


class _ByStreamSequence(NonceCache):
    """Nonces of stored events are checked by ``EventFeed`` against stream sequences
    (a redelivery repeats its nonce legitimately), not by the verifier."""

    def check_and_add(self, sender: str, nonce: str, ts_ms: int, oldest_ok_ms: int) -> None:
        return None


class EventFeed:
    # how old a stored message may be; the event stream drops older ones anyway
    max_age_ms = subj.EVENT_STREAM_MAX_AGE_S * 1000

    def __init__(self, client: BrokerClient, agent: str, events: list[EventDef],
                 context: Context, settings: FeedSettings | None = None) -> None:
        self.client = client
        self.agent = agent
        self.events = events
        self.context = context
        self.settings = settings or FeedSettings()
        self.stream = subj.event_stream(agent)
        self.subjects = list(dict.fromkeys(e.subject for e in events))
        self.verifier = EnvelopeVerifier(
            client.material.trust.sender_rings(),
            window_ms=self.max_age_ms, nonces=_ByStreamSequence())
        self._nonces: OrderedDict[str, int] = OrderedDict()  # nonce -> stream sequence
        self._stopping = asyncio.Event()
        self._fetching = False
        self._task: asyncio.Task[None] | None = None
        self._sub: Any = None

    async def start(self) -> None:
        self._sub = await self._bind()
        self._task = asyncio.create_task(self._loop())

    async def _bind(self) -> Any:
        """Create (or update) the stream and the consumer in the agent's own account, and
        return a pull subscription bound to the consumer."""
        js = self.client.nc.jetstream(timeout=5)
        config = StreamConfig(
            name=self.stream, subjects=self.subjects, storage=StorageType.FILE,
            retention=RetentionPolicy.LIMITS, discard=DiscardPolicy.OLD,
            max_bytes=subj.EVENT_STREAM_MAX_BYTES, max_msgs=subj.EVENT_STREAM_MAX_MSGS,
            max_age=subj.EVENT_STREAM_MAX_AGE_S, num_replicas=1)
        try:
            await js.add_stream(config)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != 10058:  # exists with another config: the agent changed
                raise
            await js.update_stream(config)
        s = self.settings
        await js.add_consumer(self.stream, ConsumerConfig(
            name=self.agent, durable_name=self.agent, ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL, max_deliver=s.max_deliver,
            ack_wait=s.ack_wait_s, max_ack_pending=256))
        return await js.pull_subscribe_bind(durable=self.agent, stream=self.stream)

    async def stop(self) -> None:
        """Finish the event in hand (it is acknowledged), then stop pulling."""
        self._stopping.set()
        if self._task is None:
            return
        if self._fetching:
            self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._sub.unsubscribe()

    async def _loop(self) -> None:
        while not self._stopping.is_set():
            self._fetching = True
            try:
                msgs = await self._sub.fetch(1, timeout=FETCH_S)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            except nats.errors.Error as exc:
                log.warning("agent.event_fetch_failed", agent=self.agent,
                            error=type(exc).__name__)
                await asyncio.sleep(1)
                continue
            finally:
                self._fetching = False
            for msg in msgs:
                await self._handle(msg)

    def _open(self, msg: Msg) -> Event:
        """Verify a stored event; raises ``EnvelopeError`` when it must not be handled."""
        meta = msg.metadata
        env = self.verifier.open(msg.subject, msg.data, msg.headers)
        stored_ms = int(meta.timestamp.timestamp() * 1000)
        if not -2_000 <= stored_ms - env.ts_ms <= DEFAULT_WINDOW_MS:
            raise EnvelopeStale(f"signed {stored_ms - env.ts_ms} ms before it was stored")
        seq = meta.sequence.stream
        seen = self._nonces.get(env.nonce)
        if seen is not None and seen != seq:
            raise EnvelopeReplayed(f"nonce from {env.sender} already stored as event {seen}")
        self._nonces[env.nonce] = seq
        while len(self._nonces) > MAX_NONCES:
            self._nonces.popitem(last=False)
        if not sender_allowed(msg.subject, env.sender):
            raise _WrongSender(f"{env.sender} may not publish on {msg.subject}")
        return Event(msg.subject, msg.data, env.sender, tracecontext.trace_id(msg.headers))

    async def _handle(self, msg: Msg) -> None:
        meta = msg.metadata
        try:
            event = self._open(msg)
        except EnvelopeError as exc:
            log.warning("agent.event_refused", agent=self.agent, subject=msg.subject,
                        code=exc.code, reason=str(exc)[:200])
            with contextlib.suppress(nats.errors.Error):
                await msg.term()
            return
        ctx = self.context.for_request(event.trace_id)
        try:
            for definition in self.events:
                if subj.within(msg.subject, definition.subject):
                    await definition.handler(event, ctx)
        except Exception as exc:
            attempt = meta.num_delivered
            fields = {"agent": self.agent, "subject": msg.subject, "attempt": attempt,
                      "error": type(exc).__name__, "trace_id": event.trace_id}
            with contextlib.suppress(nats.errors.Error):
                if attempt >= self.settings.max_deliver:
                    log.error("agent.event_given_up", **fields)
                    await msg.term()
                else:
                    delay = min(self.settings.retry_s * 2 ** (attempt - 1),
                                self.settings.retry_max_s)
                    log.warning("agent.event_failed", retry_in_s=delay, **fields)
                    await msg.nak(delay=delay)
            return
        with contextlib.suppress(nats.errors.Error):
            await msg.ack()


class _WrongSender(EnvelopeError):
    code = "wrong_sender"
