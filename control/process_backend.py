"""Agents as local processes (`mas up` local mode), supervised by control.

In local mode control is what compose is in containers: it starts each agent with the
command its container runs (`mas agent run NAME`), appends its output to
``data/logs/<name>.log``, restarts it when it exits on its own (at most ``MAX_RESTARTS``
times, waiting 1, 2, 4 ... seconds, like ``restart: on-failure:5``), and stops every agent
when it stops. An agent the operator stopped stays stopped until started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from control.backend import MAX_LOG_BYTES, ControlRefusal, fit_lines
from protocol.control import Action, AgentStatus, LogsReply, State

log = structlog.get_logger("mas.control")
MAX_RESTARTS = 5
TAIL_BYTES = 4 * MAX_LOG_BYTES


@dataclass
class _Child:
    name: str
    command: list[str]
    log_path: Path
    process: asyncio.subprocess.Process | None = None
    wanted: bool = False
    restarts: int = 0
    started_at: str = ""
    exit_code: int | None = None
    state: State = "stopped"
    watcher: asyncio.Task[None] | None = field(default=None, repr=False)


class ProcessBackend:
    name = "process"

    def __init__(self, commands: Mapping[str, list[str]], *, env: Mapping[str, str],
                 cwd: Path, logs_dir: Path, stop_timeout_s: float = 20.0,
                 max_restarts: int = MAX_RESTARTS, backoff_s: float = 1.0) -> None:
        self.env = dict(env)
        self.max_restarts = max_restarts
        self.backoff_s = backoff_s
        self.cwd = cwd
        self.stop_timeout_s = stop_timeout_s
        self.children = {name: _Child(name, list(cmd), logs_dir / f"{name}.log")
                         for name, cmd in commands.items()}

    def _child(self, agent: str) -> _Child:
        child = self.children.get(agent)
        if child is None:
            raise ControlRefusal("not_found", f"no local agent {agent!r} (agents with code "
                                 f"here: {', '.join(sorted(self.children)) or 'none'})")
        return child

    async def start_all(self) -> None:
        for name in self.children:
            await self.act(name, "start")

    async def _spawn(self, child: _Child) -> None:
        child.log_path.parent.mkdir(parents=True, exist_ok=True)
        with child.log_path.open("ab") as out:
            child.process = await asyncio.create_subprocess_exec(
                *child.command, env=self.env, cwd=self.cwd, stdout=out,
                stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL)
        child.started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        child.exit_code = None
        child.state = "running"
        child.watcher = asyncio.create_task(self._watch(child, child.process))
        log.info("control.process_started", agent=child.name, pid=child.process.pid)

    async def _watch(self, child: _Child, process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        if child.process is not process:
            return
        child.exit_code = code
        if not child.wanted:
            child.state = "stopped"
            return
        log.warning("control.process_exited", agent=child.name, code=code,
                    restarts=child.restarts)
        if child.restarts >= self.max_restarts:
            child.state = "failed"
            return
        child.state = "restarting"
        await asyncio.sleep(self.backoff_s * 2 ** child.restarts)
        if child.wanted and child.process is process:
            child.restarts += 1
            await self._spawn(child)

    async def _terminate(self, child: _Child) -> None:
        process = child.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), self.stop_timeout_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()

    async def act(self, agent: str, action: Action) -> AgentStatus:
        child = self._child(agent)
        if action in ("stop", "restart"):
            child.wanted = False
            await self._terminate(child)
            child.state = "stopped"
        if action in ("start", "restart"):
            child.wanted = True
            child.restarts = 0
            if child.process is None or child.process.returncode is not None:
                await self._spawn(child)
        return self._status(child)

    def _status(self, child: _Child) -> AgentStatus:
        running = child.process is not None and child.process.returncode is None
        return AgentStatus(
            agent=child.name, state=child.state, backend="process",
            ref=f"pid {child.process.pid}" if running and child.process else "",
            since=child.started_at, restarts=child.restarts,
            exit_code=None if running else child.exit_code)

    async def status(self, agents: list[str]) -> list[AgentStatus]:
        return [self._status(self.children[a]) if a in self.children
                else AgentStatus(agent=a, state="missing", backend="process")
                for a in agents]

    async def logs(self, agent: str, tail: int, cursor: str | None) -> LogsReply:
        child = self._child(agent)
        return await asyncio.to_thread(_read_log, child.log_path, agent, tail, cursor)

    async def close(self) -> None:
        for child in self.children.values():
            child.wanted = False
        await asyncio.gather(*(self._terminate(c) for c in self.children.values()))
        for child in self.children.values():
            if child.watcher is not None:
                child.watcher.cancel()


def _read_log(path: Path, agent: str, tail: int, cursor: str | None) -> LogsReply:
    """Lines of ``path``: the last ``tail`` ones, or those after byte offset ``cursor``."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return LogsReply(agent=agent, lines=[], cursor="0")
    with path.open("rb") as f:
        if cursor is None:
            f.seek(max(0, size - TAIL_BYTES))
            data = f.read(TAIL_BYTES)
            end = size
            if size > TAIL_BYTES:  # drop the partial first line
                data = data.split(b"\n", 1)[1] if b"\n" in data else b""
        else:
            start = int(cursor.split(".", 1)[0])
            start = start if start <= size else 0  # the file was replaced: from the top
            f.seek(start)
            data = f.read(MAX_LOG_BYTES)
            if b"\n" in data:
                complete = data.rsplit(b"\n", 1)[0] + b"\n"
            else:  # a partial last line waits, unless one line fills a whole reply
                complete = data if len(data) == MAX_LOG_BYTES else b""
            end = start + len(complete)
            data = complete
    lines = data.decode("utf-8", "replace").splitlines()
    if cursor is None:
        kept, truncated = fit_lines(lines[-tail:], newest=True)
        return LogsReply(agent=agent, lines=kept, cursor=str(end),
                         truncated=truncated or len(lines) > tail)
    return LogsReply(agent=agent, lines=lines, cursor=str(end), truncated=end < size)


def agent_commands(mas: str, agents: list[str]) -> dict[str, list[str]]:
    """Each agent's local command: the one its container runs."""
    return {name: [mas, "agent", "run", name] for name in agents}


def child_env(base: Mapping[str, str]) -> dict[str, str]:
    """Control's environment minus what names control itself."""
    return {k: v for k, v in base.items()
            if k not in ("MAS_IDENTITY", "MAS_READY_FILE")} | {"PYTHONUNBUFFERED": "1"}

