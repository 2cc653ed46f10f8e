"""A client survives the broker being killed and restarted: it reconnects by itself and
its subscriptions work again."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from broker import connection
from broker.compiler import compile_config
from broker.secrets import init_secrets, load_identity
from broker.server import NatsServer
from mas.project import Project
from tests.conftest import REPO, free_port, settle


async def test_clients_reconnect_after_broker_kill(tmp_path: Path) -> None:
    shutil.copy(REPO / "policy.yaml", tmp_path / "policy.yaml")
    proj = Project(tmp_path)
    init_secrets(proj.policy(), proj.secrets)
    proj.config_path.write_text(compile_config(proj.policy()))
    server = NatsServer(config=proj.config_path, cwd=tmp_path, log_file=tmp_path / "log",
                        port=free_port(), http_port=free_port())
    monitor = proj.policy().broker.monitor
    server.start()
    server.wait_ready(monitor)
    url = f"tls://127.0.0.1:{server.port}"
    orch = await connection.connect(load_identity(proj.secrets, "orchestrator"), url)
    agent = await connection.connect(load_identity(proj.secrets, "health"), url)
    reconnected = asyncio.Event()
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
        for _ in range(200):
            if orch.reconnects and agent.reconnects:
                reconnected.set()
                break
            await asyncio.sleep(0.05)
        assert reconnected.is_set(), "clients did not reconnect within 10 s"
        await settle(agent, orch)
        second = await orch.request("mas.agent.health.daily_summary", b"2", timeout=3)
        assert second.data == b"pong"
    finally:
        await orch.close()
        await agent.close()
        server.stop()
