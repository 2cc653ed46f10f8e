"""`mas agent new`: the scaffold compiles into the policy, passes its own test unchanged,
and starts and answers on a real broker."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from broker.secrets import load_identity
from mas.project import Project
from orchestrator.dispatch import AgentCaller
from protocol.actions import Completed
from security.tokens import TokenIssuer
from tests.conftest import REPO, RunningBroker, eventually, make_project, start_broker

MAS = str(Path(sys.executable).with_name("mas"))


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A project like a user's checkout: the policy and the agents package."""
    root = tmp_path / "checkout"
    make_project(root)
    shutil.copytree(REPO / "agents", root / "agents",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("compose.yaml", "pyproject.toml"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "seccomp", root / "seccomp")
    return root


def mas(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root), "MAS_ROOT": str(root)}
    return subprocess.run([MAS, *args], capture_output=True, text=True, env=env, timeout=120,
                           cwd=root, check=False)


def test_bad_scaffold_arguments_are_one_line_errors(checkout: Path) -> None:
    for args, needle in [(["Bad-Name"], "must be lower-case"),
                         (["x", "--kind", "magic"], "--kind must be one of"),
                         (["x", "--tier", "scoped"], "needs at least one --egress"),
                         (["health"], "already exists")]:
        result = mas(checkout, "agent", "new", *args)
        assert result.returncode == 1, result
        assert needle in result.stderr
        assert "Traceback" not in result.stderr
    assert "\n  x:" not in (checkout / "policy.yaml").read_text()


async def test_a_new_agent_compiles_passes_its_test_and_answers_on_the_broker(
        checkout: Path, tmp_path: Path) -> None:
    created = mas(checkout, "agent", "new", "demo", "--kind", "polling", "--tier", "isolated",
                  "--description", "Says hello back")
    assert created.returncode == 0, created.stderr
    policy_text = (checkout / "policy.yaml").read_text()
    assert "  demo:\n    description: Says hello back\n    kind: polling" in policy_text
    assert mas(checkout, "policy", "compile", "--check").returncode == 0
    assert "demo" in (checkout / "nats-server.conf").read_text()
    assert "agents/demo" in (checkout / "compose.yaml").read_text()
    for part in ("agent.py", "Dockerfile", "README.md", "tests/test_demo.py"):
        assert (checkout / "agents" / "demo" / part).is_file()

    own_test = subprocess.run(  # noqa: ASYNC221 (nothing else runs on the loop yet)
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "agents/demo"],
        capture_output=True, text=True, cwd=checkout, timeout=120, check=False,
        env={**os.environ, "PYTHONPATH": str(checkout)})
    assert own_test.returncode == 0, own_test.stdout + own_test.stderr
    assert "1 passed" in own_test.stdout

    assert mas(checkout, "init").returncode == 0  # keys for the new identity
    project = Project(checkout)
    server = start_broker(project, tmp_path)
    broker = RunningBroker(server, project)
    env = {**os.environ, "PYTHONPATH": str(checkout), "MAS_ROOT": str(checkout),
           "MAS_BROKER_URL": broker.url, "MAS_HEARTBEAT_S": "0.5"}
    from broker.connection import connect
    from broker.revocations import RevocationAuthority

    orch = await connect(load_identity(project.secrets, "orchestrator"), broker.url)
    await RevocationAuthority.start(orch)
    agent = subprocess.Popen(  # noqa: ASYNC220 (Popen returns at once)
        [MAS, "agent", "run", "demo"], env=env, cwd=checkout,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        beats: list[bytes] = []

        async def on_beat(msg: object) -> None:
            beats.append(msg.data)  # type: ignore[attr-defined]

        await orch.subscribe("mas.heartbeat.demo", on_beat)
        await orch.sync()
        await eventually(lambda: bool(beats) or agent.poll() is not None, timeout=20,
                         what="the demo agent's first heartbeat")
        assert agent.poll() is None, agent.stderr.read() if agent.stderr else ""
        caller = AgentCaller(orch, TokenIssuer("orchestrator", orch.material.signing_key))
        reply = await caller.call("demo", "echo", {"text": "hi"})
        assert reply == Completed(output={"text": "hi", "length": 2})
    finally:
        agent.terminate()
        _, err = agent.communicate(timeout=20)
        await orch.close()
        server.stop()
    assert agent.returncode == 0, err
    assert '"event": "agent.request"' in err
    assert '"outcome": "ok"' in err
