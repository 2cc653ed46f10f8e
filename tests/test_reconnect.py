"""A client survives the broker being killed and restarted, or going silent, and the broker
drops a client gone silent: each side reconnects by itself and subscriptions work again."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

from broker import connection
from broker.secrets import load_identity
from broker.server import NatsServer
from mas.project import Project
from tests.conftest import REPO, eventually, free_port, make_project, settle


def started_server(root: Path) -> tuple[Project, NatsServer, str]:
    """A project in ``root`` and its broker, started and ready; the broker's URL."""
    proj = make_project(root)
    server = NatsServer(config=proj.config_path, cwd=root, log_file=root / "log",
                        port=free_port(), http_port=free_port())
    server.start()
    server.wait_ready(proj.policy().broker.monitor)
    return proj, server, f"tls://127.0.0.1:{server.port}"


async def test_clients_reconnect_after_broker_kill(tmp_path: Path) -> None:
    proj, server, url = started_server(tmp_path)
    monitor = proj.policy().broker.monitor
    orch = await connection.connect(load_identity(proj.secrets, "orchestrator"), url)
    agent = await connection.connect(load_identity(proj.secrets, "health"), url)
    try:
        async def answer(msg: connection.SignedMessage) -> None:
            await agent.respond(msg, b"pong")

        await agent.subscribe("mas.agent.health.daily_summary", answer, queue="health")
        await settle(agent)
        first = await orch.request("mas.agent.health.daily_summary", b"1", timeout=3)
        assert first.data == b"pong"

        server.stop(kill=True)
        server.start()
        server.wait_ready(monitor)
        await eventually(lambda: orch.reconnects > 0 and agent.reconnects > 0, timeout=10,
                         what="both clients reconnected")
        await settle(agent, orch)
        second = await orch.request("mas.agent.health.daily_summary", b"2", timeout=3)
        assert second.data == b"pong"
    finally:
        await orch.close()
        await agent.close()
        server.stop()


# A health agent in a process of its own, so the test can freeze it (SIGSTOP): frozen, it
# answers neither requests nor the server's pings, as if its network had been cut.
SILENT_AGENT = """
import asyncio, sys
from pathlib import Path
from broker import connection
from broker.layout import SecretsLayout
from broker.secrets import load_identity

async def main():
    material = load_identity(SecretsLayout(Path(sys.argv[1])), "health")
    agent = await connection.connect(material, sys.argv[2])
    async def answer(msg):
        await agent.respond(msg, b"pong")
    await agent.subscribe("mas.agent.health.daily_summary", answer, queue="health")
    await agent.sync(timeout=3)
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def ask(client: connection.BrokerClient) -> str:
    """What one request to the health agent meets: its answer, or the error's name."""
    try:
        reply = await client.request("mas.agent.health.daily_summary", b"?", timeout=2)
    except Exception as exc:  # the error's name is what the test looks at
        return type(exc).__name__
    return reply.data.decode()


async def asked_until(client: connection.BrokerClient, wanted: str, timeout: float,
                      what: str) -> list[str]:
    """Ask the health agent until it meets ``wanted``; every answer met on the way."""
    met: list[str] = []
    deadline = time.monotonic() + timeout
    while not met or met[-1] != wanted:
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s: {met[-3:]}")
        met.append(await ask(client))
    return met


async def test_broker_drops_a_silent_agent_and_takes_it_back_when_it_answers(
        tmp_path: Path) -> None:
    """A frozen agent (its network cut, in effect) stops taking requests meant for its queue
    group once the broker's pings go unanswered (about 20-30 s, not nats-server's default
    of minutes): callers get "no responders" instead of waiting out a timeout each. Thawed,
    the agent finds its connection gone, reconnects by itself and answers again."""
    proj, server, url = started_server(tmp_path)
    orch = await connection.connect(load_identity(proj.secrets, "orchestrator"), url)
    agent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SILENT_AGENT, str(proj.secrets.root), url, cwd=REPO,
        stdout=asyncio.subprocess.PIPE)
    try:
        assert agent.stdout is not None
        assert await asyncio.wait_for(agent.stdout.readline(), 30) == b"ready\n"
        assert await ask(orch) == "pong"
        agent.send_signal(signal.SIGSTOP)
        met = await asked_until(orch, "NoRespondersError", 60,
                                "the broker dropping the frozen agent")
        assert "pong" not in met, met
        agent.send_signal(signal.SIGCONT)
        await asked_until(orch, "pong", 30, "the thawed agent answering again")
    finally:
        if agent.returncode is None:
            agent.kill()
        await agent.wait()
        await orch.close()
        server.stop()


async def test_client_gives_up_a_silent_broker_and_reconnects(tmp_path: Path) -> None:
    """A broker that stops answering (frozen: a cut network looks the same from the client)
    is given up after about 15 s of unanswered pings, not nats-py's default of minutes;
    the client then reconnects by itself once the broker answers again."""
    proj, server, url = started_server(tmp_path)
    orch = await connection.connect(load_identity(proj.secrets, "orchestrator"), url)
    try:
        assert server.process is not None
        server.process.send_signal(signal.SIGSTOP)
        await eventually(lambda: not orch.nc.is_connected, timeout=60,
                         what="the client giving up the frozen broker")
        server.process.send_signal(signal.SIGCONT)
        await eventually(lambda: orch.reconnects > 0 and orch.nc.is_connected, timeout=30,
                         what="the client reconnecting")
        await orch.sync(timeout=5)
    finally:
        if server.process is not None:
            server.process.send_signal(signal.SIGCONT)
        await orch.close()
        server.stop()
