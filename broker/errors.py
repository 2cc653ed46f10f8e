"""Errors of the broker layer. Each message names the problem and the fix in one line."""

from pathlib import Path


class BrokerError(Exception):
    """Base class for policy, secrets, compiler and connection errors."""


class PolicyError(BrokerError):
    """The policy file is invalid. ``line`` points at the offending entry when known."""

    def __init__(self, message: str, *, path: Path | None = None, line: int | None = None):
        self.path = path
        self.line = line
        self.detail = message
        where = f"{path}:{line}: " if path and line else f"{path}: " if path else ""
        super().__init__(f"{where}{message}")


class SecretsError(BrokerError):
    """A secret file is missing or broken; the message says which and how to fix it."""


class ServerError(BrokerError):
    """The nats-server binary could not be found, started, or did not become ready."""
