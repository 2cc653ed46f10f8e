"""Fixtures: a throwaway project (committed policy, fresh secrets, compiled config) and a
real nats-server running that config with real mutual TLS, on free loopback ports."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from broker import connection
from broker.compiler import compile_config
from broker.revocations import RevocationAuthority
from broker.secrets import SecretsLayout, init_secrets, load_identity
from broker.server import NatsServer
from mas.project import Project
from orchestrator.dispatch import AgentCaller
from security.tokens import TokenIssuer
from tests.loopback import Webhook, serve_webhook

if TYPE_CHECKING:
    from tests.platform import Platform

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[Any], timeout: float = 30) -> int:
    """Stop ``proc`` as a user would (SIGTERM), killing it if it has not exited within
    ``timeout`` seconds; its exit code."""
    if proc.poll() is None:
        proc.terminate()
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def make_project(root: Path) -> Project:
    """A project folder with the repository's policy, its own secrets and compiled config."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "policy.yaml", root / "policy.yaml")
    proj = Project(root)
    policy = proj.policy()
    init_secrets(policy, proj.secrets)
    proj.config_path.write_text(compile_config(policy))
    return proj


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    """A loopback JSON webhook receiver (the stand-in for a contact's or the owner's hook)."""
    with serve_webhook() as hook:
        yield hook


@pytest.fixture(scope="session")
def project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    return make_project(tmp_path_factory.mktemp("project"))


class RunningBroker:
    def __init__(self, server: NatsServer, project: Project) -> None:
        self.server = server
        self.project = project
        self.url = f"tls://127.0.0.1:{server.port}"

    @property
    def secrets(self) -> SecretsLayout:
        return self.project.secrets

    def log(self) -> str:
        return self.server.log_text()

    async def wait_for_log(self, needle: str, timeout: float = 3.0) -> str:
        """The first server log line containing ``needle``; fails the test if none appears."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            for line in self.log().splitlines():
                if needle in line:
                    return line
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"no server log line contains {needle!r}")
            await asyncio.sleep(0.05)


def start_broker(project: Project, workdir: Path) -> NatsServer:
    server = NatsServer(
        config=project.config_path,
        cwd=project.root,
        log_file=workdir / "nats-server.log",
        port=free_port(),
        http_port=free_port(),
    )
    server.check_config()
    server.start()
    server.wait_ready(project.policy().broker.monitor)
    return server


@pytest.fixture(scope="session")
def broker(project: Project, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBroker]:
    server = start_broker(project, tmp_path_factory.mktemp("broker"))
    try:
        yield RunningBroker(server, project)
    finally:
        server.stop()


ConnectAs = Callable[[str], Awaitable[connection.BrokerClient]]


@pytest.fixture
def fresh_broker(tmp_path: Path) -> Iterator[RunningBroker]:
    """A broker of the test's own (new project, new secrets, empty JetStream), for tests
    that need streams nobody else created. Costs about a second."""
    proj = make_project(tmp_path / "project")
    server = start_broker(proj, tmp_path)
    try:
        yield RunningBroker(server, proj)
    finally:
        server.stop()


@pytest.fixture
async def connect_fresh(fresh_broker: RunningBroker) -> AsyncIterator[ConnectAs]:
    async for factory in _connector(fresh_broker):
        yield factory


@pytest.fixture
async def connect_as(broker: RunningBroker) -> AsyncIterator[ConnectAs]:
    """Connect as a named identity with its real credentials; closes everything after."""
    async for factory in _connector(broker):
        yield factory


@pytest.fixture
async def platform(fresh_broker: RunningBroker, connect_fresh: ConnectAs
                   ) -> AsyncIterator[Platform]:
    """The real orchestrator and the test notify agent on a broker of the test's own, with
    an operator that does not reconnect (tests/platform.py)."""
    from tests.platform import running_platform  # it imports this module's helpers

    async with running_platform(fresh_broker, await connect_fresh("operator")) as plat:
        yield plat


async def _connector(broker: RunningBroker) -> AsyncIterator[ConnectAs]:
    clients: list[connection.BrokerClient] = []

    async def _connect(identity: str) -> connection.BrokerClient:
        client = await connection.connect(load_identity(broker.secrets, identity), broker.url,
                                          max_reconnect_attempts=0)
        clients.append(client)
        return client

    yield _connect
    for client in clients:
        client.closing = True
        if not client.nc.is_closed:
            await client.nc.close()


async def wait_for_violation(
    client: connection.BrokerClient, operation: str, subject: str, timeout: float = 3.0
) -> connection.PermissionViolation:
    """The violation the server reported to ``client`` (via error_cb); fails if none arrives."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        for v in client.violations:
            if v.operation == operation and v.subject == subject.lower():
                return v
        await asyncio.sleep(0.02)
    raise AssertionError(
        f"no {operation} violation for {subject!r} reported to {client.identity}; "
        f"saw {list(client.violations)}"
    )


async def eventually(predicate: Callable[[], bool], timeout: float = 2.0,
                     what: str = "condition") -> float:
    """Seconds until ``predicate()`` holds; fails the test if it does not within ``timeout``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.005)
    return time.monotonic() - start


async def settle(*clients: connection.BrokerClient) -> None:
    """Make sure the server has processed every subscription of ``clients``."""
    for client in clients:
        await client.sync(timeout=3)


async def commander(connect: ConnectAs) -> tuple[connection.BrokerClient, AgentCaller]:
    """Act as the orchestrator towards agents: serve revocations (every agent loads them on
    start) and mint a real token for each command."""
    orch = await connect("orchestrator")
    await RevocationAuthority.start(orch)
    return orch, AgentCaller(orch, TokenIssuer("orchestrator", orch.material.signing_key))
