"""The OpenAI planner: chat completions with function calling, through the official
``openai`` SDK.

Same contract as the Anthropic planner (see ``calls`` for how calls become steps). One
difference in what can go wrong: OpenAI returns each call's arguments as a JSON
*string*, which a model can get wrong; a call whose arguments are not a JSON object
rejects the whole plan rather than running with guessed arguments.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import openai
from openai.types.chat import ChatCompletionFunctionToolParam

from orchestrator.plan import Catalog, Plan, PlannerUnavailable, PlanRejected
from orchestrator.planners.calls import (
    ToolCall,
    api_failure,
    one_line,
    plan_from_calls,
    shown_name,
)
from orchestrator.planners.prompting import SYSTEM_PROMPT, tool_specs, user_message

PROVIDER = "OpenAI"
KEY_ENV = "OPENAI_API_KEY"
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


class OpenAIPlanner:
    name = "openai"
    follows_up = True

    def __init__(self, client: openai.AsyncOpenAI, model: str, *,
                 max_tokens: int = 2048) -> None:
        self.client = client
        self.model = model
        self.max_tokens = max_tokens

    async def plan(self, request: str, catalog: Catalog, *,
                   untrusted: Sequence[str] = ()) -> Plan:
        tools = [ChatCompletionFunctionToolParam(type="function", function={
            "name": t.name, "description": t.description, "parameters": dict(t.schema)})
            for t in tool_specs(catalog)]
        if not tools:
            raise PlanRejected("no agent has registered an action yet; nothing to plan with")
        try:
            completion = await self.client.chat.completions.create(
                model=self.model, max_completion_tokens=self.max_tokens,
                messages=[{"role": "system", "content": SYSTEM_PROMPT},
                          {"role": "user", "content": user_message(request, untrusted)}],
                tools=tools, tool_choice="auto",
            )
        except openai.APIStatusError as exc:
            raise api_failure(PROVIDER, KEY_ENV, exc.status_code, exc.body) from None
        except openai.APITimeoutError:
            raise PlannerUnavailable(f"{PROVIDER} did not answer in time") from None
        except openai.APIConnectionError:
            raise PlannerUnavailable(
                f"cannot reach {PROVIDER} at {self.client.base_url}") from None
        except openai.OpenAIError as exc:
            raise PlannerUnavailable(f"{PROVIDER} gave an unusable answer: "
                                     f"{one_line(str(exc), redact=True)}") from None
        if not completion.choices:
            raise PlannerUnavailable(f"{PROVIDER} answered without a choice")
        choice = completion.choices[0]
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
