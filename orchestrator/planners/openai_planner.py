"""The OpenAI planner: chat completions with function calling, through the official
``openai`` SDK.

Same contract as the Anthropic planner (see ``llm``, and ``calls`` for how calls become
steps). One difference in what can go wrong: OpenAI returns each call's arguments as a
JSON *string*, which a model can get wrong; a call whose arguments are not a JSON object
rejects the whole plan rather than running with guessed arguments.
"""

from __future__ import annotations

import json
import math

import openai
from openai.types.chat import ChatCompletion, ChatCompletionFunctionToolParam

from orchestrator.plan import Catalog, Plan, PlannerUnavailable, PlanRejected
from orchestrator.planners.calls import ToolCall, one_line, plan_from_calls, shown_name
from orchestrator.planners.llm import LLM_RETRIES, LLM_TIMEOUT_S, LLMPlanner, Provider
from orchestrator.planners.prompting import SYSTEM_PROMPT, ToolSpec

_FINISHED = {"tool_calls", "stop"}


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is out of range")
    return value


def decode_arguments(index: int, name: str, raw: str) -> object:
    """The arguments of call ``index`` (from 1), or ``PlanRejected`` naming the step."""
    try:
        return json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        why = f"{exc.msg} at character {exc.pos}"
    except (ValueError, RecursionError) as exc:
        why = one_line(str(exc) or type(exc).__name__, 80)
    raise PlanRejected(f"step s{index}: the model's arguments for {shown_name(name)} are not "
                       f"valid JSON ({why})")


class OpenAIPlanner(LLMPlanner[openai.AsyncOpenAI, ChatCompletionFunctionToolParam,
                                ChatCompletion]):
    name = "openai"
    provider = Provider("OpenAI", "OPENAI_API_KEY", openai.APIStatusError,
                        openai.APITimeoutError, openai.APIConnectionError, openai.OpenAIError)

    def _tool(self, spec: ToolSpec) -> ChatCompletionFunctionToolParam:
        return ChatCompletionFunctionToolParam(type="function", function={
            "name": spec.name, "description": spec.description,
            "parameters": dict(spec.schema)})

    async def _ask(self, tools: list[ChatCompletionFunctionToolParam],
                   message: str) -> ChatCompletion:
        return await self.client.chat.completions.create(
            model=self.model, max_completion_tokens=self.max_tokens,
            messages=[{"role": "system", "content": SYSTEM_PROMPT},
                      {"role": "user", "content": message}],
            tools=tools, tool_choice="auto",
        )

    def _read(self, answer: ChatCompletion, catalog: Catalog) -> Plan:
        if not answer.choices:
            raise PlannerUnavailable(f"{self.provider.name} answered without a choice")
        choice = answer.choices[0]
        message = choice.message
        if message.refusal:
            raise PlanRejected(f"{self.name}: the model refused: {one_line(message.refusal)}")
        if choice.finish_reason not in _FINISHED:
            raise PlanRejected(f"{self.name}: the model stopped before finishing "
                               f"({choice.finish_reason}); nothing is planned")
        calls = []
        for index, call in enumerate(message.tool_calls or [], start=1):
            if call.type != "function":
                raise PlanRejected(f"step s{index}: the model made a {call.type!r} tool call; "
                                   "only function calls are offered")
            name = call.function.name
            calls.append(ToolCall(name, decode_arguments(index, name, call.function.arguments)))
        return plan_from_calls(calls, catalog, planner=self.name, text=message.content or "")

    @classmethod
    def _client(cls, key: str, base_url: str | None) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(api_key=key, base_url=base_url, timeout=LLM_TIMEOUT_S,
                                  max_retries=LLM_RETRIES)
