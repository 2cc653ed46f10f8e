"""W3C trace context on NATS headers.

Uses the OpenTelemetry propagator when a span is active; otherwise starts a fresh
trace id so every message still carries a valid ``traceparent``.
"""

from __future__ import annotations

import os
import re

from opentelemetry import propagate

TRACEPARENT = "traceparent"
_VALID = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


def inject(headers: dict[str, str]) -> dict[str, str]:
    propagate.inject(headers)
    if TRACEPARENT not in headers:
        ids = os.urandom(24).hex()  # trace id (16 bytes) and span id (8): one read
        headers[TRACEPARENT] = f"00-{ids[:32]}-{ids[32:]}-01"
    return headers


def trace_id(headers: dict[str, str] | None) -> str | None:
    """The trace id of a valid ``traceparent`` header, else None."""
    value = (headers or {}).get(TRACEPARENT, "")
    return value.split("-")[1] if _VALID.match(value) else None
