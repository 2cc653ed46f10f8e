"""What a handler gets besides its arguments: a logger, its state, a way to emit events
and to propose actions. Backed by the broker in production and by memory in an agent's
own unit tests (``Context.offline``), so domain code never touches NATS."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import structlog
from pydantic import BaseModel, JsonValue

from protocol.actions import Proposal
from protocol.explain import Explanation

M = TypeVar("M", bound=BaseModel)


Change = Callable[[bytes | None], bytes]
UPDATE_ATTEMPTS = 16


class StateConflict(Exception):
    """``State.update`` lost the race for a key more times than it retries."""


class State(Protocol):
    """An agent's own key-value state (its ``agent_<name>`` KV bucket)."""

    async def get(self, key: str) -> bytes | None: ...

    async def put(self, key: str, value: bytes) -> None: ...

    async def update(self, key: str, change: Change) -> bytes:
        """Read-modify-write without lost updates: ``change`` gets the current value (None
        when there is none) and returns the new one, which is written only if nobody
        wrote the key in between; otherwise ``change`` runs again on the newer value (a
        bounded number of times, then ``StateConflict``). Returns what was written.
        ``change`` must be a pure function of its argument: it may run more than once."""
        ...

    async def delete(self, key: str) -> None: ...

    async def keys(self, prefix: str = "") -> list[str]:
        """Live keys starting with ``prefix`` (end it with "." to let the server filter)."""
        ...


class MemoryState:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    async def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    async def put(self, key: str, value: bytes) -> None:
        self.data[key] = value

    async def update(self, key: str, change: Change) -> bytes:
        self.data[key] = value = change(self.data.get(key))
        return value

    async def delete(self, key: str) -> None:
        self.data.pop(key, None)

    async def keys(self, prefix: str = "") -> list[str]:
        return sorted(k for k in self.data if k.startswith(prefix))


async def load_model(state: State, key: str, model: type[M]) -> M | None:
    raw = await state.get(key)
    return None if raw is None else model.model_validate_json(raw)


async def save_model(state: State, key: str, value: BaseModel) -> None:
    await state.put(key, value.model_dump_json().encode())


async def update_model(state: State, key: str, model: type[M],
                       change: Callable[[M | None], M]) -> M:
    """``State.update`` for a key holding a pydantic model."""
    def apply(raw: bytes | None) -> bytes:
        current = None if raw is None else model.model_validate_json(raw)
        return change(current).model_dump_json().encode()

    return model.model_validate_json(await state.update(key, apply))


Publish = Callable[[str, BaseModel], Awaitable[None]]


@dataclass(frozen=True)
class Event:
    """A verified message from a subscription: ``sender`` is authenticated."""

    subject: str
    data: bytes
    sender: str
    trace_id: str | None = None


@dataclass
class Context:
    agent: str
    publish: Publish
    state: State | None = None
    log: Any = field(default_factory=lambda: structlog.get_logger("mas.agent"))
    trace_id: str | None = None
    proposals: list[Proposal] = field(default_factory=list)
    settings: dict[str, str] = field(default_factory=dict)
    published: list[tuple[str, BaseModel]] = field(default_factory=list)

    @classmethod
    def offline(cls, agent: str, *, state: State | None = None,
                settings: dict[str, str] | None = None) -> Context:
        """A context for unit tests: published messages land in ``published``."""
        sent: list[tuple[str, BaseModel]] = []

        async def record(subject: str, payload: BaseModel) -> None:
            sent.append((subject, payload))

        return cls(agent, record, state if state is not None else MemoryState(),
                   settings=settings or {}, published=sent)

    def for_request(self, trace_id: str | None) -> Context:
        """A copy for one request, with its own trace id and proposals."""
        return Context(self.agent, self.publish, self.state,
                       self.log.bind(trace_id=trace_id) if trace_id else self.log,
                       trace_id, [], self.settings, self.published)

    async def emit(self, topic: str, payload: BaseModel) -> None:
        """Publish an event on ``mas.event.<agent>.<topic>``."""
        await self.publish(f"mas.event.{self.agent}.{topic}", payload)

    async def alert(self, kind: str, payload: BaseModel) -> None:
        """Publish on ``mas.alert.<kind>`` (the policy must grant it)."""
        await self.publish(f"mas.alert.{kind}", payload)

    def propose(self, action: str, explanation: Explanation, *, agent: str | None = None,
                args: dict[str, JsonValue] | None = None) -> Proposal:
        """Suggest an action (by default one of this agent's own); the orchestrator
        decides, and a human approves it if it is sensitive."""
        proposal = Proposal(agent=agent or self.agent, action=action, args=args or {},
                            explanation=explanation)
        self.proposals.append(proposal)
        return proposal
