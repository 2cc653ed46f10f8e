"""Commands to agents and what they answer.

A command is a request on ``mas.agent.<agent>.<action>`` whose payload is the action's
input model as JSON and whose envelope carries a capability token. The reply is one
of three outcomes, told apart by ``status``:

- ``ok``: the handler ran; ``output`` is its output model, ``proposals`` what it suggests
  doing next (each explained, none executed by the agent itself);
- ``refused``: the runtime did not let the handler see the request (token, envelope,
  approval); ``code`` names the check;
- ``error``: the input did not validate or the handler failed; ``code`` says which.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, TypeAdapter

from protocol.explain import Explanation

# Agent, action and refusal-code names: lower-case identifiers, as policy.yaml spells them.
Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_]*$")]
Code = Name


class Proposal(BaseModel):
    """An action an agent suggests; the orchestrator decides, a human approves if sensitive."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    agent: Name
    action: Name
    args: dict[str, JsonValue] = Field(default_factory=dict)
    explanation: Explanation


class Completed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    status: Literal["ok"] = "ok"
    output: dict[str, JsonValue] = Field(default_factory=dict)
    proposals: list[Proposal] = Field(default_factory=list, max_length=32)


class Refused(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    status: Literal["refused"] = "refused"
    code: Code
    reason: Annotated[str, Field(max_length=500)] = ""


class Failed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    status: Literal["error"] = "error"
    code: Code
    reason: Annotated[str, Field(max_length=500)] = ""


ActionReply = Annotated[Completed | Refused | Failed, Field(discriminator="status")]
REPLY = TypeAdapter[Completed | Refused | Failed](ActionReply)
