"""Running an agent: connect, verify every command, serve, report health, drain.

One ``AgentService`` per process. Commands arrive on ``mas.agent.<name>.<action>``
through a queue group, so replicas share the load and each request is handled once.
Every request is logged as one line (agent, action, trace id, outcome, duration) and
never with its payload.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
import structlog
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.client import JetStreamContext
from pydantic import BaseModel, ValidationError

from agents.runtime.audit_feed import AuditFeed
from agents.runtime.context import UPDATE_ATTEMPTS, Change, Context, Event, StateConflict
from agents.runtime.declare import ActionDef, ActionError, Agent, EventDef, PollDef
from agents.runtime.feed import EventFeed, FeedSettings
from agents.runtime.gate import CommandGate, Refusal, parse_args
from agents.runtime.ledger import SingleUseLedger
from agents.runtime.senders import sender_allowed
from broker import subjects as subj
from broker.connection import BrokerClient, MessageTooLarge, SignedMessage, connect
from broker.discovery import Discovery, EndpointSpec
from broker.kv import list_keys
from broker.revocations import RevocationFollower
from broker.secrets import IdentityMaterial
from protocol.actions import Completed, Failed, Refused
from protocol.registry import Heartbeat, Registration, RegistrationAck
from security.errors import EnvelopeError
from security.tokens import TokenVerifier

log = structlog.get_logger("mas.agent")
ISSUER = "orchestrator"
MAX_CONCURRENCY = 32
KEY_LISTINGS = 4  # concurrent ctx.state.keys() calls, well under the account's consumers


class AgentService:
    def __init__(
        self, agent: Agent, material: IdentityMaterial, url: str, *,
        stateful: bool = False, heartbeat_s: float = 10.0, ready_file: Path | None = None,
        settings: dict[str, str] | None = None, register: bool = True,
        feed: FeedSettings | None = None,
    ) -> None:
        if material.identity != agent.name:
            raise ValueError(f"credentials are {material.identity}'s, not {agent.name}'s")
        self.agent = agent
        self.material = material
        self.url = url
        self.stateful = stateful or agent.stateful
        self.heartbeat_s = heartbeat_s
        self.ready_file = ready_file
        self.settings = settings or {}
        self.register = register
        self.feed_settings = feed
        self.feed: EventFeed | None = None
        self.audit_feed: AuditFeed | None = None
        self.discovery: Discovery | None = None
        self.instance = f"{socket.gethostname()[:40]}-{uuid.uuid4().hex[:8]}"
        self.started = time.time()
        self.counts = {"ok": 0, "refused": 0, "error": 0}
        self.state: str = "starting"
        self.registration: RegistrationAck | None = None
        self._client: BrokerClient | None = None
        self._subs: list[Subscription] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._background: list[asyncio.Task[None]] = []
        self._slots = asyncio.Semaphore(MAX_CONCURRENCY)
        self._running: dict[str, asyncio.Event] = {}  # single-use jti -> its run is over
        self._stopped = asyncio.Event()

    @property
    def client(self) -> BrokerClient:
        if self._client is None:
            raise RuntimeError("the agent service is not started")
        return self._client

    async def start(self) -> None:
        name = self.agent.name
        self._client = client = await connect(self.material, self.url,
                                              name=f"{name}/{self.instance}")
        follower = RevocationFollower(client)
        await follower.start()
        # every agent's bucket keeps its single-use ledger, so a restart forgets no used
        # token; only a stateful agent also gets it as ctx.state
        kv = await client.nc.jetstream(timeout=3).create_key_value(
            bucket=subj.kv_bucket(name), history=1)
        verifier = TokenVerifier(self.material.trust.issuer_ring(), issuer=ISSUER,
                                 cache_size=1024)
        self.gate = CommandGate(name, verifier, follower.revocations, SingleUseLedger(kv))
        state = _KvState(kv, client.nc.jetstream(timeout=3), subj.kv_bucket(name)) \
            if self.stateful else None
        self.context = Context(name, self._publish, state,
                               log.bind(agent=name), settings=self.settings)
        self._subs.append(await client.subscribe(
            subj.commands(name), self._on_command, queue=name, on_refused=self._on_bad_envelope))
        for event in self.agent.events:
            if not subj.durable(event.subject) and not subj.audited(event.subject):
                self._subs.append(await client.subscribe(
                    event.subject, self._event_handler(event), queue=name))
        stored = [e for e in self.agent.events if subj.durable(e.subject)]
        if stored:
            self.feed = EventFeed(client, name, stored, self.context, self.feed_settings)
            await self.feed.start()
        audit = [e for e in self.agent.events if subj.audited(e.subject)]
        if audit:
            self.audit_feed = AuditFeed(client, name, audit, self.context, self.feed_settings)
            await self.audit_feed.start()
        self.discovery = Discovery(
            client.nc, name, self.agent.version, self.agent.description,
            [_endpoint(name, a) for a in self.agent.actions.values()],
            metadata={"kind": self.agent.kind, "instance": self.instance})
        await self.discovery.start()
        await client.sync()
        for poll in self.agent.polls:
            self._background.append(asyncio.create_task(self._poll_loop(poll)))
        self._background.append(asyncio.create_task(self._heartbeat_loop()))
        if self.register:
            self._background.append(asyncio.create_task(self._register_loop()))
        self.state = "ready"
        await self._beat()
        log.info("agent.ready", agent=name, instance=self.instance, version=self.agent.version,
                 actions=sorted(self.agent.actions))

    async def stop(self) -> None:
        """Drain: stop taking work, finish what is in hand, then disconnect."""
        if self.state == "stopped":
            return
        self.state = "draining"
        if self.ready_file is not None:
            self.ready_file.unlink(missing_ok=True)
        if self.feed is not None:
            await self.feed.stop()
        if self.audit_feed is not None:
            await self.audit_feed.stop()
        for sub in self._subs:
            with contextlib.suppress(nats.errors.Error):
                await sub.drain()  # type: ignore[no-untyped-call]
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=30)
        if self.discovery is not None:
            with contextlib.suppress(nats.errors.Error):
                await self.discovery.stop()
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._beat()
            await self._client.close()
        self.state = "stopped"
        self._stopped.set()
        log.info("agent.stopped", agent=self.agent.name, instance=self.instance, **self.counts)

    async def _publish(self, subject: str, payload: BaseModel) -> None:
        await self.client.publish(subject, payload)

    async def _on_command(self, msg: SignedMessage) -> None:
        await self._slots.acquire()  # backpressure: the subscription waits for a free slot
        task = asyncio.create_task(self._serve(msg))
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def _serve(self, msg: SignedMessage) -> None:
        began = time.perf_counter()
        action = msg.subject.removeprefix(f"mas.agent.{self.agent.name}.")
        definition = self.agent.actions.get(action)
        reply: Completed | Refused | Failed
        try:
            if definition is None:
                raise Refusal("unknown_action", f"{self.agent.name} has no action {action!r}")
            args = parse_args(msg.data)
            claims = await self.gate.admit(sender=msg.sender, subject=msg.subject, action=action,
                                           sensitive=definition.sensitive, token=msg.token,
                                           args=args)
            over = self._running[claims.jti] = asyncio.Event()
            try:
                reply = await self._run(definition, args, msg.trace_id)
            finally:
                over.set()
                self._running.pop(claims.jti, None)
        except Refusal as refusal:
            first_run = self._running.get(refusal.jti or "")
            if first_run is not None:
                # a restarted orchestrator resends a step still running here: the refusal
                # means "done", so it waits until the first run is over (steps after it
                # must not start before it has finished)
                await first_run.wait()
            reply = Refused(code=refusal.code, reason=refusal.reason[:500])
        self.counts[reply.status] += 1
        if self.discovery is not None:
            self.discovery.record(msg.subject, int((time.perf_counter() - began) * 1e9),
                                  None if isinstance(reply, Completed) else reply.code)
        fields: dict[str, Any] = {"agent": self.agent.name, "action": action,
                                  "trace_id": msg.trace_id, "sender": msg.sender,
                                  "outcome": reply.status,
                                  "duration_ms": round((time.perf_counter() - began) * 1000, 2)}
        if not isinstance(reply, Completed):
            fields["code"] = reply.code
        (log.info if isinstance(reply, Completed) else log.warning)("agent.request", **fields)
        if msg.reply:
            with contextlib.suppress(Exception):
                try:
                    await self.client.respond(msg, reply)
                except MessageTooLarge as exc:  # the caller hears why instead of timing out
                    await self.client.respond(msg, Failed(code="output_too_large",
                                                          reason=str(exc)[:500]))

    async def _run(self, definition: ActionDef, args: dict[str, Any],
                   trace_id: str | None) -> Completed | Failed:
        try:
            model = definition.input_model.model_validate(args)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'input'}: {e['msg']}"
                                 for e in exc.errors()[:5])
            return Failed(code="invalid_input", reason=problems[:500])
        ctx = self.context.for_request(trace_id)
        try:
            output = await definition.handler(model, ctx)
        except ActionError as exc:
            return Failed(code=exc.code[:64], reason=exc.reason[:500])
        except Exception as exc:
            log.exception("agent.handler_failed", agent=self.agent.name,
                          action=definition.name, trace_id=trace_id, error=type(exc).__name__)
            return Failed(code="handler_error", reason=f"{type(exc).__name__} in the handler; "
                          "see the agent's log")
        if not isinstance(output, definition.output_model):
            return Failed(code="handler_error",
                          reason=f"handler returned {type(output).__name__}, "
                                 f"not {definition.output_model.__name__}")
        return Completed(output=output.model_dump(mode="json"), proposals=ctx.proposals)

    async def _on_bad_envelope(self, msg: Msg, error: EnvelopeError) -> None:
        self.counts["refused"] += 1
        log.warning("agent.request", agent=self.agent.name, subject=msg.subject,
                    outcome="refused", code=error.code)
        await self.client.answer_unverified(msg, Refused(code=error.code, reason=str(error)[:500]))

    def _event_handler(self, event: EventDef) -> Any:
        async def handle(msg: SignedMessage) -> None:
            if not sender_allowed(msg.subject, msg.sender):
                log.warning("agent.event_refused", agent=self.agent.name, subject=msg.subject,
                            sender=msg.sender, code="wrong_sender")
                return
            ctx = self.context.for_request(msg.trace_id)
            try:
                await event.handler(Event(msg.subject, msg.data, msg.sender, msg.trace_id), ctx)
            except Exception as exc:
                log.exception("agent.event_failed", agent=self.agent.name, handler=event.name,
                              subject=msg.subject, error=type(exc).__name__)
        return handle

    async def _poll_loop(self, poll: PollDef) -> None:
        delay = poll.seconds
        while True:
            await asyncio.sleep(delay * (1 + random.uniform(-poll.jitter, poll.jitter)))  # noqa: S311
            began = time.perf_counter()
            try:
                await poll.handler(self.context.for_request(None))
            except Exception as exc:
                delay = min(delay * 2, poll.max_backoff)
                log.warning("agent.poll_failed", agent=self.agent.name, poll=poll.name,
                            error=type(exc).__name__, retry_in_s=round(delay, 1))
            else:
                delay = poll.seconds
                log.debug("agent.poll", agent=self.agent.name, poll=poll.name,
                          duration_ms=round((time.perf_counter() - began) * 1000, 2))

    async def _beat(self) -> None:
        state = "draining" if self.state in ("draining", "stopped") else self.state
        await self.client.publish(subj.heartbeat(self.agent.name), Heartbeat(
            agent=self.agent.name, instance=self.instance, version=self.agent.version,
            kind=self.agent.kind, ts=time.time(), uptime_s=round(time.time() - self.started, 1),
            handled=self.counts["ok"], refused=self.counts["refused"],
            failed=self.counts["error"], state=state,
        ))
        if self.ready_file is not None and self.state == "ready" and self.client.nc.is_connected:
            self.ready_file.touch()
            os.utime(self.ready_file)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                await self._beat()
            except nats.errors.Error as exc:
                log.warning("agent.heartbeat_failed", agent=self.agent.name,
                            error=type(exc).__name__)

    async def _register_loop(self) -> None:
        """Announce the actions; retry with backoff until the orchestrator answers."""
        announcement = Registration(
            agent=self.agent.name, version=self.agent.version, kind=self.agent.kind,
            instance=self.instance, actions=[a.spec() for a in self.agent.actions.values()])
        delay = 0.5
        while True:
            try:
                reply = await self.client.request(subj.REGISTER, announcement, timeout=5)
                if reply.sender != ISSUER:
                    raise ValueError(f"registration answered by {reply.sender}")
                self.registration = ack = RegistrationAck.model_validate_json(reply.data)
            except (nats.errors.Error, TimeoutError, ValueError) as exc:
                log.info("agent.register_retry", agent=self.agent.name,
                         error=type(exc).__name__, retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            (log.warning if ack.rejected else log.info)(
                "agent.registered", agent=self.agent.name, accepted=ack.accepted,
                rejected=ack.rejected)
            return

    async def run(self) -> None:
        """Start, serve until SIGTERM or SIGINT, then drain."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        starting = asyncio.create_task(self.start())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # stopped while still waiting for the broker or orchestrator
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            await self.stop()
            return
        starting.result()  # a failed start ends the process with its error
        await stopping
        log.info("agent.draining", agent=self.agent.name, in_flight=len(self._tasks))
        await self.stop()


def _endpoint(agent: str, action: ActionDef) -> EndpointSpec:
    """How an action is listed by ``$SRV.INFO``: its command subject and what the
    orchestrator's registry knows of it."""
    return EndpointSpec(action.name, subj.command(agent, action.name), agent, {
        "sensitive": str(action.sensitive).lower(), "description": action.description,
        "schema": json.dumps(action.input_model.model_json_schema(), sort_keys=True)})


class _KvState:
    """``Context.state`` backed by the agent's KV bucket."""

    def __init__(self, kv: Any, js: JetStreamContext, bucket: str) -> None:
        self.kv = kv
        self.js = js
        self.bucket = bucket
        self._listings = asyncio.Semaphore(KEY_LISTINGS)

    async def get(self, key: str) -> bytes | None:
        try:
            entry = await self.kv.get(key)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        value: bytes | None = entry.value
        return value

    async def put(self, key: str, value: bytes) -> None:
        await self.kv.put(key, value)

    async def update(self, key: str, change: Change) -> bytes:
        """Compare-and-set on the entry's revision (``create`` when there is none), so
        replicas writing the same key never lose each other's updates."""
        for _ in range(UPDATE_ATTEMPTS):
            try:
                entry = await self.kv.get(key)
                current, revision = entry.value, entry.revision
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                current, revision = None, None
            value = change(current)
            try:
                if revision is None:
                    await self.kv.create(key, value)
                else:
                    await self.kv.update(key, value, last=revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                await asyncio.sleep(random.uniform(0, 0.01))  # noqa: S311 (jitter)
                continue
            return value
        raise StateConflict(f"{key}: still changing after {UPDATE_ATTEMPTS} attempts")

    async def delete(self, key: str) -> None:
        await self.kv.delete(key)

    async def keys(self, prefix: str = "") -> list[str]:
        """Every live key starting with ``prefix`` (see ``broker.kv``: a consumer deleted at
        once, since an agent's account may hold only a few; a prefix ending in "." is
        filtered by the server, so the single-use ledger's entries cost nothing here)."""
        async with self._listings:
            return await list_keys(self.js, self.bucket, prefix)
