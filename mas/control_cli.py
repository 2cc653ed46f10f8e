"""The edge services and the operator's agent controls.

`mas egress run` and `mas control run` run the two services; `mas agent start|stop|restart
NAME`, `mas status` and `mas logs AGENT [-f]` are the operator's side: each is a request
signed with the operator's key to the control service, over the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from broker.errors import BrokerError, PolicyError
from broker.secrets import SecretsLayout, load_identity
from control.backend import Backend
from control.service import ControlService, ControlSettings
from egress.service import EgressSettings, run_egress
from mas.project import find_project
from mas.sessions import ControlSession, broker_url
from protocol import control as wire

out = Console(highlight=False, soft_wrap=True)
control_app = typer.Typer(help="The control service (starts and stops agents).",
                          no_args_is_help=True)
egress_app = typer.Typer(help="The egress proxy of the scoped tier.", no_args_is_help=True)
RootOption = Annotated[
    Path | None, typer.Option("--root", help="Project folder (default: nearest policy.yaml).")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
FOLLOW_EVERY_S = 1.0
CONTROL = "control"


def _setting_error(exc: ValidationError, prefix: str) -> PolicyError:
    first = exc.errors()[0]
    name = str(first["loc"][0]).upper() if first["loc"] else "?"
    name = name if name.startswith("MAS_") else f"{prefix}{name}"
    return PolicyError(f"bad setting {name}: {first['msg']}")


@egress_app.command("run")
def egress_run(root: RootOption = None) -> None:
    """Run the egress proxy in the foreground until SIGTERM or Ctrl-C."""
    try:
        settings = EgressSettings()
    except ValidationError as exc:
        raise _setting_error(exc, "MAS_EGRESS_") from None
    asyncio.run(run_egress(find_project(root).policy(), settings))


def _docker_backend(settings: ControlSettings, agents: list[str]) -> Backend:
    import docker.errors

    import docker
    from control.docker_backend import DockerBackend, own_compose_project

    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        raise BrokerError(f"cannot reach the Docker engine ({type(exc).__name__}): mount "
                          "/var/run/docker.sock into control, or run local mode with "
                          "`mas control run --processes`") from None
    project = settings.compose_project or own_compose_project(client)
    if project is None:
        raise BrokerError("control does not run in a compose container, so it cannot tell "
                          "which project's agents are its own: set MAS_CONTROL_COMPOSE_PROJECT")
    return DockerBackend(client, project, agents, stop_timeout_s=settings.stop_timeout_s)


@control_app.command("run")
def control_run(
    processes: Annotated[bool, typer.Option(
        "--processes", help="Local mode: run and supervise the agents as processes "
        "(default: manage this compose project's agent containers).")] = False,
    root: RootOption = None,
) -> None:
    """Run the control service in the foreground until SIGTERM or Ctrl-C."""
    from control.process_backend import ProcessBackend, agent_commands, child_env
    from mas.local import agents_with_code

    try:
        settings = ControlSettings()
    except ValidationError as exc:
        raise _setting_error(exc, "MAS_CONTROL_") from None
    project = find_project(root)
    policy = project.policy()
    url = broker_url(project)
    secrets = os.environ.get("MAS_SECRETS_DIR")
    material = load_identity(SecretsLayout(Path(secrets)) if secrets else project.secrets,
                             CONTROL)
    local: ProcessBackend | None = None
    backend: Backend
    if processes or settings.backend == "process":
        mas = str(Path(sys.executable).with_name("mas"))
        env = child_env({**os.environ, "MAS_ROOT": str(project.root), "MAS_BROKER_URL": url})
        backend = local = ProcessBackend(
            agent_commands(mas, agents_with_code(project, policy)), env=env, cwd=project.root,
            logs_dir=project.data_dir / "logs", stop_timeout_s=max(1, settings.stop_timeout_s))
    else:
        backend = _docker_backend(settings, sorted(policy.agents))
    service = ControlService(policy, material, url, backend, ready_file=settings.ready_path)
    asyncio.run(service.run(after_start=local.start_all if local else None))


def _agent_request(name: str) -> wire.AgentRequest:
    try:
        return wire.AgentRequest(agent=name)
    except ValidationError:
        raise BrokerError(f"{name!r} is not an agent name (see `mas status`)") from None


def _act(name: str, subject: str, root: Path | None) -> None:
    async def go() -> wire.AgentStatus:
        async with await ControlSession.open(find_project(root)) as control:
            return await control.ask(subject, _agent_request(name), wire.AgentStatus)

    status = asyncio.run(go())
    where = f" ({status.ref})" if status.ref else ""
    out.print(f"{status.agent}: {status.state}{where}")


AgentArgument = Annotated[str, typer.Argument(help="The agent, as named in policy.yaml.")]


def agent_start(name: AgentArgument, root: RootOption = None) -> None:
    """Start an agent (its container, or its process in local mode)."""
    _act(name, wire.AGENT_START, root)


def agent_stop(name: AgentArgument, root: RootOption = None) -> None:
    """Stop an agent; it stays stopped until `mas agent start`."""
    _act(name, wire.AGENT_STOP, root)


def agent_restart(name: AgentArgument, root: RootOption = None) -> None:
    """Restart an agent."""
    _act(name, wire.AGENT_RESTART, root)


def _age(since: str) -> str:
    """``2026-11-25T20:44:02.123456789Z`` -> ``5m`` (the table's "up" column)."""
    try:
        main = since.rstrip("Z").split(".", 1)[0].split("+", 1)[0]
        started = dt.datetime.fromisoformat(main).replace(tzinfo=dt.UTC)
    except ValueError:
        return ""
    seconds = int((dt.datetime.now(dt.UTC) - started).total_seconds())
    if seconds < 0 or started.year < 2000:  # Docker's zero time for never started
        return ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def status(root: RootOption = None, as_json: JsonOption = False) -> None:
    """Every agent's state, as control sees it (containers or local processes)."""
    async def go() -> wire.StatusReply:
        async with await ControlSession.open(find_project(root)) as control:
            return await control.ask(wire.STATUS, wire.StatusRequest(), wire.StatusReply)

    reply = asyncio.run(go())
    if as_json:
        typer.echo(reply.model_dump_json(indent=2))
        return
    table = Table(title="Agents")
    for column in ("agent", "state", "health", "backend", "where", "up", "restarts"):
        table.add_column(column, overflow="fold")
    for a in reply.agents:
        up = _age(a.since) if a.state in ("running", "starting", "unhealthy") else ""
        table.add_row(a.agent, a.state, a.health or "", a.backend, a.ref, up, str(a.restarts))
    out.print(table)


def logs(
    agent: AgentArgument,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines "
                                         "until Ctrl-C.")] = False,
    tail: Annotated[int, typer.Option(help="How many recent lines first.", min=1,
                                      max=wire.MAX_LOG_LINES)] = 100,
    root: RootOption = None,
) -> None:
    """An agent's recent log lines (its structured JSON log), optionally followed."""
    try:
        request = wire.LogsRequest(agent=_agent_request(agent).agent, tail=tail)
    except ValidationError:
        raise BrokerError(f"--tail must be 1 to {wire.MAX_LOG_LINES}") from None

    async def go() -> None:
        async with await ControlSession.open(find_project(root)) as control:
            reply = await control.ask(wire.LOGS, request, wire.LogsReply)
            while True:
                for line in reply.lines:
                    typer.echo(line)
                if not follow:
                    return
                if not reply.truncated:
                    await asyncio.sleep(FOLLOW_EVERY_S)
                reply = await control.ask(
                    wire.LOGS, wire.LogsRequest(agent=request.agent, cursor=reply.cursor),
                    wire.LogsReply)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(go())


def register(app: typer.Typer, agent_app: typer.Typer) -> None:
    """Add these commands to the `mas` command line (called once by mas/cli.py)."""
    app.add_typer(control_app, name="control")
    app.add_typer(egress_app, name="egress")
    app.command("status")(status)
    app.command("logs")(logs)
    agent_app.command("start")(agent_start)
    agent_app.command("stop")(agent_stop)
    agent_app.command("restart")(agent_restart)



