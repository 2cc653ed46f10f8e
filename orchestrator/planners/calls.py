"""From an LLM's tool calls to a Plan, the same way for every provider.

Each tool call becomes one step, ``s1``, ``s2``, ... in the order the model made them,
and each step waits for the one before (``after``). The tool APIs give no dependency
information, and running steps one at a time in the model's order is the safe
reading: a step never runs before something the model meant to happen first, and a
failed or refused step stops the ones after it.

A call to a tool that is not in the catalog is kept, never dropped: its agent and
action are parsed from the name (``agent__action``), or the agent is ``unknown``, so
``validate_plan`` rejects the whole plan with a reason and the attempt is audited.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pydantic import JsonValue, ValidationError

from orchestrator.plan import (
    MAX_STEPS,
    Catalog,
    NothingToDo,
    Plan,
    PlannerUnavailable,
    PlanRejected,
    Step,
)
from protocol.explain import Explanation

UNKNOWN_AGENT = "unknown"
UNPARSEABLE_ACTION = "unparseable"
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
# Anything that looks like a credential in a provider's error text (OpenAI echoes a
# masked key on 401); error reasons are audited and shown, so they must not carry one.
_SECRETISH = re.compile(r"(sk-[A-Za-z0-9_\-*.]{2,}|[A-Za-z0-9_\-*]{32,})")


@dataclass(frozen=True)
class ToolCall:
    """One tool call as the model made it: the tool's name and its decoded arguments."""

    name: str
    args: object


def one_line(text: str, limit: int = 200, *, redact: bool = False) -> str:
    """``text`` on one line, cut to ``limit`` characters; ``redact``: hide what looks like
    a credential."""
    flat = " ".join(str(text).split())
    if redact:
        flat = _SECRETISH.sub("[redacted]", flat)
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def shown_name(name: str) -> str:
    return repr(one_line(name, 80))


def resolve(name: str, catalog: Catalog) -> tuple[str, str]:
    """The (agent, action) a tool name stands for, whether or not the catalog has it."""
    info = catalog.by_tool_name(name)
    if info is not None:
        return info.agent, info.action
    agent, sep, action = name.partition("__")
    if sep and _NAME.match(agent) and _NAME.match(action):
        return agent, action
    return UNKNOWN_AGENT, name if _NAME.match(name) else UNPARSEABLE_ACTION


def _step(index: int, call: ToolCall, catalog: Catalog) -> Step:
    step_id = f"s{index}"
    if not isinstance(call.args, Mapping):
        raise PlanRejected(f"step {step_id}: the arguments of {shown_name(call.name)} are "
                           "not a JSON object")
    agent, action = resolve(call.name, catalog)
    explanation = None
    if catalog.get(agent, action) is None:
        # Keep the raw name for the audit record: the rejection names agent.action only.
        explanation = Explanation(summary=f"the model called tool {shown_name(call.name)}",
                                  reason="not a tool the planner offered", confidence=0.0)
    args: dict[str, JsonValue] = dict(call.args)
    try:
        return Step(id=step_id, agent=agent, action=action, args=args,
                    after=[f"s{index - 1}"] if index > 1 else [], explanation=explanation)
    except ValidationError as exc:
        where = ".".join(map(str, exc.errors()[0]["loc"])) or "step"
        raise PlanRejected(f"step {step_id}: {where}: {exc.errors()[0]['msg']}"[:300]) from None


def plan_from_calls(calls: Sequence[ToolCall], catalog: Catalog, *, planner: str,
                    text: str = "") -> Plan:
    """The plan for ``calls``; ``text`` (what the model wrote besides) becomes its summary."""
    summary = one_line(text, 500)
    if not calls:
        why = f": {one_line(text)}" if text.strip() else ""
        raise NothingToDo(f"{planner}: the model proposed no action{why}")
    if len(calls) > MAX_STEPS:
        raise PlanRejected(f"{planner}: the model proposed {len(calls)} steps; a plan has at "
                           f"most {MAX_STEPS}")
    steps = [_step(i, call, catalog) for i, call in enumerate(calls, start=1)]
    return Plan(summary=summary, steps=steps, planner=planner)


def api_failure(provider: str, key_env: str, status: int, body: object) -> PlannerUnavailable:
    """A one-line reason for an HTTP error from a provider, without its credentials."""
    error = body.get("error", body) if isinstance(body, Mapping) else None
    kind = message = ""
    if isinstance(error, Mapping):
        kind = one_line(str(error.get("code") or error.get("type") or ""), 60, redact=True)
        message = one_line(str(error.get("message") or ""), redact=True)
    label = f"{status} {kind}".strip()
    if status == 401:
        return PlannerUnavailable(f"{provider} refused the API key ({label}); check {key_env}")
    if status == 403:
        return PlannerUnavailable(f"{provider} denied access ({label}); check the key's "
                                  "permissions and the model name")
    if status == 429:
        return PlannerUnavailable(f"{provider} rate limit or quota reached ({label}); "
                                  "try again later")
    detail = f": {message}" if message else ""
    return PlannerUnavailable(f"{provider} answered {label}{detail}")
