"""What the aggregator takes from a message: where it came from, what kind it is, and
its one-line summary. Payloads are untrusted: anything odd is counted, not kept."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

SUMMARY_MAX = 200
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
_SEVERITY = re.compile(r"^[a-z]{1,16}$")
_KIND = re.compile(r"^[A-Za-z0-9_\-.]{1,64}$")


@dataclass(frozen=True)
class Origin:
    source: str  # the agent whose event it is, or "alert"
    kind: str


@dataclass(frozen=True)
class Gist:
    summary: str | None
    severity: str | None


def origin(subject: str) -> Origin | None:
    """``mas.event.<agent>.<topic>`` or ``mas.alert.<kind>``; None for anything else."""
    parts = subject.split(".")
    if len(parts) >= 4 and parts[:2] == ["mas", "event"]:
        source, kind = parts[2], ".".join(parts[3:])
    elif len(parts) >= 3 and parts[:2] == ["mas", "alert"]:
        source, kind = "alert", ".".join(parts[2:])
    else:
        return None
    return Origin(source, kind if _KIND.match(kind) else "other")


def gist(data: bytes) -> Gist:
    """The payload's ``summary`` (or ``explanation.summary``) and ``severity``, if any."""
    try:
        payload = json.loads(data)
    except (ValueError, RecursionError):
        return Gist(None, None)
    if not isinstance(payload, dict):
        return Gist(None, None)
    summary = payload.get("summary")
    explanation = payload.get("explanation")
    if not isinstance(summary, str) and isinstance(explanation, dict):
        summary = explanation.get("summary")
    severity = payload.get("severity")
    return Gist(clean(summary) if isinstance(summary, str) else None,
                severity if isinstance(severity, str) and _SEVERITY.match(severity) else None)


def clean(text: str) -> str | None:
    """One line, no control characters, at most ``SUMMARY_MAX`` characters."""
    line = " ".join(_CONTROL.sub(" ", text).split())
    if not line:
        return None
    return line if len(line) <= SUMMARY_MAX else line[: SUMMARY_MAX - 1] + "…"
