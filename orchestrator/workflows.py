"""Workflow state as stored in the ``mas_workflows`` KV bucket (``wf.<id>``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from orchestrator.plan import Plan

WorkflowStatus = Literal["running", "waiting_approval", "completed", "failed", "rejected"]
StepStatus = Literal["pending", "running", "waiting_approval", "done", "failed", "refused",
                     "skipped"]


class StepState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: StepStatus = "pending"
    sensitive: bool = False
    jti: str | None = None  # the step's idempotency key, set before the command is sent
    approval_id: str | None = None
    output: dict[str, JsonValue] | None = None
    code: str = ""
    reason: Annotated[str, Field(max_length=500)] = ""
    attempts: int = 0


class Workflow(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    request: Annotated[str, Field(max_length=2000)]
    planner: str = ""
    plan: Plan | None = None
    round: int = 1  # rounds of steps so far; a planner that follows up adds one per answer
    status: WorkflowStatus = "running"
    steps: dict[str, StepState] = Field(default_factory=dict)
    reason: Annotated[str, Field(max_length=500)] = ""
    trace_id: str | None = None
    created_at: float
    updated_at: float

    @property
    def finished(self) -> bool:
        return self.status in ("completed", "failed", "rejected")
