"""What control can do to an agent, whatever runs it (Docker or local processes)."""

from __future__ import annotations

from typing import Protocol

from protocol.control import Action, AgentStatus, LogsReply

MAX_LOG_BYTES = 256 * 1024  # one reply stays well under the broker's 1 MiB payload


class ControlRefusal(Exception):
    """An expected refusal: a code and a one-line reason the operator sees."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Backend(Protocol):
    name: str

    async def act(self, agent: str, action: Action) -> AgentStatus: ...

    async def status(self, agents: list[str]) -> list[AgentStatus]: ...

    async def logs(self, agent: str, tail: int, cursor: str | None) -> LogsReply: ...

    async def close(self) -> None: ...


def fit_lines(lines: list[str], *, newest: bool) -> tuple[list[str], bool]:
    """The lines that fit one reply and whether some were left out: the newest ones (a
    tail) or the oldest ones (a continuation, so the next request picks up the rest)."""
    ordered = reversed(lines) if newest else iter(lines)
    kept: list[str] = []
    size = 0
    for line in ordered:
        size += len(line.encode()) + 8
        if size > MAX_LOG_BYTES:
            break
        kept.append(line)
    if newest:
        kept.reverse()
    return kept, len(kept) < len(lines)
