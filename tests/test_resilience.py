"""The orchestrator and its agents under failure, on a real broker with a JetStream file
store: the broker killed with SIGKILL and started again on the same port and store, the
orchestrator process killed mid-workflow, an agent revoked mid-workflow. Each test counts
the handlers' calls: no side effect may happen twice, none may run after a revocation."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import nats.errors
import pytest
from pydantic import BaseModel

from agents.runtime import Agent, Context
from agents.runtime.service import AgentService
from broker import connection
from broker.connection import BrokerClient
from broker.revocations import RevocationAuthority
from broker.secrets import load_identity
from orchestrator import engine as engine_module
from orchestrator.audit import record_hash, signing_bytes
from orchestrator.dispatch import AgentCaller
from orchestrator.plan import Plan, Step
from orchestrator.service import WorkflowList
from orchestrator.workflows import Workflow
from protocol import admin
from protocol.actions import Completed, Refused
from protocol.audit import AuditRecord
from security.encoding import b64url_decode
from security.revocation import RevocationSet
from security.tokens import TokenIssuer
from tests.conftest import ConnectAs, RunningBroker, eventually, settle, stop_process
from tests.platform import Platform, running_platform
from tests.test_cli import MAS, env, mas
from tests.test_orchestrator import MESSAGE, SEND, audit_records

pytestmark = pytest.mark.broker
# longer than a step timeout of 0.5 s plus the audit writer's JetStream timeout (5 s)
OUTAGE_S = 7.0


class Text(BaseModel):
    text: str


class Done(BaseModel):
    ok: bool


def note(step_id: str, text: str, *after: str) -> Step:
    return Step(id=step_id, agent="notify", action="notify_owner", args={"text": text},
                after=list(after))


@pytest.fixture
async def rig(fresh_broker: RunningBroker) -> AsyncIterator[Platform]:
    """The real orchestrator, the notify agent and an operator, all of them clients that
    reconnect by themselves (the `platform` fixture's operator does not)."""
    operator = await connection.connect(load_identity(fresh_broker.secrets, "operator"),
                                        fresh_broker.url)
    try:
        async with running_platform(fresh_broker, operator) as plat:
            yield plat
    finally:
        await operator.close()


async def kill_broker_and_restart(broker: RunningBroker, outage_s: float = 0) -> None:
    """SIGKILL nats-server (no graceful shutdown, no final flush), keep it down for
    ``outage_s`` (the outage is the scenario, not a wait for something), then start it
    again on the same port with the same config and JetStream store directory."""
    server = broker.server
    assert server.process is not None
    code = await asyncio.to_thread(server.stop, kill=True)
    assert code == -signal.SIGKILL
    await asyncio.sleep(outage_s)
    await asyncio.to_thread(server.start)
    await asyncio.to_thread(server.wait_ready, broker.project.policy().broker.monitor)


async def reconnected(*clients: BrokerClient, before: list[int]) -> None:
    await eventually(lambda: all(c.reconnects > b for c, b in zip(clients, before, strict=True)),
                     timeout=20, what="every client reconnected by itself")
    await settle(*clients)


def clients(plat: Platform) -> list[BrokerClient]:
    return [plat.orch.client, plat.agent.client, plat.operator]


async def finished(plat: Platform, workflow_id: str, timeout: float = 60) -> Workflow:
    """The workflow once it completed or failed (read from its KV entry)."""
    latest: list[Workflow] = []

    async def poll() -> None:
        while True:
            wf = await plat.workflow(workflow_id)
            latest[:] = [wf]
            if wf.finished and not plat.orch.engine._tasks:
                return
            await asyncio.sleep(0.1)

    try:
        await asyncio.wait_for(poll(), timeout)
    except TimeoutError:
        raise AssertionError(f"workflow {workflow_id} not finished within {timeout}s: "
                             f"{latest[0].model_dump_json() if latest else 'never read'}") \
            from None
    return latest[0]


async def verified_audit_log(reader: BrokerClient) -> list[AuditRecord]:
    """Every record, after checking each signature and the unbroken hash chain."""
    records = await audit_records(reader)
    ring = reader.material.trust.sender_rings()["orchestrator"]
    prev = "0" * 64
    for i, record in enumerate(records, start=1):
        assert record.seq == i
        assert record.prev_hash == prev, f"chain broken at record {i}"
        key = ring.get(record.kid)
        assert key is not None
        assert key.verify(signing_bytes(record), b64url_decode(record.sig))
        prev = record_hash(record)
    return records


async def test_a_pending_approval_survives_a_broker_kill(rig: Platform) -> None:
    wf = await rig.run_plan(note("s0", "first"), SEND.model_copy(update={"after": ["s0"]}))
    assert wf.status == "waiting_approval"
    approval = await rig.pending()
    before = [c.reconnects for c in clients(rig)]

    await kill_broker_and_restart(rig.broker)
    await reconnected(*clients(rig), before=before)

    assert (await rig.pending()).id == approval.id
    assert (await rig.workflow(wf.id)).status == "waiting_approval"
    await rig.decide(approval)
    done = await finished(rig, wf.id)
    assert done.status == "completed", done.reason
    assert rig.seen.calls == [("notify_owner", "first"), ("send_message", MESSAGE["text"])]
    assert (await rig.orch.approvals.get(approval.id)).status == "used"
    records = await verified_audit_log(rig.operator)
    kinds = [(r.kind, r.outcome) for r in records]
    assert ("approval_decided", "approved") in kinds
    assert kinds.count(("command", "ok")) == 2


async def held_in_its_first_step(rig: Platform) -> Workflow:
    """A workflow of a slow note and one after it, started; returns once the slow one is
    in its handler, where it waits until ``rig.seen.gate`` is set."""
    wf = await rig.orch.engine.submit("test", Plan(
        steps=[note("s1", "slow"), note("s2", "after", "s1")], planner="test"))
    rig.orch.engine.start(wf.id)
    await eventually(lambda: rig.seen.calls == [("notify_owner", "slow")], timeout=10,
                     what="the slow step is in its handler")
    return wf


async def test_a_step_in_flight_when_the_broker_dies_is_not_run_twice(
        rig: Platform, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reply to a command sent before the kill is lost with the server's state. The
    engine sends the step again with the same jti once the step timeout passes; the agent,
    which ran it, refuses the repeat, so the step counts as done once and the workflow
    completes."""
    monkeypatch.setattr(engine_module, "STEP_TIMEOUT_S", 5.0)  # the default 30 s adds nothing
    wf = await held_in_its_first_step(rig)
    before = [c.reconnects for c in clients(rig)]

    await kill_broker_and_restart(rig.broker)
    rig.seen.gate.set()
    await reconnected(*clients(rig), before=before)

    done = await finished(rig, wf.id)
    assert done.status == "completed", done
    assert rig.seen.calls == [("notify_owner", "slow"), ("notify_owner", "after")]
    assert done.steps["s1"].code == "already_done"
    assert rig.agent.counts == {"ok": 2, "refused": 1, "error": 0}
    records = await verified_audit_log(rig.operator)
    s1 = [(r.outcome, r.code) for r in records
          if r.kind == "command" and r.detail.get("step") == "s1"]
    assert ("error", "retrying") in s1
    assert s1[-1] == ("ok", "already_done")


async def test_a_broker_outage_longer_than_the_step_timeout_does_not_strand_the_workflow(
        rig: Platform, monkeypatch: pytest.MonkeyPatch) -> None:
    """The broker stays down past the step timeout and the audit write's own timeout, so
    the engine gives up on the attempt while it cannot even record that. Once the broker
    is back the workflow must still finish, each side effect once, and the audit log must
    still take records and verify."""
    monkeypatch.setattr(engine_module, "STEP_TIMEOUT_S", 0.5)
    wf = await held_in_its_first_step(rig)
    before = [c.reconnects for c in clients(rig)]

    await kill_broker_and_restart(rig.broker, outage_s=OUTAGE_S)
    rig.seen.gate.set()
    await reconnected(*clients(rig), before=before)

    done = await finished(rig, wf.id)
    assert done.status == "completed", done
    assert rig.seen.calls == [("notify_owner", "slow"), ("notify_owner", "after")]
    records = await verified_audit_log(rig.operator)
    assert any(r.kind == "workflow" and r.action == "finish" and r.workflow_id == wf.id
               for r in records)


def stateful_agent(calls: list[str]) -> Agent:
    agent = Agent("health", version="1.0.0", kind="stateful")

    @agent.action(description="Record a summary.")
    async def daily_summary(args: Text, ctx: Context) -> Done:
        calls.append(args.text)
        return Done(ok=True)

    return agent


async def test_a_stateful_agent_remembers_used_steps_across_a_broker_kill(
        fresh_broker: RunningBroker) -> None:
    """The single-use ledger of a stateful agent is in its KV bucket (file store): after
    the broker is killed and the agent restarted with an empty memory, a step sent again
    with the same jti is still refused."""
    orch = await connection.connect(load_identity(fresh_broker.secrets, "orchestrator"),
                                    fresh_broker.url)
    try:
        await RevocationAuthority.start(orch)
        caller = AgentCaller(orch, TokenIssuer("orchestrator", orch.material.signing_key))
        calls: list[str] = []
        material = load_identity(fresh_broker.secrets, "health")
        agent = AgentService(stateful_agent(calls), material, fresh_broker.url, register=False)
        await agent.start()
        first = await caller.call("health", "daily_summary", {"text": "once"}, jti="wf-kill-s1")
        assert isinstance(first, Completed)
        await agent.stop()

        before = orch.reconnects
        await kill_broker_and_restart(fresh_broker)
        await reconnected(orch, before=[before])
        agent = AgentService(stateful_agent(calls), material, fresh_broker.url, register=False)
        await agent.start()
        try:
            again = await caller.call("health", "daily_summary", {"text": "once"},
                                      jti="wf-kill-s1")
            fresh = await caller.call("health", "daily_summary", {"text": "new"},
                                      jti="wf-kill-s2")
        finally:
            await agent.stop()
        assert isinstance(again, Refused)
        assert again.code == "token_replayed"
        assert isinstance(fresh, Completed)
        assert calls == ["once", "new"]
    finally:
        await orch.close()


THREE_NOTES = """\
name: three-notes
description: Three notes in a row; the middle one is slow.
triggers:
  - manual: true
steps:
  - {id: one, agent: notify, action: notify_owner, args: {text: one}}
  - {id: two, agent: notify, action: notify_owner, after: [one], args: {text: slow}}
  - {id: three, agent: notify, action: notify_owner, after: [two], args: {text: three}}
"""


class OrchestratorProcess:
    """`mas orchestrator run` as its own process, the way `mas up` and compose start it."""

    def __init__(self, broker: RunningBroker, log_path: Path) -> None:
        self.broker = broker
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        root = self.broker.project.root
        extra = {"MAS_ROOT": str(root), "MAS_BROKER_URL": self.broker.url,
                 "MAS_PLANNER": "offline"}
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen([*MAS, "orchestrator", "run"], cwd=root,
                                            env={**env(), **extra}, stdin=subprocess.DEVNULL,
                                            stdout=log_file, stderr=subprocess.STDOUT)

    def kill(self) -> int:
        assert self.process is not None
        assert self.process.poll() is None, self.log()
        self.process.send_signal(signal.SIGKILL)
        return self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


async def ask(operator: BrokerClient, subject: str, payload: BaseModel,
              timeout: float = 10) -> bytes:
    reply = await operator.request(subject, payload, timeout=timeout)
    assert reply.sender == "orchestrator"
    return reply.data


async def orchestrator_answers(operator: BrokerClient, proc: OrchestratorProcess) -> None:
    """Wait until the orchestrator process serves the operator (it is up and resumed)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while True:
        assert proc.process is not None
        assert proc.process.poll() is None, proc.log()
        try:
            await ask(operator, admin.WORKFLOWS_LIST, admin.WorkflowQuery(), timeout=2)
            return
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            if loop.time() > deadline:
                raise AssertionError(f"orchestrator never answered:\n{proc.log()}") from None
            await asyncio.sleep(0.2)


def recording_agent(events: list[str], gate: asyncio.Event) -> Agent:
    """notify_owner that records when each run starts and ends; "slow" waits for ``gate``."""
    agent = Agent("notify", version="1.0.0", kind="stateless")

    @agent.action(description="Record a note.")
    async def notify_owner(args: Text, ctx: Context) -> Done:
        events.append(f"start {args.text}")
        if args.text == "slow":
            await gate.wait()
        events.append(f"end {args.text}")
        return Done(ok=True)

    return agent


async def test_an_orchestrator_killed_mid_workflow_finishes_it_after_a_restart(
        fresh_broker: RunningBroker, connect_fresh: ConnectAs, tmp_path: Path) -> None:
    """SIGKILL while step two runs in the agent; the new process resends step two with
    the same single-use jti, the agent answers "already used" only once its first run is
    over, and step three starts after that, never before."""
    workflows = fresh_broker.project.root / "workflows"
    workflows.mkdir()
    (workflows / "three-notes.yaml").write_text(THREE_NOTES)
    proc = OrchestratorProcess(fresh_broker, tmp_path / "orchestrator.log")
    operator = await connect_fresh("operator")
    events: list[str] = []
    gate = asyncio.Event()
    agent = AgentService(recording_agent(events, gate),
                         load_identity(fresh_broker.secrets, "notify"), fresh_broker.url)
    proc.start()
    try:
        await orchestrator_answers(operator, proc)
        await agent.start()
        await eventually(lambda: agent.registration is not None, timeout=30,
                         what="notify registered with the orchestrator process")
        started = WorkflowList.model_validate_json(await ask(
            operator, admin.WORKFLOWS_RUN, admin.WorkflowRunRequest(request="three-notes")))
        [wf] = started.workflows
        await eventually(lambda: "start slow" in events, timeout=30,
                         what="the slow step is in its handler")

        assert proc.kill() == -signal.SIGKILL
        proc.start()
        await orchestrator_answers(operator, proc)
        # the resent step two has reached the agent (or, wrongly, step three has run)
        await eventually(lambda: len(agent._tasks) == 2 or "start three" in events,
                         timeout=30, what="step two sent again")
        gate.set()

        async def status() -> Workflow:
            data = await ask(operator, admin.WORKFLOWS_LIST, admin.WorkflowQuery(id=wf.id))
            [now] = WorkflowList.model_validate_json(data).workflows
            return now

        deadline = asyncio.get_running_loop().time() + 60
        while not (now := await status()).finished:
            assert asyncio.get_running_loop().time() < deadline, now
            await asyncio.sleep(0.2)
        assert now.status == "completed", now
        assert events == ["start one", "end one", "start slow", "end slow",
                          "start three", "end three"]
        assert now.steps["two"].code == "already_done"
        assert now.steps["two"].attempts == 2
        assert agent.counts == {"ok": 3, "refused": 1, "error": 0}
        records = await verified_audit_log(operator)
        starts = [r for r in records if (r.kind, r.action) == ("system", "start")]
        assert [r.detail["resumed"] for r in starts] == [[], [wf.id]]
    finally:
        gate.set()
        await agent.stop()
        proc.stop()


async def revoke_agent(plat: Platform, agent: str, *, cli: bool = False) -> None:
    """`mas tokens revoke --agent NAME` (the command itself, or the request it sends);
    returns once the agent holds the revocation."""
    if cli:
        done = await asyncio.to_thread(
            mas, plat.broker.project.root, "tokens", "revoke", agent, "--agent", "--reason",
            "lost laptop", extra_env={"MAS_BROKER_URL": plat.broker.url})
        assert done.returncode == 0, done.stderr
        assert f"revoked agent {agent}" in done.stdout
    else:
        answer = admin.Ok.model_validate_json(await plat.admin(admin.REVOKE, admin.RevokeRequest(
            kind="agent", target=agent, reason="lost laptop")))
        assert answer.detail == f"revoked agent {agent}"
    held = plat.agent.gate.revocations
    assert isinstance(held, RevocationSet)
    await eventually(lambda: any(e.kind == "agent" and e.target == agent
                                 for e in held.entries()),
                     timeout=10, what="the agent holds the revocation")
    [entry] = [e for e in held.entries() if e.kind == "agent"]
    # tokens minted from now on are newer than the revocation: the kill switch must
    # refuse them too, not only the tokens that were out when it was thrown
    await eventually(lambda: time.time() >= entry.revoked_at + 1, timeout=3,
                     what="a second after the revocation")


async def assert_refused_by_the_agent(plat: Platform, wf: Workflow, step_id: str) -> None:
    """The step's refusal came from the agent (its own count) and is in the audit log."""
    state = wf.steps[step_id]
    assert (state.status, state.code) == ("refused", "token_revoked"), state
    assert plat.agent.counts["refused"] == 1
    records = await verified_audit_log(plat.operator)
    assert [(r.identity, r.outcome, r.code) for r in records
            if r.kind == "command" and r.detail.get("step") == step_id][-1] == \
        ("notify", "refused", "token_revoked")
    assert any(r.kind == "revocation" and r.detail.get("target") == "notify" for r in records)


async def test_a_revoked_agent_refuses_the_next_step_after_the_one_it_finished(
        rig: Platform) -> None:
    """Step one ran; step two waits for a human; the operator revokes the agent; the
    approved step two is refused by the agent itself and nothing after it runs."""
    send = SEND.model_copy(update={"id": "s2", "after": ["s1"]})
    wf = await rig.run_plan(note("s1", "one"), send, note("s3", "three", "s2"))
    assert wf.status == "waiting_approval"
    assert rig.seen.calls == [("notify_owner", "one")]

    await revoke_agent(rig, "notify", cli=True)
    await rig.decide(await rig.pending())
    done = await finished(rig, wf.id)

    assert done.status == "failed"
    assert rig.seen.calls == [("notify_owner", "one")]
    await assert_refused_by_the_agent(rig, done, "s2")
    assert done.steps["s3"].status == "skipped"


async def test_a_revocation_while_a_step_runs_stops_the_very_next_command(
        rig: Platform) -> None:
    """Revoked while step one is in its handler: step one (admitted before) finishes,
    step two is the next command the agent sees and is refused."""
    wf = await rig.orch.engine.submit("test", Plan(
        steps=[note("s1", "slow"), note("s2", "two", "s1"), note("s3", "three", "s2")],
        planner="test"))
    rig.orch.engine.start(wf.id)
    await eventually(lambda: rig.seen.calls == [("notify_owner", "slow")], timeout=10,
                     what="step one is in its handler")

    await revoke_agent(rig, "notify")
    rig.seen.gate.set()
    done = await finished(rig, wf.id)

    assert done.steps["s1"].status == "done"
    assert rig.seen.calls == [("notify_owner", "slow")]
    await assert_refused_by_the_agent(rig, done, "s2")
    assert done.steps["s3"].status == "skipped"
