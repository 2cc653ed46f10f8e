"""`mas agent ...`: run one agent process, probe its health, scaffold a new agent."""

from __future__ import annotations

import asyncio
import importlib
import os
import time
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from agents.runtime.declare import Agent
from agents.runtime.service import AgentService
from agents.runtime.settings import AgentSettings
from broker.errors import PolicyError
from broker.secrets import SecretsLayout, load_identity
from mas.project import find_project

agent_app = typer.Typer(help="Run, probe and create agents.", no_args_is_help=True)
RootOption = Annotated[
    Path | None, typer.Option("--root", help="Project folder (default: nearest policy.yaml).")
]


def load_agent(name: str, project_root: Path | None = None) -> Agent:
    """The ``agent`` object of ``agents/<name>/agent.py`` (in the installed package, or in
    the project's own agents/ folder for agents added with `mas agent new`)."""
    import agents

    if project_root is not None:
        local = str(project_root / "agents")
        if local not in agents.__path__:
            agents.__path__.append(local)
    try:
        module = importlib.import_module(f"agents.{name}.agent")
    except ModuleNotFoundError as exc:
        if exc.name not in (f"agents.{name}", f"agents.{name}.agent"):
            raise
        raise PolicyError(f"no agent code at agents/{name}/agent.py; "
                          f"create it with `mas agent new {name}`") from exc
    agent = getattr(module, "agent", None)
    if not isinstance(agent, Agent) or agent.name != name:
        raise PolicyError(f"agents/{name}/agent.py must define `agent = Agent({name!r}, ...)`")
    return agent


def _settings(name: str) -> AgentSettings:
    try:
        settings = AgentSettings(identity=os.environ.get("MAS_IDENTITY", name))
    except ValidationError as exc:
        first = exc.errors()[0]
        raise PolicyError(f"bad setting MAS_{str(first['loc'][0]).upper()}: {first['msg']}") \
            from None
    if settings.identity != name:
        raise PolicyError(f"MAS_IDENTITY is {settings.identity!r} but the agent is {name!r}")
    return settings


@agent_app.command("run")
def run(
    name: Annotated[str, typer.Argument(help="The agent, as named in policy.yaml.")],
    root: RootOption = None,
) -> None:
    """Run one agent in the foreground until SIGTERM or Ctrl-C (then drain)."""
    settings = _settings(name)
    secrets_dir, url = settings.secrets_dir, settings.broker_url
    project_root = None
    if secrets_dir is None or url is None or root is not None:
        project = find_project(root)
        project_root = project.root
        policy = project.policy()
        if name not in policy.agents:
            raise PolicyError(f"{name!r} is not an agent in policy.yaml; add it there first")
        secrets_dir = secrets_dir or project.secrets.root
        url = url or f"tls://{policy.broker.listen}"
    agent = load_agent(name, project_root)
    material = load_identity(SecretsLayout(secrets_dir), name)
    service = AgentService(agent, material, url, heartbeat_s=settings.heartbeat_s,
                           ready_file=settings.ready_path)
    try:
        asyncio.run(service.run())
    finally:
        settings.ready_path.unlink(missing_ok=True)


@agent_app.command("probe")
def probe() -> None:
    """Exit 0 if this container's agent reported ready recently (for healthchecks)."""
    settings = AgentSettings(identity=os.environ.get("MAS_IDENTITY", "probe"))
    try:
        age = time.time() - settings.ready_path.stat().st_mtime
    except FileNotFoundError:
        typer.echo(f"not ready: {settings.ready_path} does not exist", err=True)
        raise typer.Exit(1) from None
    if age > settings.heartbeat_s * 3:
        typer.echo(f"not ready: last heartbeat {age:.0f}s ago", err=True)
        raise typer.Exit(1)
    typer.echo(f"ready (last heartbeat {age:.1f}s ago)")


@agent_app.command("new")
def new(
    name: Annotated[str, typer.Argument(help="The new agent's name (lower-case).")],
    kind: Annotated[str, typer.Option(help="stateless | stateful | polling | reactive")]
    = "stateless",
    tier: Annotated[str, typer.Option(help="isolated | scoped | full")] = "isolated",
    egress: Annotated[list[str] | None, typer.Option(help="Host it may reach (scoped tier); "
                                                     "repeat for more.")] = None,
    description: Annotated[str, typer.Option(help="One line.")] = "A new agent.",
    root: RootOption = None,
) -> None:
    """Create agents/NAME (code, Dockerfile, README, a test) and its policy stanza
    (deny by default), then recompile the broker config and the deployment."""
    from deploy import outputs
    from mas.scaffold import Scaffold

    project = find_project(root)
    project.policy()  # a broken policy.yaml is reported as such, before anything is written
    scaffold = Scaffold(name, kind, tier, description.replace(":", " -"), tuple(egress or ()))
    before = project.policy_path.read_text()
    written = scaffold.write(project.root)
    try:
        policy = project.policy()
    except Exception:
        project.policy_path.write_text(before)
        raise
    for path, state in outputs.write(policy, project.root):
        typer.echo(f"{path} {state}")
    for path in written:
        typer.echo(f"created {path.relative_to(project.root)}")
    typer.echo(f"added `{name}` to policy.yaml; test it with `pytest agents/{name}`, "
               f"run it with `mas agent run {name}`")
