"""The revocation set kept in the ``mas_revocations`` KV bucket.

The orchestrator writes entries (``RevocationStore.revoke``); every agent runs a
``RevocationWatcher`` that keeps a local ``RevocationSet`` current from a KV watch, so a
revocation takes effect on the next message an agent receives, not at token expiry.
The ACLs make the bucket read-only for everyone but the orchestrator.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Literal

import structlog
from nats.js.kv import KeyValue
from pydantic import ValidationError

from broker import subjects as subj
from broker.connection import BrokerClient
from security.revocation import Revocation, RevocationSet

log = structlog.get_logger("mas.broker")
HISTORY = 1


async def open_bucket(client: BrokerClient, *, create: bool) -> KeyValue:
    js = client.nc.jetstream(timeout=3)
    if create:
        return await js.create_key_value(bucket=subj.REVOCATIONS_BUCKET, history=HISTORY)
    return await js.key_value(subj.REVOCATIONS_BUCKET)


class RevocationStore:
    """The writer side; only the orchestrator's ACL allows it."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    @classmethod
    async def open(cls, client: BrokerClient) -> RevocationStore:
        return cls(await open_bucket(client, create=True))

    async def revoke(self, entry: Revocation) -> int:
        return int(await self.kv.put(entry.key, entry.model_dump_json().encode()))

    async def lift(self, kind: Literal["jti", "agent"], target: str) -> None:
        await self.kv.delete(f"{kind}.{target}")


class RevocationWatcher:
    """Keeps ``self.revocations`` in step with the bucket; malformed entries are logged
    and skipped (they can only come from the orchestrator, but never crash a reader)."""

    def __init__(self, client: BrokerClient) -> None:
        self.client = client
        self.revocations = RevocationSet()
        self.ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        kv = await open_bucket(self.client, create=False)
        watcher = await kv.watchall()
        self._task = asyncio.create_task(self._run(watcher))
        await asyncio.wait_for(self.ready.wait(), timeout=5)

    async def _run(self, watcher: KeyValue.KeyWatcher) -> None:
        async for entry in watcher:
            if entry is None:  # end of the initial snapshot
                self.ready.set()
                continue
            kind, _, target = entry.key.partition(".")
            if entry.operation in ("DEL", "PURGE"):
                if kind in ("jti", "agent"):
                    self.revocations.lift(kind, target)
                continue
            try:
                self.revocations.apply(Revocation.model_validate_json(entry.value or b""))
            except ValidationError:
                log.warning("revocation.malformed_entry", key=entry.key,
                            identity=self.client.identity)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
