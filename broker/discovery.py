"""Discovery with the NATS services API (``nats.micro``): ``$SRV.PING|INFO|STATS``.

Each agent and the orchestrator answers for its own service name with its version, its
endpoints (the action subjects, with ``sensitive``, ``description`` and the input
``schema`` as metadata) and per-endpoint request counts, so standard NATS tooling
(``nats micro ls``, ``nats micro info home``) lists them.

Only discovery goes through ``nats.micro``. Its endpoints would subscribe to the command
subjects themselves and hand raw messages to a handler; commands instead keep the
runtime's own subscription, where the envelope and the capability token are checked
before any handler runs. The endpoints listed here are therefore described, not
subscribed: ``Discovery`` is a ``nats.micro`` service whose INFO and STATS list the
subjects the caller serves on its verified path, with the counts it records.

The answers are plain ``nats.micro`` JSON, unsigned: they say what is there, and grant
nothing. Each agent's account exports its ``$SRV`` subjects (the bare verbs and those of
its own name) to the platform, which imports them from every agent: nats-server 2.11+
accepts one subject imported from several accounts and fans a request out to all of
them, so ``$SRV.PING`` from the operator reaches every service (``broker.accounts``).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import TypeVar

from nats.aio.client import Client
from nats.micro.service import (
    EndpointInfo,
    EndpointStats,
    Service,
    ServiceConfig,
    ServiceInfo,
    ServiceStats,
)

T = TypeVar("T")


def package_version() -> str:
    """The installed platform's version (services without one of their own use it)."""
    try:
        return metadata.version("multi-agent-assistant")
    except metadata.PackageNotFoundError:
        return "0.0.0"


@dataclass
class EndpointSpec:
    name: str
    subject: str
    queue_group: str
    metadata: dict[str, str] = field(default_factory=dict)
    requests: int = 0
    errors: int = 0
    processing_ns: int = 0
    last_error: str | None = None


class Discovery(Service):
    """A ``nats.micro`` service that describes endpoints served elsewhere."""

    def __init__(self, nc: Client, name: str, version: str, description: str,
                 endpoints: list[EndpointSpec], metadata: dict[str, str] | None = None) -> None:
        super().__init__(nc, ServiceConfig(name=name, version=version,
                                           description=description, metadata=metadata or {}))
        self.specs = {e.subject: e for e in endpoints}

    def record(self, subject: str, elapsed_ns: int, error: str | None = None) -> None:
        spec = self.specs.get(subject)
        if spec is None:
            return
        spec.requests += 1
        spec.processing_ns += elapsed_ns
        if error is not None:
            spec.errors += 1
            spec.last_error = error

    def counted(self, subject: str,
                handler: Callable[[T], Awaitable[None]]) -> Callable[[T], Awaitable[None]]:
        """``handler``, counting its requests and time for STATS under ``subject``."""
        async def serve(msg: T) -> None:
            began = time.perf_counter_ns()
            try:
                await handler(msg)
            except Exception as exc:
                self.record(subject, time.perf_counter_ns() - began, type(exc).__name__)
                raise
            self.record(subject, time.perf_counter_ns() - began)
        return serve

    def info(self) -> ServiceInfo:
        return ServiceInfo(
            id=self.id, name=self._name, version=self._version, metadata=self._metadata,
            description=self._description,
            endpoints=[EndpointInfo(name=e.name, subject=e.subject, queue_group=e.queue_group,
                                    metadata=e.metadata) for e in self.specs.values()])

    def stats(self) -> ServiceStats:
        return ServiceStats(
            id=self.id, name=self._name, version=self._version, metadata=self._metadata,
            started=self._started,
            endpoints=[EndpointStats(
                name=e.name, subject=e.subject, queue_group=e.queue_group,
                num_requests=e.requests, num_errors=e.errors, processing_time=e.processing_ns,
                average_processing_time=e.processing_ns // e.requests if e.requests else 0,
                last_error=e.last_error) for e in self.specs.values()])
