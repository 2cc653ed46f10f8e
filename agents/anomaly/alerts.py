"""What the anomaly agent publishes on ``mas.alert.<kind>``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from protocol.explain import Explanation

AlertKind = Literal[
    "refusal_burst", "quiet_hours_token", "new_identity", "error_spike", "sensitive_rise",
]
Severity = Literal["low", "medium", "high"]
MAX_RECORD_IDS = 100


class AnomalyAlert(BaseModel):
    """One alert. ``record_ids`` are the audit ``seq`` numbers that triggered it (the most
    recent ``MAX_RECORD_IDS``; ``explanation.data`` has the full counts)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: AlertKind
    severity: Severity
    identity: Annotated[str, Field(max_length=128)]
    ts: float  # the triggering record's timestamp
    explanation: Explanation
    record_ids: Annotated[list[int], Field(max_length=MAX_RECORD_IDS)]


def clip(text: str, limit: int = 64) -> str:
    """A name from a record, short enough for a one-line summary."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def ids(seqs: list[int]) -> list[int]:
    return seqs[-MAX_RECORD_IDS:]
