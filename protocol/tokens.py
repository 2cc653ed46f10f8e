"""An agent asking the orchestrator for a token to run one sensitive action
(``mas.orch.token.request``), and the answer."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from protocol.actions import Name
from protocol.explain import Explanation


class TokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    agent: Name  # who asks (must be the envelope's sender)
    action: Name
    target: Name | None = None  # whose action it is; default: the asking agent's own
    args: dict[str, JsonValue] = Field(default_factory=dict)
    explanation: Explanation

    @property
    def action_agent(self) -> str:
        return self.target or self.agent


class TokenRequestReply(BaseModel):
    """``pending``: held for a human, ``approval_id`` to follow; ``denied``: with reason."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    status: Literal["pending", "denied", "granted"]
    approval_id: Annotated[str, Field(max_length=64)] | None = None
    token: Annotated[str, Field(max_length=4096)] | None = None
    reason: Annotated[str, Field(max_length=500)] = ""
