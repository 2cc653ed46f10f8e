"""The notify agent's inputs and outputs."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from agents.notify.settings import ContactName

Priority = Literal["min", "low", "default", "high", "urgent"]
PRIORITY_LEVEL: dict[Priority, int] = {"min": 1, "low": 2, "default": 3, "high": 4, "urgent": 5}
Title = Annotated[str, Field(max_length=250)]
Message = Annotated[str, Field(min_length=1, max_length=4096)]  # ntfy's message limit
Tag = Annotated[str, Field(min_length=1, max_length=64)]


class Note(BaseModel):
    """What is delivered, whoever it is for."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    title: Title
    message: Message
    priority: Priority = "default"
    tags: Annotated[list[Tag], Field(max_length=10)] = Field(default_factory=list)


class NotifyOwnerIn(Note):
    """The shape the health agent proposes."""


class SendMessageIn(BaseModel):
    """``to`` is the name of a configured contact, never an address (see README)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    to: ContactName
    title: Title
    message: Message


class Delivery(BaseModel):
    channel: Literal["ntfy", "webhook"]
    ok: bool
    status: int | None = None  # the HTTP status, when there was an answer
    id: str | None = None  # ntfy's message id
    error: str | None = None


ErrorCode = Literal["not_configured", "unknown_contact", "not_delivered"]


class NotifyError(BaseModel):
    code: ErrorCode
    message: str


class NotifyOut(BaseModel):
    delivered: bool  # at least one channel took it
    recipient: str  # "owner" or the contact's name
    deliveries: list[Delivery] = Field(default_factory=list)
    error: NotifyError | None = None
