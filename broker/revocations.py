"""Revocations: stored by the orchestrator, pushed to every agent as signed broadcasts.

The orchestrator (``RevocationAuthority``) keeps entries in its ``mas_revocations`` KV
bucket, which lives in the PLATFORM account and survives restarts. Each change is
also published on ``mas.revocation.<kind>.<target>`` in a signed envelope, and a signed
snapshot answers ``mas.orch.revocations``. Agents (``RevocationFollower``) accept
only messages whose envelope verifies as the orchestrator's, so neither a forged
entry nor a forged "lift" can come from anyone else; they take a fresh snapshot at
start and after every reconnect, so a change missed while disconnected is not lost.
"""

from __future__ import annotations

import asyncio
import time
from typing import Literal

import nats.errors
import structlog
from nats.js.kv import KeyValue
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from broker import subjects as subj
from broker.connection import BrokerClient, SignedMessage
from broker.errors import BrokerError
from security.revocation import Revocation, RevocationSet

log = structlog.get_logger("mas.broker")
ISSUER = "orchestrator"
MAX_ENTRIES = 10_000
SNAPSHOT_ATTEMPTS = 8  # about 10 s of backoff while the orchestrator starts


class RevocationChange(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    op: Literal["revoke", "lift"]
    kind: Literal["jti", "agent"]
    target: str
    entry: Revocation | None = None


class RevocationSnapshot(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    entries: list[Revocation] = Field(max_length=MAX_ENTRIES)


class RevocationAuthority:
    """The orchestrator's side: durable store, broadcasts, snapshot service."""

    def __init__(self, client: BrokerClient, kv: KeyValue, revocations: RevocationSet) -> None:
        self.client = client
        self.kv = kv
        self.revocations = revocations

    @classmethod
    async def start(cls, client: BrokerClient) -> RevocationAuthority:
        kv = await client.nc.jetstream(timeout=3).create_key_value(
            bucket=subj.REVOCATIONS_BUCKET, history=1)
        revocations = RevocationSet()
        try:
            keys = await kv.keys()
        except nats.js.errors.NoKeysError:
            keys = []
        for key in keys:
            entry = await kv.get(key)
            try:
                revocations.apply(Revocation.model_validate_json(entry.value or b""))
            except ValidationError:
                log.warning("revocation.malformed_entry", key=key)
        authority = cls(client, kv, revocations)
        await client.subscribe(subj.REVOCATION_SNAPSHOT, authority._serve_snapshot)
        await client.sync()
        return authority

    async def _serve_snapshot(self, msg: SignedMessage) -> None:
        await self.client.respond(msg, RevocationSnapshot(entries=self.revocations.entries()))

    async def revoke(self, entry: Revocation) -> None:
        await self.kv.put(entry.key, entry.model_dump_json().encode())
        self.revocations.apply(entry)
        change = RevocationChange(op="revoke", kind=entry.kind, target=entry.target, entry=entry)
        await self.client.publish(subj.revocation(entry.kind, entry.target), change)

    async def lift(self, kind: Literal["jti", "agent"], target: str) -> None:
        await self.kv.delete(f"{kind}.{target}")
        self.revocations.lift(kind, target)
        change = RevocationChange(op="lift", kind=kind, target=target)
        await self.client.publish(subj.revocation(kind, target), change)


class RevocationFollower:
    """An agent's side: ``revocations`` is what its token checks consult."""

    def __init__(self, client: BrokerClient) -> None:
        self.client = client
        self.revocations = RevocationSet()
        self._touched: set[str] | None = None

    async def start(self) -> None:
        await self.client.subscribe(subj.REVOCATIONS, self._on_change)
        await self.client.sync()  # a change broadcast before the snapshot must not be missed
        await self.resync()
        self.client.reconnect_hooks.append(self.resync)

    async def _fetch(self) -> SignedMessage:
        """The snapshot reply, waiting out an orchestrator that is not up yet."""
        delay = 0.1
        for _ in range(SNAPSHOT_ATTEMPTS - 1):
            try:
                return await self.client.request(subj.REVOCATION_SNAPSHOT, b"{}", timeout=5)
            except nats.errors.NoRespondersError:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        return await self.client.request(subj.REVOCATION_SNAPSHOT, b"{}", timeout=5)

    async def resync(self) -> None:
        """Load the orchestrator's snapshot; changes that arrive meanwhile win over it."""
        self._touched = set()
        try:
            reply = await self._fetch()
            if reply.sender != ISSUER:
                raise BrokerError(f"revocation snapshot signed by {reply.sender!r}")
            snapshot = RevocationSnapshot.model_validate_json(reply.data)
        except (TimeoutError, ValidationError, nats.errors.Error) as exc:
            log.error("revocation.snapshot_failed", identity=self.client.identity,
                      error=type(exc).__name__)
            raise BrokerError(f"could not load revocations from the orchestrator: {exc}") from exc
        finally:
            touched, self._touched = self._touched, None
        for entry in snapshot.entries:
            if entry.key not in touched:
                self.revocations.apply(entry)

    async def _on_change(self, msg: SignedMessage) -> None:
        if msg.sender != ISSUER:
            log.warning("revocation.foreign_sender", identity=self.client.identity,
                        sender=msg.sender)
            return
        try:
            change = RevocationChange.model_validate_json(msg.data)
        except ValidationError:
            log.warning("revocation.malformed_change", identity=self.client.identity)
            return
        if self._touched is not None:
            self._touched.add(f"{change.kind}.{change.target}")
        if change.op == "lift":
            self.revocations.lift(change.kind, change.target)
        elif change.entry is not None:
            self.revocations.apply(change.entry)
        self.revocations.prune(int(time.time()))
