"""Agents as containers, through the Docker API.

Control holds the Docker socket, which is root on the host, so what it may touch is
narrow: containers of its own compose project (``com.docker.compose.project``) that carry
the labels ``deploy/compose.py`` gives agents (``mas.project=mas``, ``mas.role=agent``,
``mas.agent=<name>``) for a name the policy lists as an agent. The labels are both the
query filter and checked again on each container before acting; nats, the orchestrator,
control itself and anything unlabelled never match.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
from collections.abc import Iterable
from typing import Any

import docker.errors
from docker.models.containers import Container

import docker
from control.backend import ControlRefusal, fit_lines
from protocol.control import MAX_LOG_LINES, Action, AgentStatus, LogsReply, State

COMPOSE_PROJECT = "com.docker.compose.project"
MAS_PROJECT, MAS_ROLE, MAS_AGENT = "mas.project", "mas.role", "mas.agent"
MAS = "mas"
DOCKER_STATES: dict[str, State] = {
    "running": "running", "created": "stopped", "exited": "exited", "paused": "stopped",
    "restarting": "restarting", "removing": "stopped", "dead": "failed"}


def own_compose_project(client: docker.DockerClient) -> str | None:
    """The compose project of the container this process runs in (its hostname is the
    container id unless compose set another), or None outside a container."""
    try:
        me = client.containers.get(socket.gethostname())
    except (docker.errors.NotFound, docker.errors.APIError):
        return None
    project = me.labels.get(COMPOSE_PROJECT)
    return project if isinstance(project, str) and project else None


def _timestamp_key(stamp: str) -> tuple[int, int]:
    """Docker's RFC 3339 nanosecond stamp (trailing zeros trimmed) -> (seconds, nanos)."""
    main, _, fraction = stamp.rstrip("Z").partition(".")
    when = dt.datetime.strptime(main, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=dt.UTC)
    return int(when.timestamp()), int((fraction + "000000000")[:9] or 0)


def _cursor_key(cursor: str) -> tuple[int, int]:
    seconds, _, nanos = cursor.partition(".")
    return int(seconds), int((nanos + "000000000")[:9])


class DockerBackend:
    name = "docker"

    def __init__(self, client: docker.DockerClient, project: str, agents: Iterable[str], *,
                 stop_timeout_s: int = 10) -> None:
        self.client = client
        self.project = project
        self.agents = frozenset(agents)
        self.stop_timeout_s = stop_timeout_s

    def _labels(self, agent: str | None = None) -> dict[str, str]:
        labels = {COMPOSE_PROJECT: self.project, MAS_PROJECT: MAS, MAS_ROLE: "agent"}
        if agent is not None:
            labels[MAS_AGENT] = agent
        return labels

    def _is_ours(self, container: Container, agent: str | None = None) -> bool:
        labels: dict[str, Any] = container.labels or {}
        wanted = self._labels(agent)
        return (all(labels.get(k) == v for k, v in wanted.items())
                and labels.get(MAS_AGENT) in self.agents)

    def _containers(self, agent: str | None = None) -> list[Container]:
        filters: dict[str, str | list[str] | bool] = {
            "label": [f"{k}={v}" for k, v in self._labels(agent).items()]}
        found = self.client.containers.list(all=True, filters=filters)
        return [c for c in found if self._is_ours(c, agent)]

    def _mine(self, agent: str) -> list[Container]:
        if agent not in self.agents:
            raise ControlRefusal("not_an_agent", f"{agent!r} is not an agent in policy.yaml; "
                                 "control manages agents only")
        found = self._containers(agent)
        if not found:
            raise ControlRefusal("not_found", f"no container of compose project "
                                 f"{self.project!r} is labelled as agent {agent!r}; is it "
                                 "deployed (`docker compose up`)?")
        return found

    @staticmethod
    def _status(agent: str, containers: list[Container]) -> AgentStatus:
        if not containers:
            return AgentStatus(agent=agent, state="missing", backend="docker")
        c = containers[0]
        c.reload()
        state: dict[str, Any] = c.attrs.get("State", {})
        health = (state.get("Health") or {}).get("Status")
        status = str(state.get("Status", ""))
        mapped = DOCKER_STATES.get(status, "failed")
        if mapped == "running" and health == "unhealthy":
            mapped = "unhealthy"
        elif mapped == "running" and health == "starting":
            mapped = "starting"
        elif mapped == "exited" and not state.get("ExitCode"):
            mapped = "stopped"
        return AgentStatus(
            agent=agent, state=mapped, health=health, backend="docker",
            ref=",".join(x.short_id for x in containers),
            since=str(state.get("StartedAt", ""))[:40],
            restarts=int(c.attrs.get("RestartCount", 0)),
            exit_code=None if status == "running" else state.get("ExitCode"))

    def _act(self, agent: str, action: Action) -> AgentStatus:
        containers = self._mine(agent)
        for c in containers:
            if action == "start":
                c.start()
            elif action == "stop":
                c.stop(timeout=self.stop_timeout_s)
            else:
                c.restart(timeout=self.stop_timeout_s)
        return self._status(agent, containers)

    async def act(self, agent: str, action: Action) -> AgentStatus:
        try:
            return await asyncio.to_thread(self._act, agent, action)
        except docker.errors.APIError as exc:
            raise ControlRefusal("docker_error", f"Docker refused to {action} {agent}: "
                                 f"{exc.explanation or exc}"[:300]) from None

    def _all(self, agents: list[str]) -> list[AgentStatus]:
        found: dict[str, list[Container]] = {}
        for c in self._containers():
            found.setdefault(str(c.labels.get(MAS_AGENT)), []).append(c)
        return [self._status(a, found.get(a, [])) for a in agents]

    async def status(self, agents: list[str]) -> list[AgentStatus]:
        return await asyncio.to_thread(self._all, agents)

    def _logs(self, agent: str, tail: int, cursor: str | None) -> LogsReply:
        [c, *_] = self._mine(agent)
        if cursor is None:
            raw = c.logs(stdout=True, stderr=True, timestamps=True, tail=tail)
        else:
            since = _cursor_key(cursor)
            raw = c.logs(stdout=True, stderr=True, timestamps=True, since=max(1, since[0]))
        lines: list[tuple[tuple[int, int], str, str]] = []
        for entry in raw.decode("utf-8", "replace").splitlines():
            stamp, _, text = entry.partition(" ")
            try:
                key = _timestamp_key(stamp)
            except ValueError:
                continue
            if cursor is None or key > _cursor_key(cursor):
                lines.append((key, stamp, text))
        texts, truncated = fit_lines([t for _, _, t in lines][-MAX_LOG_LINES:] if cursor is None
                                     else [t for _, _, t in lines][:MAX_LOG_LINES],
                                     newest=cursor is None)
        if cursor is None:
            last = lines[-1][0] if lines else None
        else:
            last = lines[len(texts) - 1][0] if texts else None
        next_cursor = f"{last[0]}.{last[1]:09d}" if last else cursor
        return LogsReply(agent=agent, lines=texts, cursor=next_cursor,
                         truncated=truncated or (cursor is not None and len(lines) > len(texts)))

    async def logs(self, agent: str, tail: int, cursor: str | None) -> LogsReply:
        try:
            return await asyncio.to_thread(self._logs, agent, tail, cursor)
        except docker.errors.APIError as exc:
            raise ControlRefusal("docker_error", f"Docker refused the logs of {agent}: "
                                 f"{exc.explanation or exc}"[:300]) from None

    async def close(self) -> None:
        await asyncio.to_thread(self.client.close)
