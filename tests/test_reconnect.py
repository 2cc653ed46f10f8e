"""A client survives the broker being killed and restarted: it reconnects by itself and
its subscriptions work again."""

from __future__ import annotations

from pathlib import Path

from broker import connection
from broker.secrets import load_identity
from broker.server import NatsServer
from tests.conftest import eventually, free_port, make_project, settle


async def test_clients_reconnect_after_broker_kill(tmp_path: Path) -> None:
    proj = make_project(tmp_path)
    server = NatsServer(config=proj.config_path, cwd=tmp_path, log_file=tmp_path / "log",
                        port=free_port(), http_port=free_port())
    monitor = proj.policy().broker.monitor
    server.start()
    server.wait_ready(monitor)
    url = f"tls://127.0.0.1:{server.port}"
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
