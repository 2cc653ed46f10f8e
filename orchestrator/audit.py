"""The audit writer: one signed, hash-chained record per event, appended to ``MAS_AUDIT``.

Each record's ``prev_hash`` is the SHA-256 of the previous record's canonical JSON,
``sig`` the orchestrator's Ed25519 signature over the record without ``sig``. Appends
carry ``Nats-Expected-Last-Sequence``, so a second writer cannot fork the chain; the
stream denies delete and purge and discards new records (never old ones) when full.
Records are also published in a signed envelope, so readers (the anomaly agent) can
authenticate them; each agent granted ``read_streams: [audit]`` reads the stream through
the durable consumer ``open_readers`` makes for it at every start.

Every ``CHECKPOINT_EVERY`` records, every ``CHECKPOINT_INTERVAL_S`` seconds with new
records, at start and at close, the writer signs a checkpoint (``orchestrator.checkpoint``)
and appends it as a ``checkpoint`` record and to a file outside the stream. Each record
carries the trace and span ids of the span it was written in, and the append itself is a
producer span of that trace.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats.errors
import structlog
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    StorageType,
    StreamConfig,
)

from broker import subjects as subj
from broker import tracing
from broker.connection import BrokerClient
from orchestrator import checkpoint as cp
from protocol.audit import AuditKind, AuditRecord, Outcome
from security.encoding import b64url_decode, b64url_encode, canonical_json
from security.keys import SigningKey

log = structlog.get_logger("mas.audit")
GENESIS = "0" * 64
MAX_BYTES = 256 * 1024 * 1024
DOMAIN = b"mas-audit-record/1\n"
CHECKPOINT_EVERY = 100
CHECKPOINT_INTERVAL_S = 60.0
FILLING = 0.8


def record_hash(record: AuditRecord) -> str:
    return hashlib.sha256(canonical_json(record.model_dump(mode="json"))).hexdigest()


def signing_bytes(record: AuditRecord) -> bytes:
    return DOMAIN + canonical_json(record.model_dump(mode="json", exclude={"sig"}))


def seal(unsigned: AuditRecord, key: SigningKey) -> tuple[AuditRecord, bytes]:
    """Sign a record; returns it with ``sig`` and its stored bytes (canonical JSON), whose
    SHA-256 is the next record's ``prev_hash``."""
    record = unsigned.model_copy(update={"sig": b64url_encode(key.sign(signing_bytes(unsigned)))})
    return record, canonical_json(record.model_dump(mode="json"))


def stream_config() -> StreamConfig:
    return StreamConfig(
        name=subj.AUDIT_STREAM, subjects=[subj.AUDIT_SUBJECTS], storage=StorageType.FILE,
        discard=DiscardPolicy.NEW, max_bytes=MAX_BYTES, deny_delete=True, deny_purge=True,
        allow_rollup_hdrs=False)


@dataclass
class ReaderConfig(ConsumerConfig):
    """nats-py's consumer config plus the server's limits on one pull request."""

    max_batch: int | None = None
    max_expires: float | None = None  # seconds

    def as_dict(self) -> dict[str, object]:
        result = super().as_dict()
        if self.max_expires is not None:
            result["max_expires"] = self._to_nanoseconds(self.max_expires)
        return result


def reader_config(agent: str) -> ReaderConfig:
    """The durable consumer ``agent`` reads the log through (``read_streams: [audit]``):
    pull only, each record acknowledged, redelivered a bounded number of times, from the
    records appended after it was first made (not the whole history)."""
    return ReaderConfig(
        name=agent, durable_name=agent, description=f"audit records for {agent}",
        deliver_policy=DeliverPolicy.NEW, ack_policy=AckPolicy.EXPLICIT,
        ack_wait=subj.AUDIT_ACK_WAIT_S, max_deliver=subj.AUDIT_MAX_DELIVER,
        max_ack_pending=subj.AUDIT_MAX_ACK_PENDING, max_waiting=subj.AUDIT_MAX_WAITING,
        max_batch=subj.AUDIT_MAX_BATCH, max_expires=subj.AUDIT_MAX_EXPIRES_S)


async def open_readers(js: Any, readers: Iterable[str]) -> list[str]:
    """Make (or keep) each reader's consumer; returns the readers it failed for, each
    logged, so a bad one does not stop the orchestrator from auditing."""
    failed = []
    for agent in readers:
        try:
            await js.add_consumer(subj.AUDIT_STREAM, reader_config(agent))
        except nats.errors.Error as exc:
            log.error("audit.reader_failed", agent=agent, error=str(exc)[:200])
            failed.append(agent)
    return failed


class AuditLog:
    def __init__(self, client: BrokerClient, key: SigningKey, *,
                 checkpoint_file: Path | None = None,
                 checkpoint_every: int = CHECKPOINT_EVERY,
                 checkpoint_interval_s: float = CHECKPOINT_INTERVAL_S) -> None:
        self.client = client
        self.key = key
        self.js = client.nc.jetstream(timeout=5)
        self.last_seq = 0
        self.head = GENESIS
        self.checkpoint_file = checkpoint_file
        self.checkpoint_every = checkpoint_every
        self.checkpoint_interval_s = checkpoint_interval_s
        self._since_checkpoint = 0
        self._lock = asyncio.Lock()
        self._timer: asyncio.Task[None] | None = None

    async def open(self) -> AuditLog:
        await self.js.add_stream(stream_config())
        info = await self.js.stream_info(subj.AUDIT_STREAM)
        self.last_seq = int(info.state.last_seq or 0)
        if self.last_seq:
            raw = await self.js.get_msg(subj.AUDIT_STREAM, seq=self.last_seq)
            last = AuditRecord.model_validate_json(raw.data or b"")
            self.head = record_hash(last)
            if last.kind != "checkpoint":  # what the last run wrote after its final checkpoint
                self._since_checkpoint = 1
                await self.checkpoint()
        self._timer = asyncio.create_task(self._checkpoint_timer())
        return self

    async def close(self) -> None:
        """Stop the timer and checkpoint whatever came after the last checkpoint."""
        if self._timer is not None:
            self._timer.cancel()
            await asyncio.gather(self._timer, return_exceptions=True)
            self._timer = None
        if self._since_checkpoint and not self.client.nc.is_closed:
            try:
                await self.checkpoint()
            except Exception as exc:  # the broker is gone: the next start checkpoints
                log.warning("audit.checkpoint_failed", error=type(exc).__name__)

    async def record(self, kind: AuditKind, identity: str, action: str, outcome: Outcome, *,
                     code: str = "", trace_id: str | None = None, workflow_id: str | None = None,
                     payload: bytes | None = None, detail: dict[str, Any] | None = None) -> None:
        current_trace, current_span = tracing.current_ids()
        trace_id = trace_id or current_trace
        span_id = current_span if trace_id == current_trace else None
        async with self._lock:
            record = await self._append(
                kind=kind, identity=identity, action=action, outcome=outcome, code=code,
                trace_id=trace_id, span_id=span_id, workflow_id=workflow_id, detail=detail or {},
                payload_sha256=hashlib.sha256(payload).hexdigest() if payload else None)
            if self._since_checkpoint >= self.checkpoint_every:
                await self._checkpoint_locked()
        log.info("audit.record", seq=record.seq, kind=kind, identity=identity, action=action,
                 outcome=outcome, code=code or None, trace_id=trace_id, workflow_id=workflow_id)

    async def checkpoint(self) -> cp.Checkpoint | None:
        """Sign the current head now (None if nothing was appended since the last one)."""
        async with self._lock:
            return await self._checkpoint_locked()

    async def _checkpoint_locked(self) -> cp.Checkpoint | None:
        if not self._since_checkpoint:
            return None
        checkpoint = cp.Checkpoint(size=self.last_seq, head=self.head, ts=int(time.time()))
        note = cp.sign_note(checkpoint, self.key)
        await self._append(kind="checkpoint", identity=self.client.identity, action="checkpoint",
                           outcome="info", detail={"note": note, "size": checkpoint.size})
        self._since_checkpoint = 0
        if self.checkpoint_file is not None:
            await asyncio.to_thread(cp.append_note, self.checkpoint_file, note)
        log.info("audit.checkpoint", size=checkpoint.size, head=checkpoint.head)
        info = await self.js.stream_info(subj.AUDIT_STREAM)
        used = (info.state.bytes or 0) / MAX_BYTES
        if used >= FILLING:  # discard-new: a full stream refuses every further record
            log.warning("audit.stream_filling", used_pct=round(used * 100, 1),
                        records=info.state.messages, max_bytes=MAX_BYTES)
        return checkpoint

    async def _append(self, **fields: Any) -> AuditRecord:
        for attempt in (1, 2):
            unsigned = AuditRecord(seq=self.last_seq + 1, ts=time.time(), prev_hash=self.head,
                                   kid=self.key.kid, **fields)
            record, data = seal(unsigned, self.key)
            subject = f"mas.audit.{record.kind}"
            try:
                with tracing.producer(self.client.identity, subject, data):
                    headers = self.client.sealed_headers(subject, data)
                    headers["Nats-Expected-Last-Sequence"] = str(self.last_seq)
                    ack = await self.js.publish(subject, data, headers=headers)
            except Exception:
                # an earlier append whose answer was lost (the broker died, or nats-py sent
                # it from its reconnect buffer after we gave up) may be stored after all;
                # without taking it in, every later append would fail the sequence check
                if attempt == 2 or not await self._adopt_lost_appends():
                    raise
                continue
            break
        self.last_seq = ack.seq
        self.head = hashlib.sha256(data).hexdigest()
        if record.kind != "checkpoint":
            self._since_checkpoint += 1
        return record

    async def _adopt_lost_appends(self) -> bool:
        """Take in the records after our head that we signed and that continue our chain;
        True if there were any. Anything else there is left for `mas audit verify`."""
        adopted = False
        try:
            info = await self.js.stream_info(subj.AUDIT_STREAM)
            for seq in range(self.last_seq + 1, int(info.state.last_seq or 0) + 1):
                raw = await self.js.get_msg(subj.AUDIT_STREAM, seq=seq)
                stored = AuditRecord.model_validate_json(raw.data or b"")
                if (stored.seq, stored.prev_hash, stored.kid) != (seq, self.head, self.key.kid) \
                        or not self.key.public.verify(signing_bytes(stored),
                                                      b64url_decode(stored.sig)):
                    log.error("audit.foreign_record", seq=seq)
                    break
                self.last_seq, self.head = seq, hashlib.sha256(raw.data or b"").hexdigest()
                if stored.kind != "checkpoint":
                    self._since_checkpoint += 1
                log.warning("audit.adopted_lost_append", seq=seq, kind=stored.kind)
                adopted = True
        except Exception as exc:
            log.warning("audit.catch_up_failed", error=type(exc).__name__)
        return adopted

    async def _checkpoint_timer(self) -> None:
        while True:
            await asyncio.sleep(self.checkpoint_interval_s)
            try:
                await self.checkpoint()
            except Exception as exc:
                log.warning("audit.checkpoint_failed", error=type(exc).__name__)
