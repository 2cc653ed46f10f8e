"""The Anthropic planner: Claude's tool use, through the official ``anthropic`` SDK.

Tools are the catalog's actions, one each (see ``prompting.tool_specs``); every
``tool_use`` block of the answer becomes a step (see ``calls``). The client is passed
in, so its key, base URL, retries and timeout are the caller's (``make_planner`` builds
it from settings; tests point it at a loopback fake).
"""

from __future__ import annotations

from collections.abc import Sequence

import anthropic
from anthropic.types import ToolParam

from orchestrator.plan import Catalog, Plan, PlannerUnavailable, PlanRejected
from orchestrator.planners.calls import (
    ToolCall,
    api_failure,
    one_line,
    plan_from_calls,
)
from orchestrator.planners.prompting import SYSTEM_PROMPT, tool_specs, user_message

PROVIDER = "Anthropic"
KEY_ENV = "ANTHROPIC_API_KEY"
# "end_turn" is a text-only answer (no tool call): plan_from_calls rejects it with the text.
_FINISHED = {"tool_use", "end_turn", "stop_sequence"}


class AnthropicPlanner:
    name = "anthropic"
    follows_up = True

    def __init__(self, client: anthropic.AsyncAnthropic, model: str, *,
                 max_tokens: int = 2048) -> None:
        self.client = client
        self.model = model
        self.max_tokens = max_tokens

    async def plan(self, request: str, catalog: Catalog, *,
                   untrusted: Sequence[str] = ()) -> Plan:
        tools = [ToolParam(name=t.name, description=t.description, input_schema=dict(t.schema))
                 for t in tool_specs(catalog)]
        if not tools:
            raise PlanRejected("no agent has registered an action yet; nothing to plan with")
        try:
            message = await self.client.messages.create(
                model=self.model, max_tokens=self.max_tokens, system=SYSTEM_PROMPT,
                messages=[{"role": "user", "content": user_message(request, untrusted)}],
                tools=tools, tool_choice={"type": "auto"},
            )
        except anthropic.APIStatusError as exc:
            raise api_failure(PROVIDER, KEY_ENV, exc.status_code, exc.body) from None
        except anthropic.APITimeoutError:
            raise PlannerUnavailable(f"{PROVIDER} did not answer in time") from None
        except anthropic.APIConnectionError:
            raise PlannerUnavailable(
                f"cannot reach {PROVIDER} at {self.client.base_url}") from None
        except anthropic.APIError as exc:
            raise PlannerUnavailable(f"{PROVIDER} gave an unusable answer: "
                                     f"{one_line(str(exc), redact=True)}") from None
        if message.stop_reason not in _FINISHED:
            raise PlanRejected(f"{self.name}: the model stopped before finishing "
                               f"({message.stop_reason}); nothing is planned")
        calls = [ToolCall(block.name, block.input)
                 for block in message.content if block.type == "tool_use"]
        text = " ".join(block.text for block in message.content if block.type == "text")
        return plan_from_calls(calls, catalog, planner=self.name, text=text)
