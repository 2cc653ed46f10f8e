"""What the dashboard shows, kept current from the broker and the NATS monitoring endpoint.

Everything is read with the operator's own grants: heartbeats (``mas.heartbeat.>``) and
alerts (``mas.alert.>``) arrive as signed messages and are kept only if their envelope
verified and, for a heartbeat, its sender is the agent it speaks for; the audit log is
tailed through an ordered consumer on ``MAS_AUDIT`` (read-only grants); pending approvals
and workflows are polled from the orchestrator's admin endpoints; agent states come from
control when it answers, else from the heartbeats. Message rates come from the server's
``/varz`` (loopback only). Each part that fails shows as a line in ``problems`` instead
of stopping the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from typing import Annotated, Any

import httpx2
import nats.errors
import nats.js.errors
import structlog
from nats.js.api import ConsumerConfig, DeliverPolicy
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError

from broker import subjects as subj
from broker.connection import SignedMessage
from broker.policy import Policy
from dashboard.actions import ActionFailed, Controls
from orchestrator.workflows import Workflow
from protocol.approvals import Approval
from protocol.audit import AuditRecord
from protocol.control import AgentStatus
from protocol.registry import Heartbeat

log = structlog.get_logger("mas.dashboard")
AUDIT_KEEP = 300
AUDIT_SHOWN = 150
ALERTS_KEEP = 50
RATE_POINTS = 300  # five minutes at one sample a second
FINISHED_SHOWN = 10


class AgentView(BaseModel):
    name: str
    description: str = ""
    kind: str = ""
    tier: str = ""
    state: str = "unknown"
    health: str | None = None
    source: str = ""  # where ``state`` came from: control, heartbeat or none
    version: str = ""
    last_heartbeat: float | None = None
    uptime_s: float | None = None
    handled: int = 0
    refused: int = 0
    failed: int = 0
    ref: str = ""
    restarts: int = 0


class Rates(BaseModel):
    ts: float
    in_msgs: float
    out_msgs: float
    in_bytes: float
    out_bytes: float
    connections: int


class AlertView(BaseModel):
    """An alert as published by the anomaly agent; unknown fields are ignored so that a
    newer alert shape still shows."""

    model_config = ConfigDict(extra="ignore")

    subject: str = ""
    sender: str = ""
    received_at: float = 0.0
    kind: str = ""
    severity: str = ""
    identity: str = ""
    ts: float = 0.0
    summary: Annotated[str, Field(max_length=200)] = ""
    reason: Annotated[str, Field(max_length=2000)] = ""
    data: dict[str, JsonValue] = Field(default_factory=dict)
    confidence: float | None = None
    record_ids: list[int] = Field(default_factory=list)


class Snapshot(BaseModel):
    generated_at: float
    agents: list[AgentView]
    rates: list[Rates]
    approvals: list[Approval]
    audit: list[dict[str, JsonValue]]
    alerts: list[AlertView]
    workflows: list[Workflow]
    control: bool
    problems: list[str]


def alert_view(msg: SignedMessage) -> AlertView:
    body: dict[str, Any] = json.loads(msg.data)
    explanation = body.pop("explanation", None) or {}
    return AlertView.model_validate({
        **body, **{k: v for k, v in explanation.items()
                   if k in ("summary", "reason", "data", "confidence")},
        "subject": msg.subject, "sender": msg.sender, "received_at": time.time()})


def rates_between(before: dict[str, Any], after: dict[str, Any], seconds: float,
                  now: float) -> Rates:
    def per_s(key: str) -> float:
        return max(0.0, (float(after.get(key, 0)) - float(before.get(key, 0))) / seconds)

    return Rates(ts=now, in_msgs=per_s("in_msgs"), out_msgs=per_s("out_msgs"),
                 in_bytes=per_s("in_bytes"), out_bytes=per_s("out_bytes"),
                 connections=int(after.get("connections", 0)))


class Feed:
    def __init__(self, controls: Controls, policy: Policy, monitor_url: str | None, *,
                 interval_s: float = 1.5, heartbeat_stale_s: float = 35.0) -> None:
        self.controls = controls
        self.client = controls.session.client
        self.policy = policy
        self.monitor_url = monitor_url.rstrip("/") if monitor_url else None
        self.interval_s = interval_s
        self.heartbeat_stale_s = heartbeat_stale_s
        self.heartbeats: dict[str, tuple[Heartbeat, float]] = {}
        self.alerts: deque[AlertView] = deque(maxlen=ALERTS_KEEP)
        self.audit: deque[AuditRecord] = deque(maxlen=AUDIT_KEEP)
        self.rates: deque[Rates] = deque(maxlen=RATE_POINTS)
        self.approvals: list[Approval] = []
        self.workflows: list[Workflow] = []
        self.control_status: dict[str, AgentStatus] = {}
        self.control_present = False
        self.problems: dict[str, str] = {}
        self.version = 0
        self._changed = asyncio.Event()
        self._poke = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._audit_seq = 0

    async def start(self) -> None:
        await self.client.subscribe("mas.heartbeat.>", self._on_heartbeat)
        await self.client.subscribe("mas.alert.>", self._on_alert)
        await self.client.sync()
        self._tasks = [asyncio.create_task(self._poll_loop()),
                       asyncio.create_task(self._audit_loop()),
                       asyncio.create_task(self._varz_loop())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def poke(self) -> None:
        """Poll the orchestrator now (after a control, so the page follows at once)."""
        self._poke.set()

    async def next(self, seen: int, timeout: float) -> int:
        """Wait until something changed after version ``seen`` (or ``timeout``)."""
        if self.version == seen:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)
        return self.version

    def _bump(self) -> None:
        self.version += 1
        self._changed.set()
        self._changed = asyncio.Event()

    def _problem(self, source: str, text: str | None) -> None:
        if text is None:
            self.problems.pop(source, None)
        else:
            self.problems[source] = text

    async def _on_heartbeat(self, msg: SignedMessage) -> None:
        try:
            beat = Heartbeat.model_validate_json(msg.data)
        except ValidationError:
            return
        if beat.agent != msg.sender or msg.subject != subj.heartbeat(beat.agent):
            log.warning("dashboard.heartbeat_refused", sender=msg.sender, subject=msg.subject)
            return
        self.heartbeats[beat.agent] = (beat, time.time())
        self._bump()

    async def _on_alert(self, msg: SignedMessage) -> None:
        try:
            self.alerts.appendleft(alert_view(msg))
        except (ValueError, ValidationError, AttributeError, TypeError):
            log.warning("dashboard.alert_unreadable", sender=msg.sender, subject=msg.subject)
            return
        self._bump()

    async def _poll_loop(self) -> None:
        while True:
            try:
                await self._poll_once()
            except Exception as exc:  # one bad answer must not end the live view
                log.warning("dashboard.poll_failed", error=type(exc).__name__)
                self._problem("poll", f"{type(exc).__name__}; see the dashboard's log")
            else:
                self._problem("poll", None)
            self._bump()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), self.interval_s)
            self._poke.clear()

    async def _poll_once(self) -> None:
        try:
            self.approvals = await self.controls.pending()
            self.workflows = await self.controls.workflows()
            self._problem("orchestrator", None)
        except ActionFailed as exc:
            self._problem("orchestrator", str(exc))
        try:
            status = await self.controls.status(timeout=1.0)
        except ActionFailed as exc:
            self.control_present = False
            self.control_status = {}
            self._problem("control", str(exc))
        else:
            self.control_present = True
            self.control_status = {s.agent: s for s in status}
            self._problem("control", None)

    async def _audit_loop(self) -> None:
        js = self.client.nc.jetstream(timeout=5)
        while True:
            try:
                info = await js.stream_info(subj.AUDIT_STREAM)
                last = int(info.state.last_seq or 0)
                start = self._audit_seq + 1 if self._audit_seq else max(1, last - AUDIT_KEEP + 1)
                sub = await js.subscribe(
                    subj.AUDIT_SUBJECTS, stream=subj.AUDIT_STREAM, ordered_consumer=True,
                    config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                          opt_start_seq=start),
                    inactive_threshold=30.0)
                self._problem("audit", None)
                try:
                    while True:
                        try:
                            msg = await sub.next_msg(timeout=5)
                        except nats.errors.TimeoutError:
                            continue
                        self._audit_seq = msg.metadata.sequence.stream
                        with contextlib.suppress(ValidationError):
                            self.audit.append(AuditRecord.model_validate_json(msg.data))
                            self._bump()
                finally:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
            except asyncio.CancelledError:
                raise
            except nats.js.errors.NotFoundError:
                self._problem("audit", "no audit stream yet; is the orchestrator running?")
            except Exception as exc:
                self._problem("audit", f"audit log unreadable ({type(exc).__name__}); retrying")
            await asyncio.sleep(2.0)

    async def _varz_loop(self) -> None:
        if self.monitor_url is None:
            self._problem("throughput", "no NATS monitoring address configured")
            return
        url = f"{self.monitor_url}/varz"
        before: tuple[dict[str, Any], float] | None = None
        async with httpx2.AsyncClient(timeout=2.0, trust_env=False) as http:
            while True:
                try:
                    response = await http.get(url)
                    response.raise_for_status()
                    varz: dict[str, Any] = response.json()
                except (httpx2.HTTPError, ValueError) as exc:
                    self._problem("throughput", f"{url}: {type(exc).__name__}")
                    before = None
                else:
                    now = time.monotonic()
                    if before is not None and now > before[1]:
                        self.rates.append(rates_between(before[0], varz, now - before[1],
                                                        time.time()))
                        self._bump()
                    before = (varz, now)
                    self._problem("throughput", None)
                await asyncio.sleep(1.0)

    def agents(self, now: float) -> list[AgentView]:
        views = []
        for name, agent in sorted(self.policy.agents.items()):
            view = AgentView(name=name, description=agent.description, kind=agent.kind.value,
                             tier=agent.tier.value, source="none")
            beat = self.heartbeats.get(name)
            if beat is not None:
                hb, at = beat
                view = view.model_copy(update={
                    "version": hb.version, "last_heartbeat": at, "uptime_s": hb.uptime_s,
                    "handled": hb.handled, "refused": hb.refused, "failed": hb.failed,
                    "kind": hb.kind, "source": "heartbeat",
                    "state": ("running" if hb.state == "ready" else hb.state)
                    if now - at <= self.heartbeat_stale_s else "silent"})
            status = self.control_status.get(name)
            beating = view.source == "heartbeat" and view.state == "running"
            if status is not None and not (beating and status.state == "missing"):
                # control's word, unless it does not manage an agent that is plainly alive
                # (started by hand, outside control)
                view = view.model_copy(update={
                    "state": status.state, "health": status.health, "ref": status.ref,
                    "restarts": status.restarts, "source": "control"})
            views.append(view)
        return views

    def snapshot(self) -> Snapshot:
        now = time.time()
        running = [w for w in self.workflows if not w.finished]
        finished = [w for w in self.workflows if w.finished][-FINISHED_SHOWN:]
        audit = [r.model_dump(mode="json", exclude={"sig", "prev_hash", "kid", "span_id",
                                                     "payload_sha256"})
                 for r in list(self.audit)[-AUDIT_SHOWN:]]
        return Snapshot(
            generated_at=now, agents=self.agents(now), rates=list(self.rates)[-120:],
            approvals=self.approvals, audit=audit[::-1], alerts=list(self.alerts),
            workflows=list(reversed(running + finished)), control=self.control_present,
            problems=[f"{k}: {v}" for k, v in sorted(self.problems.items())])
