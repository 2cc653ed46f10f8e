"""What an agent announces on start (``mas.orch.register``) and on every heartbeat."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from protocol.actions import Name

AgentKind = Literal["stateless", "stateful", "polling", "reactive"]


class ActionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name
    description: Annotated[str, Field(max_length=500)] = ""
    sensitive: bool = False
    input_schema: dict[str, JsonValue]
    output_schema: dict[str, JsonValue]


class Registration(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    agent: Name
    version: Annotated[str, Field(max_length=64)]
    kind: AgentKind
    instance: Annotated[str, Field(max_length=64)]
    actions: Annotated[list[ActionSpec], Field(max_length=64)]


class RegistrationAck(BaseModel):
    """The orchestrator's answer: which announced actions it accepted, and why not the rest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    accepted: list[Name] = Field(default_factory=list)
    rejected: dict[str, Annotated[str, Field(max_length=300)]] = Field(default_factory=dict)


class Heartbeat(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    agent: Name
    instance: Annotated[str, Field(max_length=64)]
    version: Annotated[str, Field(max_length=64)]
    kind: AgentKind
    ts: float
    uptime_s: float
    handled: int = 0
    refused: int = 0
    failed: int = 0
    state: Literal["starting", "ready", "draining"] = "ready"
