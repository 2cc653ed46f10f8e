"""The control process: operator requests on ``mas.control.*`` -> a backend.

Every request is checked in this order: the envelope verifies (``broker.connection``
refuses anything else before this code runs), the sender is the operator, the body parses
into its pydantic model, the agent is one the policy names. Refusals come back as
``AdminError`` (code and one line); nothing crashes the service. Each start, stop or
restart is announced on ``mas.event.control.action`` so the audit log can record it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Literal

import structlog
from nats.aio.msg import Msg
from pydantic import AliasChoices, BaseModel, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from broker.connection import SignedMessage, connect
from broker.policy import Policy
from broker.secrets import IdentityMaterial
from control.backend import Backend, ControlRefusal
from protocol import control as wire
from protocol.approvals import AdminError
from security.errors import EnvelopeError

log = structlog.get_logger("mas.control")
OPERATOR = "operator"
READY_EVERY_S = 5.0


class ControlSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MAS_CONTROL_", extra="ignore", frozen=True)

    backend: Literal["docker", "process"] = "docker"
    # The compose project whose agents control manages; default: control's own.
    compose_project: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9_\-]*$")
    stop_timeout_s: int = Field(default=10, ge=0, le=300)
    ready_file: Path | None = Field(
        default=None, validation_alias=AliasChoices("MAS_READY_FILE", "ready_file"))

    @property
    def ready_path(self) -> Path:
        return self.ready_file or Path(tempfile.gettempdir()) / "mas-control.ready"


Endpoint = Callable[[SignedMessage], Awaitable[BaseModel]]


class ControlService:
    def __init__(self, policy: Policy, material: IdentityMaterial, url: str,
                 backend: Backend, *, ready_file: Path | None = None) -> None:
        self.policy = policy
        self.material = material
        self.url = url
        self.backend = backend
        self.ready_file = ready_file
        self.agents = sorted(policy.agents)
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self.client = client = await connect(self.material, self.url, name="control")
        endpoints: dict[str, Endpoint] = {
            wire.AGENT_START: lambda m: self._act(m, "start"),
            wire.AGENT_STOP: lambda m: self._act(m, "stop"),
            wire.AGENT_RESTART: lambda m: self._act(m, "restart"),
            wire.STATUS: self._status,
            wire.LOGS: self._logs,
        }
        for subject, handler in endpoints.items():
            await client.subscribe(subject, self._endpoint(subject, handler), queue="control",
                                   on_refused=self._refused)
        await client.sync()
        if self.ready_file is not None:
            self._tasks.append(asyncio.create_task(_touch_ready(self.ready_file)))
        log.info("control.ready", backend=self.backend.name, agents=self.agents)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.client.close()
        if self.ready_file is not None:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(self.ready_file.unlink)

    async def _refused(self, msg: Msg, exc: EnvelopeError) -> None:
        """A request whose envelope failed: tell an operator why instead of going silent."""
        await self.client.answer_unverified(
            msg, AdminError(code=exc.code, reason=str(exc)[:500]), commander=OPERATOR)

    def _endpoint(self, subject: str, handler: Endpoint) -> Callable[[SignedMessage],
                                                                       Awaitable[None]]:
        async def serve(msg: SignedMessage) -> None:
            try:
                if msg.sender != OPERATOR:
                    raise ControlRefusal("not_operator", f"only the operator may use {subject}")
                answer = await handler(msg)
            except ControlRefusal as exc:
                answer = AdminError(code=exc.code, reason=exc.reason[:500])
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(map(str, first["loc"])) or "request"
                answer = AdminError(code="invalid_request",
                                    reason=f"{where}: {first['msg']}"[:500])
            except Exception as exc:
                log.exception("control.endpoint_failed", subject=subject)
                answer = AdminError(code="internal", reason=f"{type(exc).__name__}; see the "
                                    "control service's log")
            if isinstance(answer, AdminError):
                log.warning("control.refused", subject=subject, sender=msg.sender,
                            code=answer.code, reason=answer.reason)
            if msg.reply:
                with contextlib.suppress(Exception):
                    await self.client.respond(msg, answer)
        return serve

    def _known(self, agent: str) -> str:
        if agent not in self.policy.agents:
            raise ControlRefusal("not_an_agent", f"{agent!r} is not an agent in policy.yaml "
                                 f"(agents: {', '.join(self.agents)})")
        return agent

    async def _act(self, msg: SignedMessage, action: wire.Action) -> BaseModel:
        agent = self._known(wire.AgentRequest.model_validate_json(msg.data).agent)
        try:
            status = await self.backend.act(agent, action)
        except ControlRefusal as exc:
            await self._announce(wire.ControlAction(agent=agent, action=action, by=msg.sender,
                                                    outcome="refused", reason=exc.reason))
            raise
        log.info("control.action", agent=agent, action=action, by=msg.sender,
                 state=status.state, trace_id=msg.trace_id)
        await self._announce(wire.ControlAction(agent=agent, action=action, by=msg.sender,
                                                outcome="ok", state=status.state))
        return status

    async def _announce(self, event: wire.ControlAction) -> None:
        with contextlib.suppress(Exception):
            await self.client.publish(wire.ACTION_EVENT, event)

    async def _status(self, msg: SignedMessage) -> BaseModel:
        query = wire.StatusRequest.model_validate_json(msg.data or b"{}")
        agents = [self._known(query.agent)] if query.agent else self.agents
        return wire.StatusReply(agents=await self.backend.status(agents))

    async def _logs(self, msg: SignedMessage) -> BaseModel:
        query = wire.LogsRequest.model_validate_json(msg.data)
        return await self.backend.logs(self._known(query.agent), query.tail, query.cursor)

    async def run(self, after_start: Callable[[], Awaitable[None]] | None = None) -> None:
        """Serve until SIGTERM or SIGINT; ``after_start`` runs once requests are served
        (local mode starts the agents then). The backend closes last (local mode: the
        agents stop with control)."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await self.start()
            if after_start is not None:
                await after_start()
            await stop.wait()
            await self.stop()
        finally:
            await self.backend.close()


async def _touch_ready(path: Path) -> None:
    while True:
        await asyncio.to_thread(path.touch)
        await asyncio.sleep(READY_EVERY_S)

