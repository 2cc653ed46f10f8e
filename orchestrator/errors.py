"""A request the orchestrator refuses: ``code`` for programs, ``reason`` for people. The
endpoints answer it as ``AdminError``; nothing else about the failure leaves the process."""

from __future__ import annotations


class Refusal(Exception):
    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
