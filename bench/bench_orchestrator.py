"""What the orchestrator costs: workflows per second, token issuance, approval round trip.

Run from the project root::

    python -m bench.bench_orchestrator [--quick] [--out FILE.md]

One process runs a real nats-server (mutual TLS, nkeys, the compiled deny-by-default
config from a throwaway copy of ``policy.yaml`` on free loopback ports), the real
``Orchestrator`` with the ``OfflinePlanner`` reading two workflow files written for the
run, three real agents (aggregator, anomaly, notify; notify delivers to a webhook served
on 127.0.0.1 by this process) and the operator's connection. Everything is stopped and
the temp folder removed at the end, also on error or Ctrl-C. See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.signing

from agents.aggregator import agent as aggregator
from agents.anomaly import agent as anomaly
from agents.notify import agent as notify
from agents.runtime.service import AgentService
from bench import common
from bench.common import Result, load_average, log, machine_info, ops_per_second, percentile
from bench.throwaway import Broker
from broker import connection
from broker import subjects as subj
from broker.connection import BrokerClient
from broker.secrets import load_identity
from orchestrator.dispatch import AgentCaller
from orchestrator.planners import OfflinePlanner
from orchestrator.service import Orchestrator, WorkflowList
from protocol import admin
from protocol.actions import Completed
from protocol.approvals import AdminError, ApprovalList, ApprovalQuery
from security.decisions import sign_decision
from security.tokens import TokenIssuer

REPORT = "bench-report"  # three agents: digest and alerts in parallel, then notify the owner
MESSAGE = "bench-message"  # one sensitive step: notify.send_message, waits for a human
WORKFLOWS = {
    REPORT: """\
name: bench-report
description: Today's digest and recent alerts, then a note to the owner.
triggers:
  - manual: true
steps:
  - id: digest
    agent: aggregator
    action: daily_digest
  - id: alerts
    agent: anomaly
    action: recent_alerts
    args: {limit: 5}
  - id: tell
    agent: notify
    action: notify_owner
    after: [digest, alerts]
    args: {title: Daily report, message: The digest and the alerts are ready., priority: low}
""",
    MESSAGE: """\
name: bench-message
description: Tell Bob something; sensitive, so it waits for the operator.
triggers:
  - manual: true
steps:
  - id: send
    agent: notify
    action: send_message
    args: {to: bob, title: Benchmark, message: Round trip through the approval workflow.}
""",
}
FINISHED = ("completed", "failed", "rejected")
TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Settings:
    micro_seconds: float
    micro_rounds: int
    rounds: int
    warmup: int  # workflows before measuring
    n_seq: int  # workflows per round, one at a time
    n_conc: int  # workflows per round at each concurrency level
    levels: tuple[int, ...]
    approvals: int  # approval round trips (one at a time)


FULL = Settings(micro_seconds=1.0, micro_rounds=3, rounds=3, warmup=30, n_seq=60, n_conc=120,
                levels=(8, 32), approvals=40)
QUICK = Settings(micro_seconds=0.2, micro_rounds=3, rounds=2, warmup=10, n_seq=15, n_conc=40,
                 levels=(8,), approvals=10)


# --------------------------------------------------------------------------- outside world


class Webhook:
    """The notify agent's delivery target: a minimal HTTP/1.1 server on 127.0.0.1 in this
    event loop that answers 204 to every POST and counts them."""

    def __init__(self) -> None:
        self.received = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                self.received += 1
                writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


# --------------------------------------------------------------------------- platform


class Tracker:
    """Workflow states as the operator sees them: one KV watch on every ``wf.*`` key of
    the workflows bucket, so waiting for a workflow costs no polling."""

    def __init__(self) -> None:
        self.status: dict[str, str] = {}
        self.waiters: dict[str, asyncio.Future[str]] = {}
        self.task: asyncio.Task[None] | None = None

    async def start(self, operator: BrokerClient) -> None:
        kv = await operator.nc.jetstream(timeout=10).key_value(subj.WORKFLOWS_BUCKET)
        watcher = await kv.watch("wf.>")
        self.task = asyncio.create_task(self._follow(watcher))

    async def _follow(self, watcher: Any) -> None:
        async for entry in watcher:
            if entry is None or not entry.value:
                continue
            workflow_id = entry.key.removeprefix("wf.")
            status = json.loads(entry.value)["status"]
            self.status[workflow_id] = status
            waiter = self.waiters.get(workflow_id)
            if status in FINISHED and waiter is not None and not waiter.done():
                waiter.set_result(status)

    async def finished(self, workflow_id: str) -> str:
        status = self.status.get(workflow_id)
        if status in FINISHED:
            return status
        waiter = self.waiters.setdefault(workflow_id, asyncio.get_running_loop().create_future())
        try:
            return await asyncio.wait_for(waiter, TIMEOUT_S)
        finally:
            self.waiters.pop(workflow_id, None)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


@dataclass
class Platform:
    broker: Broker
    orch: Orchestrator
    agents: list[AgentService]
    operator: BrokerClient
    direct: AgentCaller  # the orchestrator's identity on a second connection: the baseline
    direct_client: BrokerClient
    tracker: Tracker
    webhook: Webhook

    async def ask(self, subject: str, payload: Any, answer: type[Any]) -> Any:
        reply = await self.operator.request(subject, payload, timeout=TIMEOUT_S)
        if reply.sender != "orchestrator":
            raise RuntimeError(f"answer signed by {reply.sender}")
        with contextlib.suppress(ValueError):
            error = AdminError.model_validate_json(reply.data)
            raise RuntimeError(f"{subject} refused: {error.code}: {error.reason}")
        return answer.model_validate_json(reply.data)

    async def start_workflow(self, name: str) -> str:
        result = await self.ask(admin.WORKFLOWS_RUN, admin.WorkflowRunRequest(request=name),
                                WorkflowList)
        [wf] = result.workflows
        if wf.status == "rejected":
            raise RuntimeError(f"{name} rejected: {wf.reason}")
        return str(wf.id)


async def start_platform(broker: Broker, workflows_dir: Path) -> Platform:
    webhook = Webhook()
    hook_url = await webhook.start()
    policy = broker.project.policy()
    secrets = broker.secrets
    orch = Orchestrator(policy, load_identity(secrets, "orchestrator"), broker.url,
                        planner=OfflinePlanner(workflows_dir))
    await orch.start()
    contacts = json.dumps({"bob": {"kind": "webhook", "url": f"{hook_url}/bob"}})
    agents = [
        AgentService(aggregator.agent, load_identity(secrets, "aggregator"), broker.url),
        AgentService(anomaly.agent, load_identity(secrets, "anomaly"), broker.url),
        AgentService(notify.agent, load_identity(secrets, "notify"), broker.url,
                     settings={"webhook_url": f"{hook_url}/owner", "contacts": contacts}),
    ]
    for service in agents:
        await service.start()
    deadline = time.monotonic() + TIMEOUT_S
    while not all(s.registration is not None for s in agents):
        if time.monotonic() > deadline:
            raise RuntimeError("the agents did not register with the orchestrator")
        await asyncio.sleep(0.02)
    operator = await connection.connect(load_identity(secrets, "operator"), broker.url,
                                        max_reconnect_attempts=0)
    direct_client = await connection.connect(load_identity(secrets, "orchestrator"), broker.url,
                                             max_reconnect_attempts=0, name="bench-direct")
    direct = AgentCaller(direct_client, TokenIssuer("orchestrator",
                                                    direct_client.material.signing_key))
    tracker = Tracker()
    await tracker.start(operator)
    return Platform(broker, orch, agents, operator, direct, direct_client, tracker, webhook)


async def stop_platform(p: Platform) -> None:
    await p.tracker.stop()
    for client in (p.operator, p.direct_client):
        client.closing = True
        if not client.nc.is_closed:
            await client.nc.close()
    for service in reversed(p.agents):
        await service.stop()
    await p.orch.stop()
    await p.webhook.close()


# --------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class Run:
    p50_ms: float
    p90_ms: float
    per_s: float


async def measure(op: Callable[[], Awaitable[None]], n: int, inflight: int) -> Run:
    latencies: list[float] = []
    sem = asyncio.Semaphore(inflight)
    clock = time.perf_counter

    async def one() -> None:
        async with sem:
            t0 = clock()
            await op()
            latencies.append(clock() - t0)

    gc.collect()
    start = clock()
    await asyncio.gather(*(one() for _ in range(n)))
    wall = clock() - start
    latencies.sort()
    return Run(percentile(latencies, 0.5) * 1000, percentile(latencies, 0.9) * 1000, n / wall)


def median_run(runs: list[Run]) -> Run:
    return Run(statistics.median(r.p50_ms for r in runs),
               statistics.median(r.p90_ms for r in runs),
               statistics.median(r.per_s for r in runs))


async def one_workflow(p: Platform) -> None:
    workflow_id = await p.start_workflow(REPORT)
    status = await p.tracker.finished(workflow_id)
    if status != "completed":
        wf = await p.orch.engine.load(workflow_id)
        raise RuntimeError(f"{workflow_id} {status}: {wf.reason if wf else '?'} "
                           f"{wf.steps if wf else ''}")


async def one_direct(p: Platform) -> None:
    """The same three commands without planner, engine, KV or audit: a fresh token per
    command, digest and alerts in parallel, then the note."""
    digest, alerts = await asyncio.gather(
        p.direct.call("aggregator", "daily_digest", {}, timeout=TIMEOUT_S),
        p.direct.call("anomaly", "recent_alerts", {"limit": 5}, timeout=TIMEOUT_S))
    note = await p.direct.call("notify", "notify_owner",
                               {"title": "Daily report", "priority": "low",
                                "message": "The digest and the alerts are ready."},
                               timeout=TIMEOUT_S)
    for reply in (digest, alerts, note):
        if not isinstance(reply, Completed):
            raise RuntimeError(f"direct command refused or failed: {reply}")


MODES = ("engine", "direct")


async def workflows(p: Platform, s: Settings) -> dict[tuple[int, str], Run]:
    ops = {"engine": lambda: one_workflow(p), "direct": lambda: one_direct(p)}
    levels = (1, *s.levels)
    log(f"warm-up: {s.warmup} workflows and as many direct runs")
    for mode in MODES:
        await measure(ops[mode], s.warmup, 8)
    runs: dict[tuple[int, str], list[Run]] = {(c, m): [] for c in levels for m in MODES}
    for rnd in range(s.rounds):
        order = MODES if rnd % 2 == 0 else MODES[::-1]
        for inflight in levels:
            n = s.n_seq if inflight == 1 else s.n_conc
            for mode in order:
                run = await measure(ops[mode], n, inflight)
                runs[(inflight, mode)].append(run)
                log(f"round {rnd + 1}/{s.rounds} {mode:6} x{inflight:<2} n={n}: "
                    f"p50 {run.p50_ms:.1f} ms, p90 {run.p90_ms:.1f} ms, {run.per_s:,.1f}/s")
    return {key: median_run(value) for key, value in runs.items()}


@dataclass(frozen=True)
class RoundTrip:
    to_pending: float  # request -> the approval is pending (workflow waiting for a human)
    show: float  # the operator reads the approval (args hash)
    decide: float  # sign the decision, send it, the orchestrator verifies and answers
    to_done: float  # approved -> the step ran and the workflow is completed

    @property
    def total(self) -> float:
        return self.to_pending + self.show + self.decide + self.to_done


async def one_round_trip(p: Platform) -> RoundTrip:
    clock = time.perf_counter
    key = p.operator.material.signing_key
    t0 = clock()
    result = await p.ask(admin.WORKFLOWS_RUN,
                         admin.WorkflowRunRequest(request=MESSAGE, wait_s=TIMEOUT_S),
                         WorkflowList)
    [wf] = result.workflows
    approval_id = wf.steps["send"].approval_id
    if wf.status != "waiting_approval" or approval_id is None:
        raise RuntimeError(f"{wf.id} is {wf.status}, not waiting for approval")
    t1 = clock()
    [approval] = (await p.ask(admin.APPROVALS_LIST, ApprovalQuery(id=approval_id),
                              ApprovalList)).approvals
    t2 = clock()
    signed = sign_decision(key, approval_id=approval.id, args_sha256=approval.args_sha256,
                           decision="approve", reason="benchmark", by="operator")
    [decided] = (await p.ask(admin.APPROVALS_DECIDE, signed, ApprovalList)).approvals
    if decided.status != "approved":
        raise RuntimeError(f"{approval.id} is {decided.status} after approving")
    t3 = clock()
    status = await p.tracker.finished(wf.id)
    t4 = clock()
    if status != "completed":
        raise RuntimeError(f"{wf.id} {status} after approval")
    return RoundTrip(t1 - t0, t2 - t1, t3 - t2, t4 - t3)


async def approvals(p: Platform, s: Settings) -> list[RoundTrip]:
    for _ in range(max(2, s.approvals // 5)):  # warm-up
        await one_round_trip(p)
    trips = []
    for i in range(s.approvals):
        trips.append(await one_round_trip(p))
        if (i + 1) % 10 == 0 or i + 1 == s.approvals:
            log(f"approval round trips: {i + 1}/{s.approvals}, last "
                f"{trips[-1].total * 1000:.1f} ms")
    return trips


# --------------------------------------------------------------------------- tokens


@dataclass(frozen=True)
class Micro:
    name: str
    ops: float


def token_benchmarks(broker: Broker, s: Settings) -> list[Micro]:
    material = load_identity(broker.secrets, "orchestrator")
    issuer = TokenIssuer("orchestrator", material.signing_key)
    caller = AgentCaller(None, issuer)  # type: ignore[arg-type]  # mint() never sends
    args = {"to": "bob", "title": "Benchmark", "message": "Round trip through the approval."}
    token, _ = issuer.issue(audience="notify", actions=("notify_owner",),
                            subjects=(subj.command("notify", "notify_owner"),))
    signing_input = token.rsplit(".", 1)[0].encode()
    raw = nacl.signing.SigningKey.generate()

    rows: list[tuple[str, Callable[[], object]]] = [
        ("TokenIssuer.issue (one action, one subject)",
         lambda: issuer.issue(audience="notify", actions=("notify_owner",),
                              subjects=(subj.command("notify", "notify_owner"),))),
        ("AgentCaller.mint, sensitive step (args hash, approval id, single use)",
         lambda: caller.mint("notify", "send_message", args, approval_id="ap-0123456789abcdef",
                             jti="wf-0123456789ab-send")),
        ("baseline: SigningKey.sign of the same token bytes",
         lambda: material.signing_key.sign(signing_input)),
        ("baseline: PyNaCl SigningKey.sign of the same bytes", lambda: raw.sign(signing_input)),
    ]
    results = []
    for name, fn in rows:
        fn()
        results.append(Micro(name, ops_per_second(fn, s.micro_seconds, s.micro_rounds)))
        log(f"{name}: {results[-1].ops:,.0f}/s")
    return results


# --------------------------------------------------------------------------- report


def ms(seconds: list[float], q: float) -> float:
    return percentile(sorted(seconds), q) * 1000


def report(info: list[str], s: Settings, quick: bool, tokens: list[Micro],
           flows: dict[tuple[int, str], Run], trips: list[RoundTrip], webhook_posts: int,
           elapsed: float) -> Result:
    lines = ["# Orchestrator benchmark", "", *info,
             f"- Mode: {'quick' if quick else 'full'}; workflows: {s.rounds} rounds (engine and "
             f"direct alternating), n={s.n_seq} one at a time, n={s.n_conc} at "
             f"{', '.join(map(str, s.levels))} in flight; {s.approvals} approval round trips",
             "- Broker, orchestrator, the three agents, the webhook and the operator share one "
             "Python process and event loop (one core's budget)", "",
             "## Workflows through the offline planner (three agents)", "",
             f"`{REPORT}`: aggregator.daily_digest and anomaly.recent_alerts in parallel, then "
             "notify.notify_owner (delivered to a loopback webhook). **engine**: the operator "
             "asks `mas.admin.workflows.run`; planner, plan validation, durable state in KV, a "
             "single-use token per step, audit records; done when the operator's KV watch sees "
             "`completed`. **direct**: the same three commands sent straight to the agents with "
             "a fresh token each, nothing recorded.", "",
             "| In flight | Mode | p50 ms | p90 ms | workflows/s |", "|---:|---|---:|---:|---:|"]
    for inflight in sorted({k[0] for k in flows}):
        engine, direct = flows[(inflight, "engine")], flows[(inflight, "direct")]
        for mode, run in (("engine", engine), ("direct", direct)):
            lines.append(f"| {inflight} | {mode} | {run.p50_ms:.1f} | {run.p90_ms:.1f} | "
                         f"{run.per_s:,.1f} |")
        lines.append(f"| {inflight} | **engine / direct** | "
                     f"**{engine.p50_ms / direct.p50_ms:.2f}x** | "
                     f"{engine.p90_ms / direct.p90_ms:.2f}x | "
                     f"**{engine.per_s / direct.per_s:.2f}x** |")
    base = tokens[2].ops
    lines += ["", "## Token issuance (single thread, median of "
              f"{s.micro_rounds} x {s.micro_seconds:g} s)", "",
              "| Operation | ops/s | µs/op | time / raw sign |", "|---|---:|---:|---:|"]
    for m in tokens:
        lines.append(f"| {m.name} | {m.ops:,.0f} | {1e6 / m.ops:.1f} | {base / m.ops:.2f}x |")
    totals = [t.total for t in trips]
    lines += ["", "## Approval round trip, without the human", "",
              f"`{MESSAGE}` (notify.send_message, sensitive), one at a time; the operator's "
              "side is code, so no human time is in it.", "",
              "| Phase | p50 ms | p90 ms |", "|---|---:|---:|"]
    for label, values in (
        ("request -> approval pending (plan, approval stored, workflow waiting)",
         [t.to_pending for t in trips]),
        ("operator reads the approval (`approvals.list id`)", [t.show for t in trips]),
        ("sign decision -> orchestrator verified and stored it", [t.decide for t in trips]),
        ("approved -> bound single-use token, step ran, workflow completed",
         [t.to_done for t in trips]),
        ("**total**", totals),
    ):
        lines.append(f"| {label} | {ms(values, 0.5):.1f} | {ms(values, 0.9):.1f} |")
    lines += ["", f"Webhook deliveries seen: {webhook_posts:,}. Total run time: {elapsed:.1f} s",
              ""]
    return Result("\n".join(lines))


# --------------------------------------------------------------------------- main


async def amain(args: argparse.Namespace) -> Result:
    s = QUICK if args.quick else FULL
    started = time.perf_counter()
    info = [*machine_info(), f"- Load average (1, 5, 15 min) at start: {load_average()}"]
    broker = Broker()
    try:
        log(f"starting nats-server in {broker.tmp}")
        broker.start()
        workflows_dir = broker.tmp / "workflows"
        workflows_dir.mkdir()
        for name, text in WORKFLOWS.items():
            (workflows_dir / f"{name}.yaml").write_text(text)
        tokens = token_benchmarks(broker, s)
        p = await start_platform(broker, workflows_dir)
        log("orchestrator and agents (aggregator, anomaly, notify) ready")
        try:
            flows = await workflows(p, s)
            trips = await approvals(p, s)
            posts = p.webhook.received
        finally:
            await stop_platform(p)
    finally:
        broker.close()
    info.append(f"- Load average at the end: {load_average()} (other work on the machine "
                "skews absolute numbers; compare the ratios)")
    return report(info, s, args.quick, tokens, flows, trips, posts, time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    args = common.parser("bench.bench_orchestrator", __doc__,
                         quick="short run (under a minute)").parse_args(argv)
    return common.run(args, lambda: amain(args))


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
