"""Declarative workflows: ``workflows/<name>.yaml``, what the offline planner runs.

A workflow is a named plan with triggers::

    name: morning-check                # equals the file name
    description: One line, shown as the plan's summary.
    triggers:                          # at least one; each has exactly one key
      - manual: true                   # mas workflow run morning-check
      - schedule: daily 08:00          # see schedule.py for the forms
      - event: mas.event.backup.late   # a subject (wildcards allowed) the orchestrator reads
    match: [morning check, good morning]   # phrases of plain-language requests
    steps:                             # the shape of orchestrator.plan.Step
      - {id: backup, agent: backup, action: check_backups}
      - {id: tell, agent: notify, action: notify_owner, after: [backup], args: {...}}

Files are read with the policy's strict YAML loader (no tags, anchors, dates or
duplicate keys). Every problem is one ``WorkflowError`` line naming the file, the
line when known, and the field. Checking the steps against the agents' actions needs
the registry's catalog, so that is ``validate_plan``'s job when a plan is made.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from broker import subjects as subj
from broker.errors import PolicyError
from broker.yaml_errors import first_problem
from broker.yaml_lines import LineMap, load_yaml_with_lines
from orchestrator.plan import MAX_STEPS, Plan, Step
from orchestrator.planners.schedule import Schedule, parse_schedule

WorkflowName = Annotated[str, Field(min_length=1, max_length=48,
                                    pattern=r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")]
Phrase = Annotated[str, Field(min_length=1, max_length=100)]
MAX_WORKFLOWS = 256


class WorkflowError(ValueError):
    """A workflow file cannot be used; the message is one line: ``file:line: field: why``."""

    def __init__(self, message: str, *, path: Path, line: int | None = None) -> None:
        self.path = path
        self.line = line
        self.detail = message
        where = f"{path}:{line}" if line else str(path)
        super().__init__(f"{where}: {message}")


class Trigger(BaseModel):
    """Exactly one of ``manual``, ``schedule``, ``event``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    manual: Literal[True] | None = None
    schedule: str | None = None
    event: str | None = None

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str | None) -> str | None:
        if value is not None:
            parse_schedule(value)
        return value

    @field_validator("event")
    @classmethod
    def _event(cls, value: str | None) -> str | None:
        if value is None:
            return value
        why = subj.validate_pattern(value)
        if why:
            raise ValueError(f"{value!r} is not a subject: {why}")
        if not any(subj.within(value, feed) for feed in subj.PLATFORM_FEEDS):
            raise ValueError(f"{value!r} is not something the orchestrator receives; use a "
                             f"subject under {', '.join(subj.PLATFORM_FEEDS)}")
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> Trigger:
        given = [k for k in ("manual", "schedule", "event") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("a trigger has exactly one of manual, schedule or event")
        return self


def _graph_error(loc: tuple[str | int, ...], message: str) -> PydanticCustomError:
    """An error that carries the field it is about (a model validator's own loc is the
    whole workflow), so the message can name the field and its line."""
    return PydanticCustomError("step_graph", "{message}", {"message": message, "field": loc})


class Workflow(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: WorkflowName
    description: Annotated[str, Field(min_length=1, max_length=500)]
    triggers: Annotated[list[Trigger], Field(min_length=1, max_length=16)]
    match: Annotated[list[Phrase], Field(max_length=32)] = Field(default_factory=list)
    steps: Annotated[list[Step], Field(min_length=1, max_length=MAX_STEPS)]

    @model_validator(mode="after")
    def _step_graph(self) -> Workflow:
        """Ids unique and every ``after`` naming another step: checkable without a catalog.
        (Cycles and the actions themselves are ``validate_plan``'s.)"""
        ids = [s.id for s in self.steps]
        seen: set[str] = set()
        for i, step in enumerate(self.steps):
            if step.id in seen:
                raise _graph_error(("steps", i, "id"), f"{step.id!r} is used by an earlier step")
            seen.add(step.id)
            for dep in step.after:
                if dep not in ids or dep == step.id:
                    raise _graph_error(("steps", i, "after"), f"{dep!r} is not another step's id")
        return self

    @property
    def manual(self) -> bool:
        return any(t.manual for t in self.triggers)

    @property
    def schedules(self) -> list[Schedule]:
        return [parse_schedule(t.schedule) for t in self.triggers if t.schedule is not None]

    @property
    def events(self) -> list[str]:
        return [t.event for t in self.triggers if t.event is not None]

    def plan(self) -> Plan:
        return Plan(summary=self.description, steps=self.steps, planner=f"offline/{self.name}")


def _error_loc(err: dict[str, Any]) -> tuple[str | int, ...]:
    if err["type"] == "step_graph":
        return tuple(err.get("ctx", {}).get("field", err["loc"]))
    return tuple(err["loc"])


def _format(exc: ValidationError, lines: LineMap, path: Path) -> WorkflowError:
    msg, loc = first_problem(exc, Workflow, plain_messages=True, loc_of=_error_loc)
    return WorkflowError(msg, path=path, line=lines.line_for(loc))


def _reworded(detail: str) -> str:
    """The shared YAML loader speaks of "the policy"; say "workflow" instead."""
    if detail.startswith("the policy is empty"):
        return "the file is empty; a workflow needs name, description, triggers and steps"
    return detail.replace("in the policy", "in a workflow").replace("the policy", "a workflow")


def load_workflow(path: Path) -> Workflow:
    try:
        data, lines = load_yaml_with_lines(path)
    except PolicyError as exc:
        raise WorkflowError(_reworded(exc.detail), path=path, line=exc.line) from None
    if not isinstance(data, dict):
        raise WorkflowError("a workflow is a mapping with name, description, triggers and "
                            "steps", path=path, line=1)
    try:
        workflow = Workflow.model_validate(data)
    except ValidationError as exc:
        raise _format(exc, lines, path) from None
    if workflow.name != path.stem:
        raise WorkflowError(f"name: {workflow.name!r} differs from the file name "
                            f"{path.name!r}; make them equal", path=path,
                            line=lines.line_for(("name",)))
    return workflow


def load_workflows(directory: Path) -> list[Workflow]:
    """Every ``*.yaml`` in ``directory``, sorted by name; the first bad file raises."""
    if not directory.is_dir():
        raise WorkflowError("workflows folder not found; create it or set MAS_WORKFLOWS_DIR",
                            path=directory)
    files = sorted(directory.glob("*.yaml"))
    if len(files) > MAX_WORKFLOWS:
        raise WorkflowError(f"{len(files)} workflow files; at most {MAX_WORKFLOWS}",
                            path=directory)
    stray = next(iter(sorted(directory.glob("*.yml"))), None)
    if stray is not None:
        raise WorkflowError("workflow files end in .yaml; rename it", path=stray)
    return sorted((load_workflow(f) for f in files), key=lambda w: w.name)
