"""What the Anthropic and OpenAI planners share: one ``plan`` around three provider hooks.

Both ask the model once per round with the catalog's actions as tools (``prompting``),
turn its tool calls into steps (``calls``) and report any failure to reach it as one
``PlannerUnavailable`` line. A provider says only how a tool is written for its API
(``_tool``), how the model is asked (``_ask``) and how its answer is read (``_read``).

Both SDKs are generated alike (Stainless), so their errors line up: a status error
carries the HTTP status and the decoded body, a timeout is a kind of connection error.
They are imported here for type checking only: choosing one planner loads one SDK.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Generic, Protocol, Self, TypeVar

from orchestrator.plan import Catalog, Plan, PlannerUnavailable, PlanRejected
from orchestrator.planners.calls import api_failure, one_line
from orchestrator.planners.prompting import ToolSpec, tool_specs, user_message

if TYPE_CHECKING:
    import anthropic
    import openai


class _Client(Protocol):
    @property
    def base_url(self) -> object: ...


LLM_TIMEOUT_S = 60.0
LLM_RETRIES = 2

ClientT = TypeVar("ClientT", bound=_Client)
ToolT = TypeVar("ToolT")
AnswerT = TypeVar("AnswerT")


@dataclass(frozen=True)
class Provider:
    """Whom a planner asks: the name its error lines give, the variable that holds the
    key (named when the key is refused), and its SDK's exception classes from the most
    specific to the SDK's base class."""

    name: str
    key_env: str
    status: type[anthropic.APIStatusError] | type[openai.APIStatusError]
    timeout: type[Exception]
    connection: type[Exception]
    other: type[Exception]


class LLMPlanner(ABC, Generic[ClientT, ToolT, AnswerT]):
    """A planner that asks an LLM through its provider's SDK. The client is passed in,
    so its key, base URL, retries and timeout are the caller's (``connect`` builds one
    from settings; tests point one at a loopback fake)."""

    name: str
    follows_up = True
    provider: ClassVar[Provider]

    def __init__(self, client: ClientT, model: str, *, max_tokens: int = 2048) -> None:
        self.client = client
        self.model = model
        self.max_tokens = max_tokens

    @classmethod
    def connect(cls, key: str, base_url: str | None, model: str) -> Self:
        """A planner with its own SDK client (``LLM_TIMEOUT_S``, ``LLM_RETRIES``);
        without ``base_url`` the client talks to the provider's real API."""
        return cls(cls._client(key, base_url), model)

    async def plan(self, request: str, catalog: Catalog, *,
                   untrusted: Sequence[str] = ()) -> Plan:
        tools = [self._tool(spec) for spec in tool_specs(catalog)]
        if not tools:
            raise PlanRejected("no agent has registered an action yet; nothing to plan with")
        provider = self.provider
        try:
            answer = await self._ask(tools, user_message(request, untrusted))
        except provider.status as exc:
            raise api_failure(provider.name, provider.key_env, exc.status_code,
                              exc.body) from None
        except provider.timeout:
            raise PlannerUnavailable(f"{provider.name} did not answer in time") from None
        except provider.connection:
            raise PlannerUnavailable(
                f"cannot reach {provider.name} at {self.client.base_url}") from None
        except provider.other as exc:
            raise PlannerUnavailable(f"{provider.name} gave an unusable answer: "
                                     f"{one_line(str(exc), redact=True)}") from None
        return self._read(answer, catalog)

    @classmethod
    @abstractmethod
    def _client(cls, key: str, base_url: str | None) -> ClientT:
        """The provider's SDK client with ``LLM_TIMEOUT_S`` and ``LLM_RETRIES``."""

    @abstractmethod
    def _tool(self, spec: ToolSpec) -> ToolT:
        """One catalog action as the provider's API describes a tool."""

    @abstractmethod
    async def _ask(self, tools: list[ToolT], message: str) -> AnswerT:
        """The model's answer to the system prompt, ``message`` and ``tools``."""

    @abstractmethod
    def _read(self, answer: AnswerT, catalog: Catalog) -> Plan:
        """The plan the answer's tool calls make, or ``PlanRejected`` saying why none."""
