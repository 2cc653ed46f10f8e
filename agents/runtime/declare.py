"""Declaring an agent: its actions, periodic checks and event handlers.

An agent's own module creates one ``Agent`` and decorates plain async functions; the
runtime (``agents.runtime.service``) does everything else. Input and output models come
from the handler's type hints, so the schema the orchestrator sees is the one the
handler gets::

    agent = Agent("backup", version="1.0.0", kind="polling")

    @agent.action(description="Report each backup's age and health.")
    async def check_backups(args: CheckIn, ctx: Context) -> CheckOut: ...

    @agent.every(seconds=300)
    async def poll(ctx: Context) -> None: ...
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, get_type_hints

from pydantic import BaseModel

from protocol.registry import ActionSpec, AgentKind

if TYPE_CHECKING:
    from agents.runtime.context import Context, Event

ActionHandler = Callable[[Any, "Context"], Awaitable[Any]]
PollHandler = Callable[["Context"], Awaitable[None]]
EventHandler = Callable[["Event", "Context"], Awaitable[None]]


class ActionError(Exception):
    """Raised by a handler for an expected failure the caller should see by its code
    (``not_configured``, ``not_found``...); the runtime answers ``Failed(code, reason)``.
    Any other exception is a bug and is answered as ``handler_error`` without details."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class DeclarationError(TypeError):
    """An agent module declares something the runtime cannot serve."""


@dataclass(frozen=True)
class ActionDef:
    name: str
    handler: ActionHandler
    input_model: type[BaseModel]
    output_model: type[BaseModel]
    description: str
    sensitive: bool

    def spec(self) -> ActionSpec:
        return ActionSpec(
            name=self.name, description=self.description, sensitive=self.sensitive,
            input_schema=self.input_model.model_json_schema(),
            output_schema=self.output_model.model_json_schema(),
        )


@dataclass(frozen=True)
class PollDef:
    name: str
    handler: PollHandler
    seconds: float
    jitter: float
    max_backoff: float


@dataclass(frozen=True)
class EventDef:
    name: str
    subject: str
    handler: EventHandler


@dataclass
class Agent:
    name: str
    version: str = "0.1.0"
    kind: AgentKind = "stateless"
    description: str = ""
    state: bool = False  # its own KV bucket (the policy must say `state: true` too)
    actions: dict[str, ActionDef] = field(default_factory=dict)
    polls: list[PollDef] = field(default_factory=list)
    events: list[EventDef] = field(default_factory=list)

    @property
    def stateful(self) -> bool:
        return self.state or self.kind == "stateful"

    def action(
        self, name: str | None = None, *, description: str = "", sensitive: bool = False
    ) -> Callable[[ActionHandler], ActionHandler]:
        def register(fn: ActionHandler) -> ActionHandler:
            action = name or fn.__name__
            if action in self.actions:
                raise DeclarationError(f"{self.name}: action {action!r} declared twice")
            input_model, output_model = _models(fn)
            self.actions[action] = ActionDef(
                action, fn, input_model, output_model,
                description or inspect.getdoc(fn) or "", sensitive)
            return fn
        return register

    def every(
        self, seconds: float, *, jitter: float = 0.1, max_backoff: float | None = None
    ) -> Callable[[PollHandler], PollHandler]:
        """Run the function every ``seconds`` (± ``jitter`` as a fraction); after a
        failure wait twice as long each time, up to ``max_backoff`` (default 10x)."""
        if seconds <= 0 or not 0 <= jitter < 1:
            raise DeclarationError("every(): seconds must be > 0 and jitter in [0, 1)")

        def register(fn: PollHandler) -> PollHandler:
            self.polls.append(PollDef(fn.__name__, fn, seconds, jitter,
                                      max_backoff if max_backoff is not None else seconds * 10))
            return fn
        return register

    def on_event(self, subject: str) -> Callable[[EventHandler], EventHandler]:
        """Handle messages on ``subject`` (which the policy must let this agent read)."""
        def register(fn: EventHandler) -> EventHandler:
            self.events.append(EventDef(fn.__name__, subject, fn))
            return fn
        return register

    async def invoke(self, action: str, args: BaseModel | dict[str, Any], ctx: Context) -> Any:
        """Call a handler directly, without the broker: for an agent's own unit tests."""
        definition = self.actions[action]
        model = args if isinstance(args, BaseModel) else definition.input_model.model_validate(args)
        return await definition.handler(model, ctx)


def _models(fn: ActionHandler) -> tuple[type[BaseModel], type[BaseModel]]:
    try:
        hints = get_type_hints(fn)
    except NameError as exc:
        raise DeclarationError(f"{fn.__name__}: type hints must be importable: {exc}") from exc
    params = [p for p in inspect.signature(fn).parameters if p != "return"]
    if not inspect.iscoroutinefunction(fn) or len(params) != 2:
        raise DeclarationError(f"{fn.__name__}: an action is `async def f(args: Model, ctx)`")
    models = []
    for what, model in (("argument", hints.get(params[0])), ("return", hints.get("return"))):
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise DeclarationError(f"{fn.__name__}: the {what} type must be a pydantic model")
        models.append(model)
    return models[0], models[1]

