"""The audit writer: one signed, hash-chained record per event, appended to ``MAS_AUDIT``.

Each record's ``prev_hash`` is the SHA-256 of the previous record's canonical JSON,
``sig`` the orchestrator's Ed25519 signature over the record without ``sig``. Appends
carry ``Nats-Expected-Last-Sequence``, so a second writer cannot fork the chain; the
stream denies delete and purge and discards new records (never old ones) when full.
Records are also published in a signed envelope, so subscribers (the anomaly agent)
can authenticate them live.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

import structlog
from nats.js.api import DiscardPolicy, StorageType, StreamConfig

from broker import subjects as subj
from broker.connection import BrokerClient
from protocol.audit import AuditKind, AuditRecord, Outcome
from security.encoding import b64url_encode, canonical_json
from security.keys import SigningKey

log = structlog.get_logger("mas.audit")
GENESIS = "0" * 64
MAX_BYTES = 256 * 1024 * 1024
DOMAIN = b"mas-audit-record/1\n"


def record_hash(record: AuditRecord) -> str:
    return hashlib.sha256(canonical_json(record.model_dump(mode="json"))).hexdigest()


def signing_bytes(record: AuditRecord) -> bytes:
    return DOMAIN + canonical_json(record.model_dump(mode="json", exclude={"sig"}))


def stream_config() -> StreamConfig:
    return StreamConfig(
        name=subj.AUDIT_STREAM, subjects=[subj.AUDIT_SUBJECTS], storage=StorageType.FILE,
        discard=DiscardPolicy.NEW, max_bytes=MAX_BYTES, deny_delete=True, deny_purge=True,
        allow_rollup_hdrs=False)


class AuditLog:
    def __init__(self, client: BrokerClient, key: SigningKey) -> None:
        self.client = client
        self.key = key
        self.js = client.nc.jetstream(timeout=5)
        self.last_seq = 0
        self.head = GENESIS
        self._lock = asyncio.Lock()

    async def open(self) -> AuditLog:
        await self.js.add_stream(stream_config())
        info = await self.js.stream_info(subj.AUDIT_STREAM)
        self.last_seq = int(info.state.last_seq or 0)
        if self.last_seq:
            raw = await self.js.get_msg(subj.AUDIT_STREAM, seq=self.last_seq)
            self.head = record_hash(AuditRecord.model_validate_json(raw.data or b""))
        return self

    async def record(self, kind: AuditKind, identity: str, action: str, outcome: Outcome, *,
                     code: str = "", trace_id: str | None = None, workflow_id: str | None = None,
                     payload: bytes | None = None, detail: dict[str, Any] | None = None) -> None:
        async with self._lock:
            unsigned = AuditRecord(
                seq=self.last_seq + 1, ts=time.time(), kind=kind, identity=identity,
                action=action, outcome=outcome, code=code, trace_id=trace_id,
                workflow_id=workflow_id, detail=detail or {}, prev_hash=self.head,
                payload_sha256=hashlib.sha256(payload).hexdigest() if payload else None,
                kid=self.key.kid)
            record = unsigned.model_copy(
                update={"sig": b64url_encode(self.key.sign(signing_bytes(unsigned)))})
            data = canonical_json(record.model_dump(mode="json"))
            subject = f"mas.audit.{kind}"
            headers = self.client.sealed_headers(subject, data)
            headers["Nats-Expected-Last-Sequence"] = str(self.last_seq)
            ack = await self.js.publish(subject, data, headers=headers)
            self.last_seq = ack.seq
            self.head = record_hash(record)
        log.info("audit.record", seq=record.seq, kind=kind, identity=identity, action=action,
                 outcome=outcome, code=code or None, trace_id=trace_id, workflow_id=workflow_id)
