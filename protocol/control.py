"""The operator's requests to the control service on ``mas.control.*`` and its answers.

Control starts, stops and inspects agents (containers, or processes in local mode); it
answers only the operator, and refusals come back as ``protocol.approvals.AdminError``.
Every action it takes is also announced as a ``ControlAction`` event for the audit log.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

CONTROL = "mas.control"
AGENT_START = f"{CONTROL}.agent.start"
AGENT_STOP = f"{CONTROL}.agent.stop"
AGENT_RESTART = f"{CONTROL}.agent.restart"
STATUS = f"{CONTROL}.status"
LOGS = f"{CONTROL}.logs"
ACTION_EVENT = "mas.event.control.action"

AgentName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")]
Action = Literal["start", "stop", "restart"]
State = Literal["running", "starting", "restarting", "unhealthy", "stopped", "exited",
                "failed", "missing"]
MAX_LOG_LINES = 1000


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AgentRequest(_Wire):
    agent: AgentName


class StatusRequest(_Wire):
    agent: AgentName | None = None


class AgentStatus(_Wire):
    agent: str
    state: State
    health: Annotated[str, Field(max_length=32)] | None = None
    backend: Literal["docker", "process"]
    # container short id(s) or process id; never command lines or environments
    ref: Annotated[str, Field(max_length=200)] = ""
    since: Annotated[str, Field(max_length=40)] = ""  # when it last started (ISO 8601)
    restarts: int = 0
    exit_code: int | None = None


class StatusReply(_Wire):
    agents: list[AgentStatus]


class LogsRequest(_Wire):
    agent: AgentName
    tail: Annotated[int, Field(ge=1, le=MAX_LOG_LINES)] = 100
    # where the previous answer stopped (follow mode); opaque to the caller
    cursor: Annotated[str, Field(max_length=64, pattern=r"^[0-9.]+$")] | None = None


class LogsReply(_Wire):
    agent: str
    lines: list[str]
    cursor: str | None = None  # pass back to get only newer lines
    truncated: bool = False  # more lines were ready than one answer holds


class ControlAction(_Wire):
    """Announced on ``mas.event.control.action`` after every start, stop or restart."""

    agent: str
    action: Action
    by: str
    outcome: Literal["ok", "refused", "failed"]
    state: State | None = None
    reason: Annotated[str, Field(max_length=500)] = ""
