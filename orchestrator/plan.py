"""Plans: what a planner proposes, and the checks every plan passes before anything runs.

A plan is a small DAG of agent actions. Planners (an LLM or the offline rules) only
propose; ``validate_plan`` decides, against the catalog of actions the registry
accepted from the policy. Whatever a planner says, a step's ``sensitive`` flag comes
from the catalog, never from the plan, and sensitive steps go through the approval
workflow.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Protocol

import jsonschema
import jsonschema.exceptions
import jsonschema.validators
from pydantic import BaseModel, ConfigDict, Field, JsonValue

from protocol.actions import Name
from protocol.explain import Explanation
from security.encoding import CanonicalizationError, canonical_json

MAX_STEPS = 16
StepId = Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[a-z0-9_\-]+$")]


class Step(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: StepId
    agent: Name
    action: Name
    args: dict[str, JsonValue] = Field(default_factory=dict)
    after: list[StepId] = Field(default_factory=list, max_length=MAX_STEPS)
    explanation: Explanation | None = None


class Plan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    summary: Annotated[str, Field(max_length=500)] = ""
    steps: Annotated[list[Step], Field(min_length=1, max_length=MAX_STEPS)]
    planner: Annotated[str, Field(max_length=64)] = ""


@dataclass(frozen=True)
class ActionInfo:
    """One action the registry accepted: what planners may use and plans are checked against."""

    agent: str
    action: str
    description: str
    sensitive: bool
    input_schema: dict[str, JsonValue]

    @property
    def tool_name(self) -> str:
        """A name LLM tool APIs accept (``^[a-zA-Z0-9_-]{1,64}$``)."""
        return f"{self.agent}__{self.action}"


class Catalog:
    def __init__(self, actions: Sequence[ActionInfo]) -> None:
        self.actions = {(a.agent, a.action): a for a in actions}

    def get(self, agent: str, action: str) -> ActionInfo | None:
        return self.actions.get((agent, action))

    def by_tool_name(self, name: str) -> ActionInfo | None:
        agent, sep, action = name.partition("__")
        return self.get(agent, action) if sep else None

    def __iter__(self) -> Iterator[ActionInfo]:
        return iter(sorted(self.actions.values(), key=lambda a: (a.agent, a.action)))

    def __len__(self) -> int:
        return len(self.actions)


class PlanRejected(ValueError):
    """The plan must not run; ``reason`` says why (it is audited and shown)."""

    code = "plan_rejected"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NothingToDo(PlanRejected):
    """The planner proposed no action. For a first plan that is a rejection like any
    other; asked again after earlier steps ran, it means the workflow is finished."""

    code = "nothing_to_do"


class PlannerUnavailable(PlanRejected):
    """The model could not be asked (key refused, rate limit, network, bad answer).

    A ``PlanRejected``, so whoever handles rejections audits this too and nothing runs;
    a separate class (and code) so a caller can tell "try again later" from "this plan
    is bad".
    """

    code = "planner_unavailable"


class Planner(Protocol):
    name: str
    # True when the planner reads ``untrusted``: the engine then shows it the output of
    # each finished round of steps and runs what it proposes next, until it proposes
    # nothing (``NothingToDo``) or a bound is reached.
    follows_up: bool

    async def plan(self, request: str, catalog: Catalog, *,
                   untrusted: Sequence[str] = ()) -> Plan:
        """Turn ``request`` into a plan using only ``catalog``'s actions. ``untrusted``:
        agent outputs from earlier steps, to be shown to an LLM only as delimited data."""
        ...


@functools.lru_cache(maxsize=256)
def _validator(schema: str) -> Any:
    """A checked validator per schema text: ``jsonschema.validate`` checks the schema itself
    on every call, which cost about 6 ms per step under load (the reliability test)."""
    parsed = json.loads(schema)
    cls = jsonschema.validators.validator_for(parsed)
    cls.check_schema(parsed)
    return cls(parsed)


def validate_plan(plan: Plan, catalog: Catalog) -> list[Step]:
    """Return the steps in an order that respects ``after``, or raise ``PlanRejected``."""
    ids = [s.id for s in plan.steps]
    if len(set(ids)) != len(ids):
        raise PlanRejected("two steps share an id")
    known = set(ids)
    for step in plan.steps:
        info = catalog.get(step.agent, step.action)
        if info is None:
            raise PlanRejected(f"step {step.id}: {step.agent}.{step.action} is not an action "
                               "any registered agent is allowed to offer")
        try:
            error = jsonschema.exceptions.best_match(
                _validator(json.dumps(info.input_schema, sort_keys=True)).iter_errors(step.args))
            if error is not None:
                raise error
        except jsonschema.ValidationError as exc:
            where = ".".join(map(str, exc.absolute_path)) or "args"
            raise PlanRejected(f"step {step.id}: {where}: {exc.message}"[:300]) from None
        except jsonschema.SchemaError:
            raise PlanRejected(f"step {step.id}: the agent's input schema is invalid") from None
        try:  # tokens and approvals hash the arguments; NaN or 2**64 would fail there
            canonical_json(step.args)
        except CanonicalizationError as exc:
            raise PlanRejected(f"step {step.id}: arguments cannot be signed: {exc}"[:300]) \
                from None
        missing = [d for d in step.after if d not in known]
        if missing:
            raise PlanRejected(f"step {step.id} waits for unknown step {missing[0]}")
    order: list[Step] = []
    done: set[str] = set()
    pending = list(plan.steps)
    while pending:
        ready = [s for s in pending if set(s.after) <= done]
        if not ready:
            raise PlanRejected("the steps' dependencies form a cycle")
        for step in ready:
            order.append(step)
            done.add(step.id)
            pending.remove(step)
    return order
