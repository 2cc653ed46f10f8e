"""`mas dashboard`: run the operator dashboard, or print where it is and how to log in.

The dashboard connects to the broker as the operator, like every other operator command;
it needs no Docker socket and no agent secrets. Its login secret lives in
``secrets/dashboard/login.secret`` (created on first use, never overwritten); only
``mas dashboard --url`` prints it, on this terminal, never into a log.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from dashboard.login import ensure_secret
from dashboard.server import (
    CONTAINER_HOST,
    DEFAULT_HOST,
    DashboardServer,
    check_loopback,
    default_port,
    monitor_url,
    url_for,
)
from mas.project import Project, find_project

out = Console(highlight=False, soft_wrap=True)
dashboard_app = typer.Typer(help="The operator dashboard in your browser (loopback only).",
                            invoke_without_command=True)
RootOption = Annotated[
    Path | None, typer.Option("--root", help="Project folder (default: nearest policy.yaml).")
]
HostOption = Annotated[str, typer.Option(
    help="Loopback address to listen on (0.0.0.0 only in its compose container, where "
    "$MAS_DASHBOARD_IN_CONTAINER=1).")]
PortOption = Annotated[int | None, typer.Option(
    help="Port (default $MAS_DASHBOARD_PORT or 8765).", min=1, max=65535)]


def _broker_url(project: Project) -> str:
    return os.environ.get("MAS_BROKER_URL") or f"tls://{project.policy().broker.listen}"


@dashboard_app.callback()
def dashboard(
    ctx: typer.Context,
    url: Annotated[bool, typer.Option(
        "--url", help="Print the dashboard's address and login secret, then exit.")] = False,
    host: HostOption = DEFAULT_HOST, port: PortOption = None, root: RootOption = None,
) -> None:
    """The operator dashboard: `mas dashboard run` serves it; `--url` says where it is."""
    if url:
        project = find_project(root)
        secret = ensure_secret(project.secrets)
        typer.echo(url_for(check_loopback(host), port or default_port()))
        typer.echo(f"login secret: {secret.value}")
        typer.echo(f"(kept in {secret.path}{', just created' if secret.created else ''})")
        raise typer.Exit(0)
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())


@dashboard_app.command("run")
def run(
    host: HostOption = DEFAULT_HOST, port: PortOption = None, root: RootOption = None,
    monitor: Annotated[str | None, typer.Option(
        help="NATS monitoring URL for the throughput chart (default $MAS_NATS_MONITOR_URL "
        "or the policy's broker.monitor).")] = None,
) -> None:
    """Serve the dashboard in the foreground until Ctrl-C."""
    project = find_project(root)
    server = DashboardServer(project, _broker_url(project), host=check_loopback(host),
                             port=port or default_port(), monitor=monitor or monitor_url(project))

    def ready() -> None:
        if server.host == CONTAINER_HOST:  # the address inside is not the one to open
            out.print(f"dashboard listening on port {server.port} in its container; compose "
                      "publishes it on the host's 127.0.0.1 only: `mas dashboard --url` on "
                      "the host prints the address and login secret")
            return
        out.print(f"dashboard at {server.url} (log in with the secret `mas dashboard --url` "
                  "prints); Ctrl-C stops it")

    asyncio.run(server.run(ready))
    out.print("dashboard stopped")
