"""The reliability suite of issue 8: load, and an agent killed mid-workflow.

Real parts throughout: a nats-server with the compiled config and JetStream file store,
the real ``Orchestrator`` (in this process, so plans with per-step arguments go straight
to its engine) and all six real agents, each its own ``mas agent run NAME`` process, the
way `mas up` and compose run them. The outside world is loopback fakes speaking the real
wire formats: Home Assistant's REST API for home, a webhook for notify, a folder for
backup, an export folder for health. Every side effect has a unique argument per step, so
the receivers can say how often each step's side effect happened. The broker and
orchestrator kills are in test_resilience.py; cutting an agent off the network is a
compose test.

Select with ``pytest -m reliability``; it also runs in the default suite.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agents.home.tests.fake_ha import TOKEN, FakeHomeAssistant
from agents.home.tests.fake_ha import serve as serve_ha
from agents.notify.tests.receivers import FakeWebhook, Received
from agents.notify.tests.receivers import serve as serve_receiver
from broker import connection
from broker.connection import BrokerClient
from broker.secrets import load_identity
from mas.audit_cli import StreamReader
from orchestrator import engine as engine_module
from orchestrator.plan import Plan, Step
from orchestrator.service import Orchestrator
from orchestrator.workflows import Workflow
from protocol import admin
from protocol.audit import AuditRecord
from security.decisions import sign_decision
from tests.conftest import RunningBroker, eventually
from tests.test_cli import MAS, env, mas

pytestmark = [pytest.mark.broker, pytest.mark.reliability]

AGENTS = ("aggregator", "anomaly", "backup", "health", "home", "notify")
STEPS_PER_WORKFLOW = 16  # the plan limit (orchestrator.plan.MAX_STEPS): a chain of steps
LOAD_WORKFLOWS = 625  # x 16 = 10,000 steps
IN_FLIGHT = 64  # workflows at once; a chain has one step in flight, so 64 steps
MIB = 1024 * 1024
# "back near its baseline": generous, as CPython and nats-server keep some freed memory
RSS_SLACK = 50 * MIB
RSS_FACTOR = 1.5


# --------------------------------------------------------------------------- processes


def rss(pid: int) -> int:
    """Resident set size in bytes (``ps`` reads it on Linux and macOS alike)."""
    out = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True,
                         text=True, check=True)
    return int(out.stdout.strip()) * 1024


class AgentProcess:
    """`mas agent run NAME` as its own process, its settings from the environment."""

    def __init__(self, broker: RunningBroker, name: str, workdir: Path,
                 settings: dict[str, str]) -> None:
        self.broker = broker
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self.env = {**env(), "MAS_ROOT": str(broker.project.root),
                    "MAS_BROKER_URL": broker.url, "MAS_HEARTBEAT_S": "2",
                    "MAS_READY_FILE": str(workdir / f"{name}.ready"), **settings}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                [*MAS, "agent", "run", self.name], cwd=self.broker.project.root, env=self.env,
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def pause(self) -> None:
        """SIGSTOP: the agent hangs; the broker still hands it commands it never answers."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def kill(self) -> int:
        assert self.process is not None
        assert self.alive(), self.log()
        self.process.send_signal(signal.SIGKILL)
        return self.process.wait(timeout=30)

    def stop(self) -> int | None:
        """SIGTERM: the agent drains and logs its counts; returns the exit code."""
        if not self.alive():
            return self.process.returncode if self.process is not None else None
        assert self.process is not None
        self.process.terminate()
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"{self.name} did not drain within 30 s") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def final_counts(self) -> dict[str, int]:
        """The handled/refused/failed counts the agent logged when it drained."""
        for line in reversed(self.log().splitlines()):
            if '"agent.stopped"' in line:
                entry = json.loads(line)
                return {k: int(entry[k]) for k in ("ok", "refused", "error")}
        raise AssertionError(f"{self.name} logged no agent.stopped line:\n{self.log()[-2000:]}")


@dataclass
class HeldWebhook(FakeWebhook):
    """Takes each delivery at once, but holds its answer to a message containing "slow"
    until released: the side effect has happened, the agent is still waiting."""

    release: threading.Event = field(default_factory=threading.Event)

    def answer(self, request: Received) -> tuple[int, bytes]:
        if b"slow" in request.body:
            self.release.wait(timeout=120)
        return super().answer(request)


@dataclass
class Outside:
    """The loopback world the agents talk to, and what it received."""

    ha: FakeHomeAssistant
    webhook: HeldWebhook
    settings: dict[str, dict[str, str]]

    def notes(self, path: str = "/owner") -> Counter[str]:
        return Counter(r.json()["message"] for r in list(self.webhook.received)
                       if r.path == path)

    def state_reads(self) -> Counter[str]:
        return Counter(s.path.removeprefix("/api/states/") for s in list(self.ha.requests)
                       if s.method == "GET" and s.path.startswith("/api/states/"))


@pytest.fixture
def outside(tmp_path: Path) -> Iterator[Outside]:
    token_file = tmp_path / "ha-token"
    token_file.write_text(TOKEN + "\n")
    backups = tmp_path / "backups"
    backups.mkdir()
    (backups / "nightly.tar").write_bytes(b"backup")
    exports = tmp_path / "health-exports"
    exports.mkdir()
    with serve_ha(FakeHomeAssistant()) as ha, serve_receiver(HeldWebhook()) as webhook:
        webhook.release.set()  # a test that holds a delivery clears it
        contacts = {"bob": {"kind": "webhook", "url": f"{webhook.url}/bob"}}
        yield Outside(ha, webhook, {
            "home": {"MAS_HOME_URL": ha.url, "MAS_HOME_TOKEN_FILE": str(token_file)},
            "notify": {"MAS_NOTIFY_WEBHOOK_URL": f"{webhook.url}/owner",
                       "MAS_NOTIFY_CONTACTS": json.dumps(contacts)},
            "backup": {"MAS_BACKUP_WATCH_DIR": str(backups)},
            "health": {"MAS_HEALTH_EXPORT_DIR": str(exports)},
        })


@dataclass
class Stack:
    broker: RunningBroker
    orch: Orchestrator
    agents: dict[str, AgentProcess]
    operator: BrokerClient
    outside: Outside
    checkpoints: Path

    def pids(self) -> dict[str, int]:
        assert self.broker.server.process is not None
        return {"test process (orchestrator)": os.getpid(),
                "nats-server": self.broker.server.process.pid,
                **{name: a.pid for name, a in self.agents.items()}}

    async def registered(self, *names: str) -> None:
        def ready() -> bool:
            catalog = self.orch.registry.catalog()
            return all(any(a.agent == name for a in catalog) for name in names)

        try:
            await eventually(ready, timeout=60, what=f"{', '.join(names)} registered")
        except AssertionError:
            raise AssertionError("\n".join(f"--- {n}\n{a.log()[-3000:]}"
                                           for n, a in self.agents.items())) from None


OpenStack = Callable[..., Awaitable[Stack]]


@pytest.fixture
async def open_stack(fresh_broker: RunningBroker, outside: Outside, tmp_path: Path,
                     monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[OpenStack]:
    """Start the orchestrator and the named agents (each its own process) and wait until
    each has registered; everything is stopped afterwards."""
    checkpoints = tmp_path / "checkpoints.jsonl"
    monkeypatch.setenv("MAS_AUDIT_CHECKPOINTS", str(checkpoints))
    opened: list[Stack] = []

    async def start(*names: str) -> Stack:
        orch = Orchestrator(fresh_broker.project.policy(),
                            load_identity(fresh_broker.secrets, "orchestrator"),
                            fresh_broker.url)
        await orch.start()
        agents = {name: AgentProcess(fresh_broker, name, tmp_path,
                                     outside.settings.get(name, {})) for name in names}
        operator = await connection.connect(load_identity(fresh_broker.secrets, "operator"),
                                            fresh_broker.url)
        opened.append(s := Stack(fresh_broker, orch, agents, operator, outside, checkpoints))
        for agent in agents.values():
            agent.start()
        await s.registered(*names)
        return s

    yield start
    for s in opened:
        for agent in s.agents.values():
            if agent.alive():
                agent.stop()
        await bounded(s.operator.close(), "the operator's connection to close")
        await bounded(s.orch.stop(), "the orchestrator to stop")


async def bounded(step: Awaitable[None], what: str, timeout: float = 60) -> None:
    """Teardown that cannot hang the suite: fails naming what did not finish."""
    try:
        await asyncio.wait_for(step, timeout)
    except TimeoutError:
        raise AssertionError(f"{what} took over {timeout:.0f} s") from None


# --------------------------------------------------------------------------- plans


def step_for(n: int, key: str, agents: tuple[str, ...] = AGENTS) -> Step:
    """Step ``n`` of a chain: the agents in turn, each with arguments unique to ``key``
    where the action reaches the outside world."""
    agent = agents[n % len(agents)]
    args: dict[str, dict[str, object]] = {
        "aggregator": {},
        "anomaly": {"limit": 5},
        "backup": {},
        "health": {},
        "home": {"entity_id": f"sensor.{key}"},
        "notify": {"title": "Load", "message": key, "priority": "low"},
    }
    action = {"aggregator": "daily_digest", "anomaly": "recent_alerts",
              "backup": "check_backups", "health": "daily_summary", "home": "get_state",
              "notify": "notify_owner"}[agent]
    return Step(id=f"s{n}", agent=agent, action=action, args=args[agent],
                after=[f"s{n - 1}"] if n else [])


def chain(prefix: str, length: int = STEPS_PER_WORKFLOW,
          agents: tuple[str, ...] = AGENTS) -> Plan:
    return Plan(planner="test", steps=[step_for(n, f"{prefix}_{n}", agents)
                                       for n in range(length)])


def add_entities(ha: FakeHomeAssistant, plans: list[Plan]) -> None:
    """Home Assistant knows every entity the plans read."""
    for plan in plans:
        for step in plan.steps:
            if step.agent == "home":
                entity = str(step.args["entity_id"])
                ha.states[entity] = {
                    "entity_id": entity, "state": "1", "attributes": {"friendly_name": entity},
                    "last_changed": "2024-03-10T07:12:45.031536+00:00",
                    "last_updated": "2024-03-10T07:12:45.031536+00:00",
                    "context": {"id": "01HRJ8ZK4C6V5Q8W6T3N2M1P0A", "parent_id": None,
                                "user_id": None}}


@dataclass(frozen=True)
class Ended:
    """What the test keeps of a finished workflow (not its outputs: the memory measured
    is the orchestrator's, not the test's bookkeeping)."""

    id: str
    status: str
    reason: str
    steps: dict[str, tuple[str, int, str, str]]  # id -> status, attempts, code, reason
    agents: dict[str, str]  # step id -> agent


@dataclass
class Tally:
    """Checked as each workflow ends: the right answer reached each step."""

    notes: Counter[str] = field(default_factory=Counter)
    reads: Counter[str] = field(default_factory=Counter)
    wrong: list[str] = field(default_factory=list)

    def check(self, wf: Workflow) -> Ended:
        assert wf.plan is not None
        for step in wf.plan.steps:
            state = wf.steps[step.id]
            output = state.output or {}
            if state.status != "done":
                continue
            if step.agent == "notify":
                self.notes[str(step.args["message"])] += 1
                if output.get("delivered") is not True:
                    self.wrong.append(f"{wf.id}/{step.id}: {output}")
            elif step.agent == "home":
                self.reads[str(step.args["entity_id"])] += 1
                found = output.get("state")
                if not isinstance(found, dict) or found.get("entity_id") != step.args["entity_id"]:
                    self.wrong.append(f"{wf.id}/{step.id}: {output}")
        return Ended(wf.id, wf.status, wf.reason,
                     {sid: (st.status, st.attempts, st.code, st.reason)
                      for sid, st in wf.steps.items()},
                     {step.id: step.agent for step in wf.plan.steps})


async def run_all(s: Stack, plans: list[Plan], in_flight: int, tally: Tally) -> list[Ended]:
    """Submit each plan to the engine and run it to its end, ``in_flight`` at a time."""
    slots = asyncio.Semaphore(in_flight)

    async def one(i: int, plan: Plan) -> Ended:
        async with slots:
            wf = await s.orch.engine.submit(f"load {i}", plan)
            return tally.check(await s.orch.engine.advance(wf.id))

    return await asyncio.gather(*(one(i, p) for i, p in enumerate(plans)))


# --------------------------------------------------------------------------- checks


async def audit_log(s: Stack) -> list[AuditRecord]:
    """`mas audit verify` passes (signatures, chain, checkpoints in the stream and in the
    file); then every record, read with the operator's grants."""
    done = await asyncio.to_thread(
        mas, s.broker.project.root, "audit", "verify", "--json", "--checkpoints",
        str(s.checkpoints), timeout=300, extra_env={"MAS_BROKER_URL": s.broker.url})
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["ok"], report
    assert report["file_checkpoints"] > 0, report
    records = [AuditRecord.model_validate_json(raw)
               async for _, raw in StreamReader(s.operator).records()]
    assert len(records) >= report["records"]  # the orchestrator may have written one more
    return records[:report["records"]]


def check_every_step_once(wfs: list[Ended], records: list[AuditRecord]) -> None:
    """Each step of each workflow has exactly one token, one command sent and one result
    in the audit log, and each workflow one finish record."""
    by_step: dict[str, Counter[tuple[str, str]]] = {}
    finished: Counter[str] = Counter()
    for r in records:
        jti = r.detail.get("jti")
        if r.kind in ("command", "token_issued") and isinstance(jti, str):
            by_step.setdefault(jti, Counter())[(r.kind, r.outcome)] += 1
        elif (r.kind, r.action) == ("workflow", "finish") and r.workflow_id:
            finished[r.workflow_id] += 1
    expected = {"token_issued": 1, "command": 2}
    for wf in wfs:
        assert finished[wf.id] == 1, wf.id
        for step_id in wf.steps:
            seen = by_step.get(f"{wf.id}-{step_id}", Counter())
            kinds = Counter({k: 0 for k in expected})
            for (kind, _), n in seen.items():
                kinds[kind] += n
            assert dict(kinds) == expected, (wf.id, step_id, seen)
            assert seen[("command", "ok")] == 1, (wf.id, step_id, seen)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process so far, from ``ps`` ([[dd-]hh:]mm:ss)."""
    out = subprocess.run(["ps", "-o", "time=", "-p", str(pid)], capture_output=True,
                         text=True, check=True).stdout.strip()
    days, _, clock = out.rpartition("-")
    seconds = 0.0
    for part in clock.split(":"):
        seconds = seconds * 60 + float(part)
    return seconds + (int(days) * 86400 if days else 0)


def usage_table(before: dict[str, int], after: dict[str, int],
                cpu: dict[str, float]) -> str:
    return "\n".join(f"{name:28} RSS {before[name] / MIB:7.1f} -> {after[name] / MIB:7.1f} MiB"
                     f"   CPU {cpu[name]:6.1f} s" for name in before)


def near(before: int, after: int, slack: int = RSS_SLACK) -> bool:
    return after <= max(before + slack, before * RSS_FACTOR)


# nats-server keeps what the load stored: every agent's single-use ledger entries (one per
# step, kept at least an hour by design) and some 40,000 audit records, with its indexes;
# it gets more room than our own processes, whose growth would be a leak.
NATS_RSS_SLACK = 128 * MIB


# --------------------------------------------------------------------------- load


async def test_ten_thousand_steps_with_64_in_flight(open_stack: OpenStack) -> None:
    """10,000 steps over all six agents, 64 workflows (so 64 steps) in flight: each step
    completes, its side effect happens once, the audit log holds each step and verifies,
    and memory goes back near where it was."""
    s = await open_stack(*AGENTS)
    tally = Tally()
    warmup = [chain(f"warm{i}") for i in range(IN_FLIGHT)]
    plans = [chain(f"w{i}") for i in range(LOAD_WORKFLOWS)]
    add_entities(s.outside.ha, [*warmup, *plans])
    warm = await run_all(s, warmup, IN_FLIGHT, tally)
    assert all(wf.status == "completed" for wf in warm), [
        wf for wf in warm if wf.status != "completed"][:2]
    gc.collect()
    pids = s.pids()
    me = "test process (orchestrator)"
    baseline = {name: rss(pid) for name, pid in pids.items()}
    cpu = {name: cpu_seconds(pid) for name, pid in pids.items()}
    cpu[me] = time.process_time()

    began = time.monotonic()
    wfs = await run_all(s, plans, IN_FLIGHT, tally)
    elapsed = time.monotonic() - began
    cpu = {name: cpu_seconds(pid) - cpu[name] for name, pid in pids.items()} | {
        me: time.process_time() - cpu[me]}
    steps = sum(len(wf.steps) for wf in wfs)
    print(f"\n{steps:,} steps in {len(wfs)} workflows, {IN_FLIGHT} in flight: "
          f"{elapsed:.1f} s ({steps / elapsed:.0f} steps/s)", file=sys.stderr)

    # memory first, while the test holds nothing big: settle, collect, compare
    gc.collect()
    after: dict[str, int] = {}

    def settled() -> bool:
        after.update({name: rss(pid) for name, pid in pids.items()})
        return all(near(baseline[n], after[n],
                        NATS_RSS_SLACK if n == "nats-server" else RSS_SLACK) for n in baseline)

    try:
        await eventually(settled, timeout=30, what="memory back near its baseline")
    finally:
        print("RSS after the warm-up -> after the load and a GC; CPU during the load:\n"
              + usage_table(baseline, after, cpu), file=sys.stderr)

    # every workflow ended, every step with a recorded outcome; here, all of them done
    assert steps == LOAD_WORKFLOWS * STEPS_PER_WORKFLOW
    unfinished = [wf for wf in wfs if wf.status not in ("completed", "failed")]
    assert not unfinished, unfinished[0]
    not_done = [(wf.id, sid, state) for wf in wfs for sid, state in wf.steps.items()
                if state[0] != "done"]
    assert not not_done, not_done[:5]
    assert all(wf.status == "completed" for wf in wfs)
    retried = [(wf.id, sid) for wf in wfs for sid, st in wf.steps.items() if st[1] != 1]
    assert not retried, f"messages were lost and sent again: {retried[:5]}"

    # the right answer came back to each step, and each side effect happened once
    assert not tally.wrong, tally.wrong[:5]
    assert s.outside.notes() == tally.notes
    assert s.outside.state_reads() == tally.reads

    records = await audit_log(s)
    check_every_step_once([*warm, *wfs], records)
    del records

    # each agent's own count of handled commands: one per step, nothing refused
    per_agent = Counter(agent for wf in [*warm, *wfs] for agent in wf.agents.values())
    for name, agent in s.agents.items():
        assert agent.stop() == 0, agent.log()[-2000:]
        assert agent.final_counts() == {"ok": per_agent[name], "refused": 0, "error": 0}, name


# --------------------------------------------------------------------------- an agent killed

FAULT_AGENTS = ("aggregator", "notify")
FAULT_WORKFLOWS = 24
FAULT_STEPS = 8
FAULT_STEP_TIMEOUT_S = 5.0  # an unanswered step is sent again after this (default 30 s)


async def finished(s: Stack, workflow_id: str, timeout: float = 60) -> Workflow:
    """The workflow once it has ended (read from its KV entry)."""
    deadline = time.monotonic() + timeout
    while True:
        wf = await s.orch.engine.load(workflow_id)
        assert wf is not None
        if wf.finished or time.monotonic() > deadline:
            return wf
        await asyncio.sleep(0.1)


async def in_hands(s: Stack, workflow_ids: list[str], agent: str, at_least: int) -> None:
    """Wait until ``at_least`` steps on ``agent`` were sent and are unanswered."""
    deadline = time.monotonic() + 30
    while True:
        running = 0
        for workflow_id in workflow_ids:
            wf = await s.orch.engine.load(workflow_id)
            assert wf is not None
            assert wf.plan is not None
            running += sum(1 for step in wf.plan.steps
                           if step.agent == agent and wf.steps[step.id].status == "running")
        if running >= at_least:
            return
        assert time.monotonic() < deadline, f"only {running} steps in {agent}'s hands"
        await asyncio.sleep(0.05)


def request_outcomes(log: str) -> Counter[str]:
    """Outcomes of the commands an agent's log says it handled."""
    found: Counter[str] = Counter()
    for line in log.splitlines():
        if '"agent.request"' in line:
            found[json.loads(line)["outcome"]] += 1
    return found


async def test_an_agent_killed_with_steps_in_flight_and_started_again(
        open_stack: OpenStack, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL `mas agent run aggregator` (hung first, so that commands are in its hands)
    while 24 workflows have steps in flight on it and on notify and a sensitive step waits
    for a human; start it again. What it never
    answered is sent again with the same jti; its single-use ledger is in its KV bucket,
    so a step it had taken is refused as a repeat (done once, not run twice). Every
    workflow ends, completed or failed with a reason; each delivery happens once; the
    approval is still pending and runs once approved; the audit log verifies."""
    monkeypatch.setattr(engine_module, "STEP_TIMEOUT_S", FAULT_STEP_TIMEOUT_S)
    s = await open_stack(*FAULT_AGENTS)
    engine = s.orch.engine
    held = await engine.submit("message bob", Plan(planner="test", steps=[Step(
        id="send", agent="notify", action="send_message",
        args={"to": "bob", "title": "Hello", "message": "approved after the kill"})]))
    assert (await engine.advance(held.id)).status == "waiting_approval"
    [approval] = await s.orch.approvals.find("pending")

    began = time.monotonic()
    plans = [chain(f"k{i}", FAULT_STEPS, FAULT_AGENTS) for i in range(FAULT_WORKFLOWS)]
    tasks = []
    for i, plan in enumerate(plans):
        submitted = await engine.submit(f"fault {i}", plan)
        tasks.append(engine.start(submitted.id))
        tasks[-1].set_name(submitted.id)
    await eventually(lambda: sum(s.outside.notes().values()) >= FAULT_WORKFLOWS, timeout=60,
                     what="the workflows under way")
    aggregator = s.agents["aggregator"]
    aggregator.pause()  # hung first, so that commands are surely in its hands when it dies
    await in_hands(s, [t.get_name() for t in tasks], "aggregator", at_least=3)
    assert aggregator.kill() == -signal.SIGKILL
    killed_log = len(aggregator.log())
    aggregator.start()

    ended = [Tally().check(wf) for wf in await asyncio.wait_for(asyncio.gather(*tasks), 180)]
    print(f"\nafter the kill: {Counter(wf.status for wf in ended)}; steps sent again: "
          f"{Counter(st[2] or st[0] for wf in ended for st in wf.steps.values() if st[1] > 1)}"
          f"; {time.monotonic() - began:.1f} s from the start", file=sys.stderr)
    for wf in ended:
        assert wf.status in ("completed", "failed"), wf
        if wf.status == "failed":
            assert wf.reason, wf
            assert any(st[0] == "failed" and st[2] and st[3] for st in wf.steps.values()), wf
    agg_steps = [st for wf in ended for sid, st in wf.steps.items()
                 if wf.agents[sid] == "aggregator"]
    assert any(st[1] > 1 for st in agg_steps), "no step was in flight when the agent died"

    # each delivery once: notify kept running, and nothing after a step ran twice
    delivered = Counter(f"k{i}_{sid.removeprefix('s')}" for i, wf in enumerate(ended)
                        for sid, st in wf.steps.items()
                        if wf.agents[sid] == "notify" and st[0] == "done")
    assert s.outside.notes() == delivered

    # no aggregator step ran twice: each repeat was refused by the restarted agent's
    # ledger, and the two processes together ran no more commands than there were steps
    repeats = sum(1 for st in agg_steps if st[2] == "already_done")
    fresh = sum(1 for st in agg_steps if st[0] == "done" and st[2] != "already_done")
    old, new = (request_outcomes(aggregator.log()[:killed_log]),
                request_outcomes(aggregator.log()[killed_log:]))
    assert new["refused"] == repeats
    assert fresh <= old["ok"] + new["ok"] <= fresh + repeats

    # the approval outlived the kill, and runs once approved
    assert (await s.orch.approvals.get(approval.id)).status == "pending"
    decided = await s.operator.request(admin.APPROVALS_DECIDE, sign_decision(
        s.operator.material.signing_key, approval_id=approval.id,
        args_sha256=approval.args_sha256, decision="approve", reason="fine", by="operator"),
        timeout=30)
    assert decided.sender == "orchestrator"
    await eventually(lambda: s.outside.notes("/bob") == Counter(["approved after the kill"]),
                     timeout=30, what="the approved message delivered")
    assert (await finished(s, held.id)).status == "completed"

    records = await audit_log(s)
    lost = [r for r in records if r.code == "retrying" and r.identity == "aggregator"
            and r.detail.get("error") == "TimeoutError"]
    assert lost, "no command was in the agent's hands when it died"
    results = Counter(str(r.detail.get("jti")) for r in records
                      if r.kind == "command" and r.outcome != "pending" and r.code != "retrying")
    for wf in ended:
        for sid, st in wf.steps.items():
            if st[1]:  # sent at least once: one final result in the log
                assert results[f"{wf.id}-{sid}"] == 1, (wf.id, sid, st)


async def test_a_stateless_agent_killed_mid_delivery_does_not_deliver_twice(
        open_stack: OpenStack, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL `mas agent run notify` while its delivery has reached the receiver but
    the answer has not come back, and start it again: the step is resent with the same
    jti after the step timeout, and must not be delivered a second time. (It was, while
    a stateless agent kept its single-use ledger in memory only.)"""
    monkeypatch.setattr(engine_module, "STEP_TIMEOUT_S", FAULT_STEP_TIMEOUT_S)
    s = await open_stack("notify")
    engine = s.orch.engine
    s.outside.webhook.release.clear()
    wf = await engine.submit("two notes", Plan(planner="test", steps=[
        Step(id="s1", agent="notify", action="notify_owner",
             args={"title": "Note", "message": "slow one"}),
        Step(id="s2", agent="notify", action="notify_owner",
             args={"title": "Note", "message": "after it"}, after=["s1"])]))
    task = engine.start(wf.id)
    await eventually(lambda: s.outside.notes()["slow one"] == 1, timeout=30,
                     what="the slow delivery at the receiver")
    notify = s.agents["notify"]
    assert notify.kill() == -signal.SIGKILL
    s.outside.webhook.release.set()
    notify.start()

    done = await asyncio.wait_for(task, 120)
    assert done.status == "completed", done
    assert done.steps["s1"].attempts > 1
    assert done.steps["s1"].code == "already_done"  # refused by the new process as a repeat
    assert s.outside.notes() == Counter(["slow one", "after it"])
