"""Platform feeds the orchestrator writes into the audit log: what control did to an
agent (start, stop, restart, from the dashboard or the CLI) and the anomaly agent's
alerts. The audit log has one writer; these services only announce.

Each message is a signed envelope; a control action counts only when control sent it.
Alerts are recorded with the identity that sent them, a hash of the body, and the few
fields an operator scans for (kind, severity, summary); the body itself is not copied.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Annotated, Any, Protocol

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from broker.connection import SignedMessage
from protocol.audit import AuditKind, Outcome
from protocol.control import ACTION_EVENT, ControlAction

log = structlog.get_logger("mas.orchestrator")
ALERTS = "mas.alert.>"
CONTROL = "control"
MAX_NAME = 128  # AuditRecord.identity and .action: longer, the record would not validate
_OUTCOMES: dict[str, Outcome] = {"ok": "ok", "refused": "refused", "failed": "error"}


class Record(Protocol):
    def __call__(self, kind: AuditKind, identity: str, action: str, outcome: Outcome, *,
                 code: str = "", trace_id: str | None = None, workflow_id: str | None = None,
                 payload: bytes | None = None,
                 detail: dict[str, Any] | None = None) -> Awaitable[None]: ...


class _Explained(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    summary: Annotated[str, Field(max_length=300)] = ""


class _AlertSummary(BaseModel):
    """The part of an alert worth a line in the audit log (see agents/anomaly/alerts.py)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    kind: Annotated[str, Field(max_length=64)]
    severity: Annotated[str, Field(max_length=16)]
    identity: Annotated[str, Field(max_length=128)] = ""
    explanation: _Explained = Field(default_factory=_Explained)


class FeedRecorder:
    subjects = (ACTION_EVENT, ALERTS)

    def __init__(self, record: Record) -> None:
        self.record = record

    async def on_message(self, msg: SignedMessage) -> None:
        try:
            if msg.subject == ACTION_EVENT:
                await self._control(msg)
            else:
                await self._alert(msg)
        except Exception:
            log.exception("orchestrator.feed_failed", subject=msg.subject)

    async def _control(self, msg: SignedMessage) -> None:
        if msg.sender != CONTROL:
            log.warning("orchestrator.feed_sender_mismatch", subject=msg.subject,
                        sender=msg.sender)
            return
        try:
            action: ControlAction | None = ControlAction.model_validate_json(msg.data)
        except ValidationError:
            action = None
        if action is None or max(len(action.by), len(action.agent)) > MAX_NAME:
            await self.record("control", msg.sender, "unknown", "error", code="malformed",
                              trace_id=msg.trace_id, payload=msg.data)
            return
        await self.record("control", action.by, action.action, _OUTCOMES[action.outcome],
                          trace_id=msg.trace_id,
                          detail={"agent": action.agent, "via": msg.sender,
                                  "state": action.state, "reason": action.reason})

    async def _alert(self, msg: SignedMessage) -> None:
        name = msg.subject.removeprefix("mas.alert.")[:MAX_NAME]
        try:
            alert = _AlertSummary.model_validate_json(msg.data)
        except ValidationError:
            await self.record("alert", msg.sender, name, "error", code="malformed",
                              trace_id=msg.trace_id, payload=msg.data)
            return
        await self.record("alert", msg.sender, name, "info", trace_id=msg.trace_id,
                          payload=msg.data,
                          detail={"kind": alert.kind, "severity": alert.severity,
                                  "about": alert.identity,
                                  "summary": alert.explanation.summary})
