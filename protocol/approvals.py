"""Approvals as stored in the ``mas_approvals`` KV bucket and shown to the operator, and
the operator's requests about them (``mas.admin.approvals.*``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from protocol.actions import Name
from protocol.explain import Explanation
from security.decisions import ApprovalDecision

ApprovalId = Annotated[str, Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")]
ApprovalStatus = Literal["pending", "approved", "denied", "expired", "used"]


class Approval(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: ApprovalId
    agent: Name
    action: Name
    args: dict[str, JsonValue]
    args_sha256: str
    explanation: Explanation
    requested_by: Annotated[str, Field(max_length=64)]
    workflow_id: Annotated[str, Field(max_length=64)] | None = None
    step_id: Annotated[str, Field(max_length=32)] | None = None
    trace_id: Annotated[str, Field(max_length=32)] | None = None
    created_at: int
    expires_at: int
    status: ApprovalStatus = "pending"
    decision: ApprovalDecision | None = None
    token_jti: Annotated[str, Field(max_length=64)] | None = None


class ApprovalQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: ApprovalId | None = None
    status: ApprovalStatus | None = None


class ApprovalList(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    approvals: list[Approval] = Field(default_factory=list)
    omitted: int = 0  # left out to keep the answer within one message; ask by id


class AdminError(BaseModel):
    """What an admin endpoint answers when it refuses: ``code`` and a one-line reason."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    status: Literal["error"] = "error"
    code: Annotated[str, Field(max_length=64)]
    reason: Annotated[str, Field(max_length=500)]
