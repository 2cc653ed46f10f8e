"""Why an agent proposes or did something: shown to the operator with every approval."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, JsonValue


class Explanation(BaseModel):
    """``summary`` is one line for a list; ``reason`` the argument; ``data`` what it was
    based on (no secrets: it is stored and shown); ``confidence`` how sure, 0..1."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    summary: Annotated[str, Field(min_length=1, max_length=200)]
    reason: Annotated[str, Field(max_length=2000)] = ""
    data: dict[str, JsonValue] = Field(default_factory=dict)
    confidence: Annotated[float, Field(ge=0.0, le=1.0)]
