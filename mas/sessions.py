"""The operator's connection to a platform service's admin endpoints, as `mas` commands
(and the dashboard) use it.

A request goes over the broker as the operator identity; its answer counts only when the
service it was asked of signed it, and a service's refusal (``AdminError``) becomes one
``BrokerError`` line. The orchestrator's session (``mas.ops_cli.OperatorSession``, which
also signs approval decisions) and control's (``ControlSession``) differ only in whom they
ask.
"""

from __future__ import annotations

import os
from typing import ClassVar, Self, TypeVar

from pydantic import BaseModel, ValidationError

from broker import connection
from broker.errors import BrokerError
from broker.secrets import load_identity
from mas.project import Project
from protocol.approvals import AdminError

M = TypeVar("M", bound=BaseModel)


def broker_url(project: Project) -> str:
    """$MAS_BROKER_URL (compose, tests) or the policy's listen address (local mode)."""
    return os.environ.get("MAS_BROKER_URL") or f"tls://{project.policy().broker.listen}"


class ServiceSession:
    """One connection to the broker as the operator, asking one service. ``open`` it (and
    ``close`` it, or use it as ``async with``)."""

    service: ClassVar[str]  # the identity that must sign every answer
    title: ClassVar[str]  # the service as error lines name it
    start_hint: ClassVar[str]  # how it is started, named when it does not answer
    timeout_s: ClassVar[float]

    def __init__(self, project: Project, client: connection.BrokerClient) -> None:
        self.project = project
        self.client = client

    @classmethod
    async def open(cls, project: Project, *, reconnect: bool = False) -> Self:
        client = await connection.connect(load_identity(project.secrets, "operator"),
                                          broker_url(project),
                                          max_reconnect_attempts=-1 if reconnect else 0)
        return cls(project, client)

    async def close(self) -> None:
        await self.client.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def ask(self, subject: str, payload: BaseModel | bytes, answer: type[M],
                  timeout: float | None = None) -> M:
        wait = self.timeout_s if timeout is None else timeout
        try:
            reply = await self.client.request(subject, payload, timeout=wait)
        except Exception as exc:
            raise BrokerError(f"{self.title} did not answer on {subject} "
                              f"({type(exc).__name__}); is it running ({self.start_hint})?"
                              ) from None
        if reply.sender != self.service:
            raise BrokerError(f"answer signed by {reply.sender}, not {self.title}")
        try:
            error = AdminError.model_validate_json(reply.data)
        except ValidationError:
            return answer.model_validate_json(reply.data)
        raise BrokerError(f"refused ({error.code}): {error.reason}")


class ControlSession(ServiceSession):
    """Requests to the control service: start, stop and restart agents, status, logs."""

    service = "control"
    title = "the control service"
    start_hint = "`mas up`, or the control container"
    timeout_s = 30.0
