"""Run the dashboard: one operator connection, the feed, the web app, uvicorn on loopback.

``DashboardServer`` runs inside the caller's event loop (the CLI's ``asyncio.run``, or a
test's loop), so the broker client, the feed and the HTTP server share one loop. It binds
to a loopback address only: the session cookie is not ``Secure`` over plain http, so
anything reachable from another machine would need TLS in front of it first.

The one exception is compose: inside its container the dashboard must listen on the
container's interface for Docker to forward the host's ``127.0.0.1`` port to it (the
compose file publishes it there and nowhere else). ``--host 0.0.0.0`` is accepted only
when ``MAS_DASHBOARD_IN_CONTAINER=1`` says so, which compose.yaml sets and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import signal
import socket
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass

import structlog
import uvicorn

from broker import connection
from broker.errors import BrokerError
from broker.secrets import load_identity
from dashboard.actions import Controls
from dashboard.feed import Feed
from dashboard.login import ensure_secret
from dashboard.web import Dashboard
from mas.ops_cli import OperatorSession
from mas.project import Project

log = structlog.get_logger("mas.dashboard")
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
PORT_ENV = "MAS_DASHBOARD_PORT"
MONITOR_ENV = "MAS_NATS_MONITOR_URL"
IN_CONTAINER_ENV = "MAS_DASHBOARD_IN_CONTAINER"
# Inside a container "every interface" is the container's own; Docker publishes the port.
CONTAINER_HOST = "0.0.0.0"  # noqa: S104


def default_port() -> int:
    text = os.environ.get(PORT_ENV, "")
    if not text:
        return DEFAULT_PORT
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise BrokerError(f"${PORT_ENV}={text!r} is not a port number; use e.g. 8765")
    return int(text)


def in_container(env: Mapping[str, str] | None = None) -> bool:
    """Whether compose said this process runs in the dashboard's container."""
    return (os.environ if env is None else env).get(IN_CONTAINER_ENV, "") == "1"


def check_loopback(host: str, env: Mapping[str, str] | None = None) -> str:
    """``host`` if the dashboard may listen there: a loopback address, or the container's
    interfaces (``0.0.0.0``) with ``MAS_DASHBOARD_IN_CONTAINER=1``."""
    if host == "localhost":
        return host
    if host == CONTAINER_HOST and in_container(env):
        return host
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise BrokerError(f"--host {host}: the dashboard serves plain http and binds to a "
                          "loopback address only (127.0.0.1 or ::1); put a TLS proxy in front "
                          "to reach it from elsewhere (in its compose container, "
                          f"{IN_CONTAINER_ENV}=1 allows --host {CONTAINER_HOST})")
    return host


def url_for(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{shown}:{port}/"


def monitor_url(project: Project) -> str:
    return os.environ.get(MONITOR_ENV) or f"http://{project.policy().broker.monitor}"


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: it would re-raise SIGINT after a graceful
    stop (a KeyboardInterrupt); ``DashboardServer.run`` handles SIGINT/SIGTERM itself, and
    a server started by a test leaves the test runner's signals alone."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


@dataclass
class DashboardServer:
    project: Project
    broker_url: str
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    monitor: str | None = None
    interval_s: float = 1.5
    heartbeat_stale_s: float = 35.0
    failed_login_delay_s: float = 1.0

    @property
    def url(self) -> str:
        return url_for(self.host, self.port)

    async def start(self) -> None:
        check_loopback(self.host)
        secret = ensure_secret(self.project.secrets)
        sock = self._bind()
        try:
            client = await connection.connect(load_identity(self.project.secrets, "operator"),
                                              self.broker_url, name="dashboard")
        except BaseException:
            sock.close()
            raise
        self.session = OperatorSession(self.project, client)
        controls = Controls(self.session)
        self.feed = Feed(controls, self.project.policy(), self.monitor,
                         interval_s=self.interval_s, heartbeat_stale_s=self.heartbeat_stale_s)
        await self.feed.start()
        self.dashboard = Dashboard(secret, self.feed, controls,
                                   failed_login_delay_s=self.failed_login_delay_s)
        config = uvicorn.Config(self.dashboard.app, host=self.host.strip("[]"), port=self.port,
                                log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=2, server_header=False)
        self.server = _Server(config)
        self.task = asyncio.create_task(self.server.serve(sockets=[sock]))
        while not self.server.started:
            if self.task.done():
                await self.stop()
                raise BrokerError(f"the dashboard did not start on {self.url}")
            await asyncio.sleep(0.05)
        # in its container the address it listens on is not one to open: compose publishes
        # the port on the host's loopback, which `mas dashboard --url` prints there
        where = ({"port": self.port, "published": "host loopback (compose)"}
                 if self.host == CONTAINER_HOST else {"url": self.url})
        log.info("dashboard.ready", **where, secret_file=str(secret.path),
                 secret_created=secret.created)

    def _bind(self) -> socket.socket:
        """Bind here rather than in uvicorn, whose bind failure exits the process; port 0
        picks a free port (``self.port`` then says which)."""
        host = self.host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, self.port))
        except OSError as exc:
            sock.close()
            raise BrokerError(f"cannot listen on {self.url}: {exc.strerror}; is another "
                              "dashboard running? choose another --port") from None
        self.port = int(sock.getsockname()[1])
        return sock

    def _exit(self) -> None:
        self.server.should_exit = True

    async def stop(self) -> None:
        if hasattr(self, "server"):
            self.server.should_exit = True
            with contextlib.suppress(Exception):
                await self.task
        if hasattr(self, "feed"):
            await self.feed.stop()
        if hasattr(self, "session"):
            await self.session.close()

    async def run(self, on_ready: Callable[[], None] | None = None) -> None:
        """Serve until uvicorn exits (it handles SIGINT/SIGTERM)."""
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._exit)
        if on_ready is not None:
            on_ready()
        try:
            await self.task
        finally:
            await self.stop()
