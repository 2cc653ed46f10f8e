"""The offline planner: no API key, no model; the repository's workflows and two rules.

``plan(request)`` picks, in this order:

1. the workflow whose name is the request (``morning-check``, ``Morning check``);
2. a single catalog action named directly (``backup.check_backups`` or
   ``backup__check_backups``), with no arguments: a quick way to poke one agent;
3. the workflow whose ``match`` phrases (or name, read as a phrase) best match the
   request: a phrase matches when its words appear together, in order, among the
   request's words; a longer matching phrase beats a shorter one, then more matching
   phrases beat fewer, then the name that sorts first wins, so the same request always
   picks the same workflow;
4. otherwise ``PlanRejected`` listing the known workflows.

``untrusted`` is ignored: nothing reads it, so it cannot steer an offline plan.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from broker import subjects as subj
from orchestrator.plan import Catalog, Plan, PlanRejected, Step
from orchestrator.planners.calls import one_line
from orchestrator.planners.workflow_files import Workflow, load_workflows

_DIRECT = re.compile(r"^([a-z][a-z0-9_]{0,63})(?:\.|__)([a-z][a-z0-9_]{0,63})$")


def words(text: str) -> tuple[str, ...]:
    return tuple(re.findall(r"[a-z0-9]+", text.lower()))


def _contains(haystack: tuple[str, ...], needle: tuple[str, ...]) -> bool:
    n = len(needle)
    return n > 0 and any(haystack[i:i + n] == needle for i in range(len(haystack) - n + 1))


def score(workflow: Workflow, request_words: tuple[str, ...]) -> tuple[int, int]:
    """(words in the longest matching phrase, number of matching phrases)."""
    phrases = [words(p) for p in (*workflow.match, workflow.name)]
    hits = [len(p) for p in phrases if _contains(request_words, p)]
    return (max(hits, default=0), len(hits))


class OfflinePlanner:
    name = "offline"
    follows_up = False  # it never reads agent output

    def __init__(self, workflows_dir: Path) -> None:
        self.workflows_dir = workflows_dir
        self._workflows = {w.name: w for w in load_workflows(workflows_dir)}

    def workflows(self) -> list[Workflow]:
        return [self._workflows[name] for name in sorted(self._workflows)]

    def by_name(self, name: str) -> Workflow | None:
        return self._workflows.get(name)

    def for_event(self, subject: str) -> list[Workflow]:
        """The workflows an event on ``subject`` (a concrete subject) triggers."""
        if subj.validate_pattern(subject) or "*" in subject.split(".") or subject.endswith(">"):
            return []
        return [w for w in self.workflows()
                if any(subj.within(subject, pattern) for pattern in w.events)]

    def due(self, start: datetime, end: datetime) -> list[Workflow]:
        """The workflows with a schedule that fires in (``start``, ``end``]."""
        return [w for w in self.workflows()
                if any(s.fires_between(start, end) for s in w.schedules)]

    def _named(self, asked: tuple[str, ...]) -> Workflow | None:
        return next((w for w in self.workflows() if asked and asked == words(w.name)), None)

    def _best(self, asked: tuple[str, ...]) -> Workflow | None:
        ranked = sorted(((score(w, asked), w.name) for w in self.workflows()),
                        key=lambda item: (-item[0][0], -item[0][1], item[1]))
        if ranked and ranked[0][0][0] > 0:
            return self._workflows[ranked[0][1]]
        return None

    def choose(self, request: str) -> Workflow | None:
        """The workflow ``request`` names or best matches (rules 1 and 3), if any."""
        asked = words(request)
        return self._named(asked) or self._best(asked)

    async def plan(self, request: str, catalog: Catalog, *,
                   untrusted: Sequence[str] = ()) -> Plan:
        asked = words(request)
        named = self._named(asked)
        if named is not None:
            return named.plan()
        direct = _DIRECT.match(request.strip())
        if direct and catalog.get(direct.group(1), direct.group(2)) is not None:
            agent, action = direct.group(1), direct.group(2)
            return Plan(summary=f"run {agent}.{action}", planner="offline/direct",
                        steps=[Step(id="s1", agent=agent, action=action)])
        best = self._best(asked)
        if best is not None:
            return best.plan()
        known = ", ".join(self._workflows) or "none"
        raise PlanRejected(f"no workflow matches {one_line(request, 80)!r}; known: {known}")
