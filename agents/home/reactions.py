"""What the home agent makes of other agents' events: at most a suggestion, never an act.

Health events are being defined by another agent, so the payload is read defensively:
only whether a break is due matters, and no health value is copied into the home's
own event.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from agents.home.classify import explain_call
from agents.home.models import HomeSuggestion
from protocol.actions import Proposal
from protocol.explain import Explanation

BREAK_DUE = "break_due"


def is_break_due(subject: str, data: bytes) -> bool:
    """``mas.event.health.break_due``, or any health event whose JSON object says
    ``kind``/``type``/``event`` is ``break_due``; anything unreadable is not."""
    if subject.rsplit(".", 1)[-1] == BREAK_DUE:
        return True
    try:
        payload = json.loads(data)
    except (ValueError, RecursionError):
        return False
    return isinstance(payload, dict) and any(
        payload.get(key) == BREAK_DUE for key in ("kind", "type", "event"))


def break_suggestion(trigger: str, light: str) -> HomeSuggestion:
    args = {"domain": "light", "service": "turn_on", "entity_id": [light],
            "data": {"flash": "short"}}
    call = explain_call("light", "turn_on", [light], {"flash": "short"})
    explanation = Explanation(
        summary=f"Flash {light} briefly: a break is due",
        reason="The health agent reported that a break is due. A short flash of "
               f"{light} is a cue that does not need a screen. {call.reason}",
        data={"trigger": trigger, **call.data},
        confidence=0.6,
    )
    return HomeSuggestion(trigger=trigger, proposal=Proposal(
        agent="home", action="call_service", args=args, explanation=explanation))


@dataclass
class Cooldown:
    """At most one suggestion per ``seconds`` (health may repeat itself)."""

    last: dict[str, float] = field(default_factory=dict)

    def ready(self, key: str, seconds: float, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        previous = self.last.get(key)
        if previous is not None and now - previous < seconds:
            return False
        self.last[key] = now
        return True
