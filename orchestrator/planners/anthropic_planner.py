"""The Anthropic planner: Claude's tool use, through the official ``anthropic`` SDK.

Tools are the catalog's actions, one each (see ``prompting.tool_specs``); every
``tool_use`` block of the answer becomes a step (see ``calls``). What it shares with the
OpenAI planner (the client, the error lines) is in ``llm``.
"""

from __future__ import annotations

import anthropic
from anthropic.types import Message, ToolParam

from orchestrator.plan import Catalog, Plan, PlanRejected
from orchestrator.planners.calls import ToolCall, plan_from_calls
from orchestrator.planners.llm import LLM_RETRIES, LLM_TIMEOUT_S, LLMPlanner, Provider
from orchestrator.planners.prompting import SYSTEM_PROMPT, ToolSpec

# "end_turn" is a text-only answer (no tool call): plan_from_calls rejects it with the text.
_FINISHED = {"tool_use", "end_turn", "stop_sequence"}


class AnthropicPlanner(LLMPlanner[anthropic.AsyncAnthropic, ToolParam, Message]):
    name = "anthropic"
    provider = Provider("Anthropic", "ANTHROPIC_API_KEY", anthropic.APIStatusError,
                        anthropic.APITimeoutError, anthropic.APIConnectionError,
                        anthropic.APIError)

    def _tool(self, spec: ToolSpec) -> ToolParam:
        return ToolParam(name=spec.name, description=spec.description,
                         input_schema=dict(spec.schema))

    async def _ask(self, tools: list[ToolParam], message: str) -> Message:
        return await self.client.messages.create(
            model=self.model, max_tokens=self.max_tokens, system=SYSTEM_PROMPT,
            messages=[{"role": "user", "content": message}],
            tools=tools, tool_choice={"type": "auto"},
        )

    def _read(self, answer: Message, catalog: Catalog) -> Plan:
        if answer.stop_reason not in _FINISHED:
            raise PlanRejected(f"{self.name}: the model stopped before finishing "
                               f"({answer.stop_reason}); nothing is planned")
        calls = [ToolCall(block.name, block.input)
                 for block in answer.content if block.type == "tool_use"]
        text = " ".join(block.text for block in answer.content if block.type == "text")
        return plan_from_calls(calls, catalog, planner=self.name, text=text)

    @classmethod
    def _client(cls, key: str, base_url: str | None) -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(api_key=key, base_url=base_url, timeout=LLM_TIMEOUT_S,
                                        max_retries=LLM_RETRIES)
