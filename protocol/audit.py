"""One record of the audit trail, as the orchestrator appends it to the ``MAS_AUDIT``
stream on ``mas.audit.<kind>`` (read-only for agents granted ``read_streams: [audit]``).

Records are canonical JSON, chained by ``prev_hash`` and signed by the orchestrator
(``sig`` over the record without ``sig``). ``identity`` is who acted (an agent, the
orchestrator, the operator, or for broker-reported events the identity the server
named); ``outcome`` is what happened to the attempt. ``trace_id``/``span_id`` tie the
record to the OpenTelemetry span it was written in.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue

AuditKind = Literal[
    "command",            # a workflow step sent to an agent, and its result
    "token_issued",
    "token_request",      # an agent asked for a token for a sensitive action
    "approval_requested",
    "approval_decided",
    "revocation",
    "registration",
    "violation",          # the broker refused a publish or subscription
    "auth_failure",       # the broker refused a login
    "workflow",
    "alert",
    "control",            # control started, stopped or restarted an agent
    "system",
    "checkpoint",         # a signed note (``detail.note``) over the records before it
]
Outcome = Literal["ok", "refused", "error", "pending", "approved", "denied", "expired", "info"]


class AuditRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    seq: Annotated[int, Field(ge=1)]
    ts: float
    kind: AuditKind
    identity: Annotated[str, Field(max_length=128)]
    action: Annotated[str, Field(max_length=128)] = ""
    outcome: Outcome
    code: Annotated[str, Field(max_length=64)] = ""
    trace_id: Annotated[str, Field(max_length=32)] | None = None
    span_id: Annotated[str, Field(max_length=16)] | None = None
    workflow_id: Annotated[str, Field(max_length=64)] | None = None
    payload_sha256: Annotated[str, Field(max_length=64)] | None = None
    detail: dict[str, JsonValue] = Field(default_factory=dict)
    prev_hash: Annotated[str, Field(max_length=64)]
    kid: Annotated[str, Field(max_length=16)] = ""
    sig: Annotated[str, Field(max_length=128)] = ""
