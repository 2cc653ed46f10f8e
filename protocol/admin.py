"""The operator's requests to the orchestrator on ``mas.admin.*`` and their answers."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

ADMIN = "mas.admin"
APPROVALS_LIST = f"{ADMIN}.approvals.list"
APPROVALS_DECIDE = f"{ADMIN}.approvals.decide"
REVOKE = f"{ADMIN}.revoke"
WORKFLOWS_RUN = f"{ADMIN}.workflows.run"
WORKFLOWS_LIST = f"{ADMIN}.workflows.list"


class RevokeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["jti", "agent"]
    target: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")]
    reason: Annotated[str, Field(max_length=500)] = ""
    lift: bool = False


class WorkflowRunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    request: Annotated[str, Field(min_length=1, max_length=2000)]
    wait_s: Annotated[float, Field(ge=0, le=120)] = 0


class WorkflowQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # a KV key: an empty or dotted id would make the store raise instead of "not found"
    id: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")] \
        | None = None


class Ok(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    status: Literal["ok"] = "ok"
    detail: Annotated[str, Field(max_length=500)] = ""
