"""The control service against a real broker: the operator starts, stops and inspects
agents; nobody else can. Docker tests use a real engine and containers of their own
compose project name, labelled the way deploy/compose.py labels agents."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, TypeVar

import nats.errors
import pytest
from pydantic import BaseModel

from broker.connection import BrokerClient
from broker.secrets import load_identity
from control.backend import Backend
from control.process_backend import ProcessBackend
from control.service import ControlService
from protocol import control as wire
from protocol.approvals import AdminError
from tests.conftest import ConnectAs, RunningBroker, eventually, wait_for_violation

M = TypeVar("M", bound=BaseModel)
# A stand-in agent process: says hello, then idles until told to stop.
IDLER = [sys.executable, "-u", "-c",
         "import os, time; print('hello from', os.getpid()); time.sleep(600)"]
CRASHER = [sys.executable, "-u", "-c", "print('crashing'); raise SystemExit(3)"]


async def ask(client: BrokerClient, subject: str, payload: BaseModel | bytes,
              answer: type[M]) -> M | AdminError:
    reply = await client.request(subject, payload, timeout=30)
    assert reply.sender == "control"
    if b'"status":"error"' in reply.data:
        return AdminError.model_validate_json(reply.data)
    return answer.model_validate_json(reply.data)


async def ok(client: BrokerClient, subject: str, payload: BaseModel | bytes,
             answer: type[M]) -> M:
    got = await ask(client, subject, payload, answer)
    assert isinstance(got, answer), got
    return got


async def refusal(client: BrokerClient, subject: str, payload: BaseModel | bytes) -> AdminError:
    got = await ask(client, subject, payload, wire.AgentStatus)
    assert isinstance(got, AdminError), got
    return got


async def serve(broker: RunningBroker, backend: Backend, ready: Path | None = None
                ) -> ControlService:
    service = ControlService(broker.project.policy(), load_identity(broker.secrets, "control"),
                             broker.url, backend, ready_file=ready)
    await service.start()
    return service


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# --- local mode: processes ------------------------------------------------------------


@pytest.fixture
async def local(broker: RunningBroker, tmp_path: Path
                ) -> AsyncIterator[tuple[ControlService, ProcessBackend]]:
    backend = ProcessBackend({"health": IDLER, "home": IDLER}, env=dict(os.environ),
                             cwd=tmp_path, logs_dir=tmp_path / "logs", stop_timeout_s=5)
    service = await serve(broker, backend, ready=tmp_path / "ready")
    await backend.start_all()
    try:
        yield service, backend
    finally:
        await service.stop()
        await backend.close()


def pid_of(status: wire.AgentStatus) -> int:
    assert status.ref.startswith("pid "), status
    return int(status.ref.split()[1])


async def test_the_operator_stops_and_starts_a_local_agent(
        local: tuple[ControlService, ProcessBackend], connect_as: ConnectAs,
        tmp_path: Path) -> None:
    operator = await connect_as("operator")
    assert (tmp_path / "ready").exists()
    before = await ok(operator, wire.STATUS, wire.StatusRequest(), wire.StatusReply)
    states = {s.agent: s.state for s in before.agents}
    assert states["health"] == "running"
    assert states["home"] == "running"
    assert states["notify"] == "missing"  # in the policy, no code here
    pid = pid_of(next(s for s in before.agents if s.agent == "health"))

    stopped = await ok(operator, wire.AGENT_STOP, wire.AgentRequest(agent="health"),
                       wire.AgentStatus)
    assert stopped.state == "stopped"
    assert stopped.ref == ""
    assert not _alive(pid)
    started = await ok(operator, wire.AGENT_START, wire.AgentRequest(agent="health"),
                       wire.AgentStatus)
    assert started.state == "running"
    assert pid_of(started) != pid
    restarted = await ok(operator, wire.AGENT_RESTART, wire.AgentRequest(agent="health"),
                         wire.AgentStatus)
    assert restarted.state == "running"
    assert pid_of(restarted) != pid_of(started)
    assert not _alive(pid_of(started))


async def test_logs_tail_and_follow_from_a_cursor(
        local: tuple[ControlService, ProcessBackend], connect_as: ConnectAs) -> None:
    operator = await connect_as("operator")
    _, backend = local
    log_path = backend.children["home"].log_path
    await eventually(lambda: log_path.exists() and b"hello" in log_path.read_bytes(),
                     timeout=20, what="the agent's first line")
    first = await ok(operator, wire.LOGS, wire.LogsRequest(agent="home", tail=10),
                     wire.LogsReply)
    assert [line.split()[:2] for line in first.lines] == [["hello", "from"]]
    with log_path.open("a") as f:
        f.write('{"event": "later line"}\npartial')
    more = await ok(operator, wire.LOGS, wire.LogsRequest(agent="home", cursor=first.cursor),
                    wire.LogsReply)
    assert more.lines == ['{"event": "later line"}']  # the partial line waits for its end
    again = await ok(operator, wire.LOGS, wire.LogsRequest(agent="home", cursor=more.cursor),
                     wire.LogsReply)
    assert again.lines == []


async def test_a_crashing_local_agent_is_restarted_then_given_up(
        broker: RunningBroker, tmp_path: Path) -> None:
    backend = ProcessBackend({"health": CRASHER}, env=dict(os.environ), cwd=tmp_path,
                             logs_dir=tmp_path / "logs", max_restarts=2, backoff_s=0.1)
    await backend.start_all()
    try:
        child = backend.children["health"]
        await eventually(lambda: child.state == "failed", timeout=30, what="giving up")
        [status] = await backend.status(["health"])
        assert (status.state, status.restarts, status.exit_code) == ("failed", 2, 3)
    finally:
        await backend.close()
    assert (tmp_path / "logs" / "health.log").read_text().count("crashing") == 3


async def test_only_the_operator_is_obeyed(
        local: tuple[ControlService, ProcessBackend], connect_as: ConnectAs) -> None:
    _, backend = local
    pid = pid_of((await backend.status(["health"]))[0])
    # The orchestrator may publish on mas.control.> (broker grant) but is not the operator.
    orchestrator = await connect_as("orchestrator")
    for subject in (wire.AGENT_STOP, wire.AGENT_RESTART, wire.STATUS, wire.LOGS):
        error = await refusal(orchestrator, subject, wire.AgentRequest(agent="health"))
        assert error.code == "not_operator"
    # An agent has no route to control at all: the broker refuses the publish.
    rogue = await connect_as("home")
    with pytest.raises(nats.errors.TimeoutError):
        await rogue.request(wire.AGENT_STOP, wire.AgentRequest(agent="health"), timeout=1)
    await wait_for_violation(rogue, "publish", wire.AGENT_STOP)
    await rogue.nc.publish(wire.AGENT_STOP, b'{"agent": "health"}')
    await wait_for_violation(rogue, "publish", wire.AGENT_STOP)
    assert _alive(pid)
    [status] = await backend.status(["health"])
    assert status.state == "running"
    assert pid_of(status) == pid


@pytest.mark.parametrize(("payload", "code"), [
    (b"not json", "invalid_request"),
    (b'{"agent": "health", "extra": 1}', "invalid_request"),
    (b'{"agent": "../etc"}', "invalid_request"),
    (b'{"agent": "nats"}', "not_an_agent"),
    (b'{"agent": "orchestrator"}', "not_an_agent"),
    (b'{"agent": "control"}', "not_an_agent"),
    (b'{"agent": "notify"}', "not_found"),  # an agent, but none runs here
])
async def test_bad_requests_get_a_typed_refusal(
        local: tuple[ControlService, ProcessBackend], connect_as: ConnectAs,
        payload: bytes, code: str) -> None:
    operator = await connect_as("operator")
    error = await refusal(operator, wire.AGENT_STOP, payload)
    assert error.code == code, error


async def test_every_action_is_announced_for_the_audit_log(
        local: tuple[ControlService, ProcessBackend], connect_as: ConnectAs) -> None:
    operator, orchestrator = await connect_as("operator"), await connect_as("orchestrator")
    seen: list[tuple[str, wire.ControlAction]] = []

    async def record(msg: Any) -> None:
        seen.append((msg.sender, wire.ControlAction.model_validate_json(msg.data)))

    await orchestrator.subscribe(wire.ACTION_EVENT, record)
    await orchestrator.sync()
    await ok(operator, wire.AGENT_RESTART, wire.AgentRequest(agent="home"), wire.AgentStatus)
    await refusal(operator, wire.AGENT_STOP, wire.AgentRequest(agent="notify"))
    await eventually(lambda: len(seen) == 2, timeout=10, what="two announcements")
    assert [(s, e.agent, e.action, e.outcome, e.by) for s, e in seen] == [
        ("control", "home", "restart", "ok", "operator"),
        ("control", "notify", "stop", "refused", "operator")]


# --- Docker -----------------------------------------------------------------------------


def _docker() -> Any:
    """A client of a running engine; without one, skip with the reason (fail in CI)."""
    import docker.errors

    import docker

    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        message = f"no Docker engine answers ({type(exc).__name__}); start dockerd"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return client


def _image(client: Any) -> str:
    name = os.environ.get("MAS_TEST_IMAGE", "mas-base:bookworm")
    if not client.images.list(name=name):
        message = (f"image {name} is not built (scripts/test builds it; or set MAS_TEST_IMAGE "
                   "to a local image with sh and sleep)")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return name


@pytest.fixture
def engine() -> Iterator[tuple[Any, str, str]]:
    """(client, image, a compose project name of this test's own); removes what it made."""
    client = _docker()
    image = _image(client)
    project = f"mastest{secrets.token_hex(4)}"
    try:
        yield client, image, project
    finally:
        for c in client.containers.list(all=True, filters={"label": f"mas.test={project}"}):
            c.remove(force=True)
        client.close()


def _container(client: Any, image: str, project: str, name: str, labels: dict[str, str]) -> Any:
    return client.containers.run(
        image, ["sh", "-c", f"echo hello from {name}; exec sleep 600"], name=f"{project}-{name}",
        labels={"mas.test": project, **labels}, detach=True, init=True,
        network_mode="none", cap_drop=["ALL"], read_only=True)


def _agent_labels(project: str, agent: str, role: str = "agent") -> dict[str, str]:
    return {"com.docker.compose.project": project, "mas.project": "mas", "mas.role": role,
            "mas.agent": agent}


async def test_the_operator_stops_and_starts_a_labelled_agent_container(
        broker: RunningBroker, connect_as: ConnectAs, engine: tuple[Any, str, str]) -> None:
    from control.docker_backend import DockerBackend

    client, image, project = engine
    health = _container(client, image, project, "health", _agent_labels(project, "health"))
    # Look-alikes that must never be touched: no labels at all; labelled as this project's
    # nats or orchestrator (while claiming to be agent home); another project's agent.
    bare = _container(client, image, project, "home-1", {})
    nats = _container(client, image, project, "nats", _agent_labels(project, "home", "nats"))
    orch = _container(client, image, project, "orchestrator",
                      _agent_labels(project, "home", "orchestrator"))
    foreign = _container(client, image, project, "other-home",
                         _agent_labels(f"{project}x", "home"))
    bystanders = (bare, nats, orch, foreign)
    backend = DockerBackend(client, project, broker.project.policy().agents, stop_timeout_s=5)
    service = await serve(broker, backend)
    try:
        operator = await connect_as("operator")
        stopped = await ok(operator, wire.AGENT_STOP, wire.AgentRequest(agent="health"),
                           wire.AgentStatus)
        assert stopped.state in ("stopped", "exited")
        assert stopped.backend == "docker"
        health.reload()
        assert health.status == "exited"
        started = await ok(operator, wire.AGENT_START, wire.AgentRequest(agent="health"),
                           wire.AgentStatus)
        assert started.state == "running"
        assert started.ref == health.short_id
        health.reload()
        assert health.status == "running"

        logs = await ok(operator, wire.LOGS, wire.LogsRequest(agent="health"), wire.LogsReply)
        assert logs.lines == ["hello from health"] * 2  # started twice
        assert logs.cursor
        await ok(operator, wire.AGENT_RESTART, wire.AgentRequest(agent="health"),
                 wire.AgentStatus)
        follow = wire.LogsRequest(agent="health", cursor=logs.cursor)
        for _ in range(100):  # the restarted container writes its line when it gets to it
            newer = await ok(operator, wire.LOGS, follow, wire.LogsReply)
            if newer.lines:
                break
            await asyncio.sleep(0.2)
        assert newer.lines == ["hello from health"]  # only what came after the cursor
        assert newer.cursor != logs.cursor
        status = await ok(operator, wire.STATUS, wire.StatusRequest(), wire.StatusReply)
        states = {s.agent: s.state for s in status.agents}
        assert states["health"] == "running"
        assert states["home"] == "missing"

        for agent, code in (("home", "not_found"), ("nats", "not_an_agent"),
                            ("orchestrator", "not_an_agent"), ("control", "not_an_agent")):
            for subject in (wire.AGENT_STOP, wire.AGENT_RESTART):
                error = await refusal(operator, subject, wire.AgentRequest(agent=agent))
                assert error.code == code, (agent, error)
        error = await refusal(await connect_as("orchestrator"), wire.AGENT_STOP,
                              wire.AgentRequest(agent="health"))
        assert error.code == "not_operator"
        rogue = await connect_as("home")
        await rogue.nc.publish(wire.AGENT_STOP, b'{"agent": "health"}')
        await wait_for_violation(rogue, "publish", wire.AGENT_STOP)
        for c in (*bystanders, health):
            c.reload()
            assert c.status == "running", c.name
    finally:
        await service.stop()
        await backend.close()


# --- the operator's command line --------------------------------------------------------

# `mas` with these commands registered (mas/cli.py registers them once it calls register).
MAS = ("from mas import cli; from mas.control_cli import register\n"
       "if not any(g.name == 'control' for g in cli.app.registered_groups):\n"
       "    register(cli.app, cli.agent_app)\n"
       "cli.main()")


async def mas(broker: RunningBroker, *args: str) -> tuple[int, str, str]:
    env = {**os.environ, "MAS_ROOT": str(broker.project.root), "MAS_BROKER_URL": broker.url}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", MAS, *args, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_the_cli_controls_agents_through_the_service(
        local: tuple[ControlService, ProcessBackend], broker: RunningBroker) -> None:
    _, backend = local
    code, out, err = await mas(broker, "agent", "stop", "health")
    assert (code, out.strip()) == (0, "health: stopped"), err
    assert backend.children["health"].state == "stopped"
    code, out, err = await mas(broker, "agent", "start", "health")
    assert code == 0, err
    assert out.startswith("health: running (pid ")
    code, out, err = await mas(broker, "status", "--json")
    assert code == 0, err
    states = {a["agent"]: a["state"] for a in json.loads(out)["agents"]}
    assert states["health"] == "running"
    assert states["home"] == "running"
    code, out, err = await mas(broker, "status")
    assert code == 0, err
    assert "health" in out
    assert "running" in out
    code, out, err = await mas(broker, "agent", "stop", "Nope!")
    assert (code, out) == (1, "")
    assert err.strip() == "mas: 'Nope!' is not an agent name (see `mas status`)"
    code, out, err = await mas(broker, "agent", "restart", "nats")
    assert code == 1
    assert err.startswith("mas: refused (not_an_agent): 'nats' is not an agent")
    assert len(err.strip().splitlines()) == 1


async def test_the_cli_follows_an_agents_log(
        local: tuple[ControlService, ProcessBackend], broker: RunningBroker) -> None:
    _, backend = local
    log_path = backend.children["home"].log_path
    await eventually(lambda: log_path.exists() and b"hello" in log_path.read_bytes(),
                     timeout=20, what="the agent's first line")
    env = {**os.environ, "MAS_ROOT": str(broker.project.root), "MAS_BROKER_URL": broker.url}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", MAS, "logs", "home", "-f", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    try:
        first = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert first.startswith(b"hello from")
        with log_path.open("a") as f:
            f.write('{"event": "followed"}\n')
        assert await asyncio.wait_for(proc.stdout.readline(), 30) == b'{"event": "followed"}\n'
    finally:
        proc.terminate()
        await proc.wait()


async def test_mas_control_run_serves_until_sigterm(
        broker: RunningBroker, engine: tuple[Any, str, str], tmp_path: Path) -> None:
    """The service as compose runs it (Docker backend), told its project by setting."""
    _client, _image, project = engine
    ready = tmp_path / "ready"
    env = {**os.environ, "MAS_ROOT": str(broker.project.root), "MAS_BROKER_URL": broker.url,
           "MAS_CONTROL_COMPOSE_PROJECT": project, "MAS_READY_FILE": str(ready)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", MAS, "control", "run", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        await eventually(ready.exists, timeout=60, what="control's ready file")
        code, out, err = await mas(broker, "status", "--json")
        assert code == 0, err
        assert {a["state"] for a in json.loads(out)["agents"]} == {"missing"}
    finally:
        proc.terminate()
        _, err_bytes = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err_bytes.decode()[-2000:]
    assert not ready.exists()


async def test_a_bad_control_setting_is_one_line(broker: RunningBroker) -> None:
    env = {**os.environ, "MAS_ROOT": str(broker.project.root), "MAS_BROKER_URL": broker.url,
           "MAS_CONTROL_BACKEND": "kubernetes"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", MAS, "control", "run", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    assert err.decode().startswith("mas: bad setting MAS_CONTROL_BACKEND: ")
    assert len(err.decode().strip().splitlines()) == 1
