"""The `mas` command line. Typed errors become one line on stderr and a non-zero exit."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from broker import connection
from broker.compiler import drift
from broker.errors import BrokerError, ServerError
from broker.permissions import all_permissions
from broker.secrets import init_secrets, load_identity
from broker.server import NatsServer
from dashboard.login import ensure_secret, secret_path
from dashboard.server import DEFAULT_HOST, default_port, url_for
from deploy import outputs as deploy_outputs
from mas.agent_cli import agent_app
from mas.audit_cli import audit_app
from mas.control_cli import register as register_control
from mas.dashboard_cli import dashboard_app
from mas.entry import guarded
from mas.local import LocalService, start_services
from mas.ops_cli import (
    approvals_app,
    orchestrator_app,
    run_request,
    tokens_app,
    workflow_app,
)
from mas.project import Project, find_project

app = typer.Typer(help="Multi-Agent Assistant: a security-first agent platform on NATS.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
policy_app = typer.Typer(help="Compile and inspect the central policy.", no_args_is_help=True)
app.add_typer(policy_app, name="policy")
app.add_typer(agent_app, name="agent")
app.add_typer(orchestrator_app, name="orchestrator")
app.add_typer(approvals_app, name="approvals")
app.add_typer(workflow_app, name="workflow")
app.add_typer(tokens_app, name="tokens")
register_control(app, agent_app)
app.add_typer(dashboard_app, name="dashboard")
app.add_typer(audit_app, name="audit")

out = Console(highlight=False, soft_wrap=True)
RootOption = Annotated[
    Path | None, typer.Option("--root", help="Project folder (default: nearest policy.yaml).")
]


@app.command()
def init(
    root: RootOption = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace every key and certificate.")
    ] = False,
) -> None:
    """Create the CA, certificates, nkeys and signing keys this install needs (idempotent)."""
    project = find_project(root)
    report = init_secrets(project.policy(), project.secrets, force=force)
    if force:
        secret_path(project.secrets).unlink(missing_ok=True)
    ensure_secret(project.secrets)  # the dashboard's login secret; only --force replaces it
    where = project.secrets.root
    if report.created:
        out.print(f"created {len(report.created)} secret files in {where} (0600), "
                  f"kept {len(report.kept)}")
    else:
        out.print(f"all {len(report.kept)} secret files present and valid in {where}")


@policy_app.command("compile")
def policy_compile(
    root: RootOption = None,
    check: Annotated[
        bool, typer.Option("--check", help="Exit 1 if a generated file is stale.")
    ] = False,
) -> None:
    """Write nats-server.conf, compose.yaml and seccomp/ from policy.yaml (or, with --check,
    say whether they are current)."""
    project = find_project(root)
    policy = project.policy()
    if check:
        result = deploy_outputs.check(policy, project.root)
        if result.missing:
            more = len(result.missing) - 1
            also = f" (and {more} more generated file{'s' if more > 1 else ''})" if more else ""
            raise BrokerError(f"{project.root / result.missing[0]} does not exist{also}; "
                              "run `mas policy compile`")
        if result.current:
            names = [o.path for o in deploy_outputs.compile_outputs(policy)]
            out.print(f"{', '.join(names)} {'is' if len(names) == 1 else 'are'} current with "
                      "policy.yaml")
            return
        names = [path for path, _ in result.stale] + result.obsolete
        details = [diff for _, diff in result.stale]
        details += [f"{path}: no service uses this profile any more" for path in result.obsolete]
        typer.echo(f"mas: {', '.join(names)} {'is' if len(names) == 1 else 'are'} stale; "
                   "run `mas policy compile`:\n" + "\n".join(details), err=True)
        raise typer.Exit(1)
    for path, state in deploy_outputs.write(policy, project.root):
        out.print(f"{path} {state}")


@policy_app.command("show")
def policy_show(
    identity: Annotated[str | None, typer.Argument(help="Only this identity.")] = None,
    root: RootOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Who may do what: each identity's effective publish and subscribe grants."""
    project = find_project(root)
    policy = project.policy()
    perms = all_permissions(policy)
    if identity is not None:
        perms = [p for p in perms if p.identity == identity]
        if not perms:
            raise BrokerError(f"no identity {identity!r} in policy.yaml; "
                              f"known: {', '.join(policy.identities())}")
    if as_json:
        typer.echo(json.dumps([
            {"identity": p.identity, "role": p.role, "publish": list(p.publish_allow),
             "publish_deny": list(p.publish_deny), "subscribe": list(p.subscribe_allow),
             "reply_to_requests": p.allow_responses, "notes": list(p.notes),
             "actions": ({n: {"sensitive": a.sensitive, "description": a.description}
                          for n, a in policy.agents[p.identity].actions.items()}
                         if p.identity in policy.agents else {})}
            for p in perms], indent=2))
        return
    table = Table(title="Who may do what (everything else is denied)", show_lines=True)
    for column in ("identity", "role", "publish", "subscribe", "also"):
        table.add_column(column, overflow="fold")
    for p in perms:
        publish = [s for s in p.publish_allow if not s.startswith("$")]
        also = [*p.notes]
        if p.allow_responses:
            also.append("replies to requests it receives")
        also += [f"denied: {s}" for s in p.publish_deny]
        if p.identity in policy.agents:
            agent = policy.agents[p.identity]
            also += [f"action {n}{' (SENSITIVE)' if a.sensitive else ''}"
                     for n, a in agent.actions.items()]
            if agent.egress:
                also.append(f"egress: {', '.join(agent.egress)}")
        table.add_row(p.identity, p.role, "\n".join(publish), "\n".join(p.subscribe_allow),
                      "\n".join(also))
    out.print(table)


def _pid_file(project: Project) -> Path:
    return project.data_dir / "mas-up.pid"


def _already_running(project: Project) -> int | None:
    path = _pid_file(project)
    try:
        pid = int(path.read_text().strip())
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    except PermissionError:
        pass
    return pid


async def _probe(project: Project, url: str) -> None:
    client = await connection.connect(load_identity(project.secrets, "operator"), url,
                                      max_reconnect_attempts=0)
    await client.nc.flush(timeout=5)
    await client.close()


@app.command()
def up(
    root: RootOption = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the broker.")] = 20.0,
    services: Annotated[bool, typer.Option(
        help="Also start the orchestrator and every agent (--no-services: the broker only).")]
    = True,
) -> None:
    """Start the platform in the foreground (broker, orchestrator, agents); Ctrl-C stops it."""
    children: list[LocalService] = []
    project = find_project(root)
    policy = project.policy()
    if drift(policy, project.config_path) is not None:
        raise BrokerError("nats-server.conf is stale or missing; run `mas policy compile`")
    for identity in policy.identities():
        load_identity(project.secrets, identity)
    running = _already_running(project)
    if running is not None:
        raise ServerError(f"mas up is already running here (pid {running}); stop it first")
    server = NatsServer(config=project.config_path, cwd=project.root,
                        log_file=project.data_dir / "logs" / "nats-server.log")
    server.check_config()
    _pid_file(project).parent.mkdir(parents=True, exist_ok=True)
    _pid_file(project).write_text(f"{os.getpid()}\n")
    stop_requested = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        server.start()
        server.wait_ready(policy.broker.monitor, timeout=timeout)
        url = f"tls://{policy.broker.listen}"
        asyncio.run(_probe(project, url))
        out.print(f"broker ready at {url} (mutual TLS 1.3, {len(policy.identities())} identities); "
                  f"monitoring on http://{policy.broker.monitor}; log {server.log_file}")
        if services:
            children = start_services(project, url, policy)
            out.print(f"started {', '.join(c.name for c in children)}; their logs are in "
                      f"{project.data_dir / 'logs'}")
            out.print(f"dashboard at {url_for(DEFAULT_HOST, default_port())} "
                      "(`mas dashboard --url` prints the login secret)")
        out.print("Local mode: processes share this machine; container isolation does not apply. "
                  "Press Ctrl-C to stop.")
        while not stop_requested:
            if server.process is not None and server.process.poll() is not None:
                raise ServerError(f"nats-server stopped unexpectedly: {server.last_error()}")
            for child in children:
                child.check()
            time.sleep(0.2)
    finally:
        for child in reversed(children):
            child.stop()
        code = server.stop()
        _pid_file(project).unlink(missing_ok=True)
    out.print(f"broker stopped (exit code {code})")


@app.command("run")
def run(
    request: Annotated[str, typer.Argument(help="What you want done, in plain language, "
                                           "or a workflow's name.")],
    wait: Annotated[float, typer.Option(help="Seconds to wait for the outcome.")] = 10.0,
    root: RootOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Plan and run a request; sensitive steps wait for `mas approvals approve`."""
    run_request(request, wait, root, as_json)


def main() -> None:
    guarded(app)
