"""Home Assistant's state objects and the home agent's inputs and outputs."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator

from agents.home.settings import EntityId
from protocol.actions import Proposal
from protocol.explain import Explanation

# Home Assistant domain and service names are slugs; checking them here also means
# nothing from the arguments can change the shape of the URL path.
Slug = Annotated[str, Field(pattern=r"^[a-z0-9_]+$", min_length=1, max_length=64)]

# Target keys that would widen a call beyond the entities the approval names.
TARGET_KEYS = frozenset({"entity_id", "device_id", "area_id", "floor_id", "label_id"})


class StateContext(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str
    parent_id: str | None = None
    user_id: str | None = None


class EntityState(BaseModel):
    """One entry of ``GET /api/states``; fields newer than Home Assistant 2024.3 are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    entity_id: str
    state: str
    attributes: dict[str, JsonValue] = Field(default_factory=dict)
    last_changed: datetime
    last_updated: datetime
    context: StateContext | None = None


def fit(states: list[EntityState], max_bytes: int) -> list[EntityState]:
    """The leading states whose JSON fits in ``max_bytes``."""
    kept: list[EntityState] = []
    used = 0
    for state in states:
        used += len(state.model_dump_json()) + 1
        if used > max_bytes:
            break
        kept.append(state)
    return kept


ErrorCode = Literal["not_configured", "unauthorized", "not_found", "bad_request", "timeout",
                    "unreachable", "bad_response"]


class HomeError(BaseModel):
    """Why Home Assistant could not be asked or did not do it; ``message`` says what to do."""

    model_config = ConfigDict(frozen=True)

    code: ErrorCode
    message: str


class ListStatesIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    domain: Slug | None = None  # e.g. "light"; all entities when absent


class ListStatesOut(BaseModel):
    states: list[EntityState] = Field(default_factory=list)
    total: int = 0  # matching entities, before truncation
    truncated: bool = False
    error: HomeError | None = None


class GetStateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    entity_id: EntityId


class GetStateOut(BaseModel):
    state: EntityState | None = None
    error: HomeError | None = None


class CallServiceIn(BaseModel):
    """``entity_id`` lists every entity touched; ``data`` is the service data without
    targets, so the approval shows exactly what the call reaches."""

    model_config = ConfigDict(extra="forbid")

    domain: Slug
    service: Slug
    entity_id: Annotated[list[EntityId], Field(max_length=50)] = Field(default_factory=list)
    data: dict[str, JsonValue] = Field(default_factory=dict)

    @field_validator("data")
    @classmethod
    def _no_targets(cls, value: dict[str, JsonValue]) -> dict[str, JsonValue]:
        widened = sorted(TARGET_KEYS & value.keys())
        if widened:
            raise ValueError(f"put targets in entity_id, not data ({', '.join(widened)})")
        return value


class CallServiceOut(BaseModel):
    explanation: Explanation  # what the call does, classified by domain
    changed: list[EntityState] = Field(default_factory=list)
    error: HomeError | None = None


class HomeSuggestion(BaseModel):
    """Published on ``mas.event.home.suggestion``: something the home could do, for the
    orchestrator to propose; the agent never acts on its own."""

    model_config = ConfigDict(frozen=True)

    trigger: str  # the subject of the event that prompted it
    proposal: Proposal
