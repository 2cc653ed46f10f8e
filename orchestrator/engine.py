"""Runs validated plans step by step, durably.

The workflow is written to KV before and after every step. A step's command carries a
single-use token whose ``jti`` is the step's idempotency key (``<workflow>-<step>``) and
is recorded before the command goes out; after a restart a step found "running" is
sent again with the same jti, and an agent that already ran it refuses the repeat
(``token_replayed``), so its side effect happens at most once. Sensitive steps wait
for a signed human approval; the token is then bound to the approved arguments.

A planner that reads agent output (an LLM, ``Planner.follows_up``) is asked again when a
round of steps has finished, with each step's output as untrusted data; what it
proposes is validated like a first plan and appended as the next round (step ids
``r2-s1`` ...), until it proposes nothing or ``MAX_ROUNDS`` / ``MAX_STEPS`` is reached.
Whatever the output said, the new steps pass the same catalog checks and a sensitive
one still waits for a human.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable

import nats.errors
import nats.js.errors
import structlog
from nats.js.kv import KeyValue

from broker.kv import bucket_keys
from orchestrator.approvals import ApprovalError, ApprovalStore
from orchestrator.dispatch import AgentCaller
from orchestrator.plan import (
    MAX_STEPS,
    Catalog,
    NothingToDo,
    Plan,
    Planner,
    PlanRejected,
    Step,
    validate_plan,
)
from orchestrator.workflows import StepState, Workflow
from protocol.actions import Completed, Failed, Refused
from protocol.explain import Explanation

log = structlog.get_logger("mas.orchestrator")
PREFIX = "wf."
STEP_TIMEOUT_S = 30.0
MAX_ROUNDS = 4
MAX_ATTEMPTS = 3  # sends of one step when the agent does not answer
RETRY_DELAY_S = 1.0  # times the attempt number
# A send nobody received (no responders: the agent is down, e.g. its container restarting
# after a crash) waits this many times longer: safe, nothing ran, and a restart takes
# seconds (SIGKILL to ready again: 5.6 s measured in compose on a loaded 2-core machine).
ABSENT_BACKOFF = 5
Audit = Callable[..., Awaitable[None]]


class Engine:
    def __init__(self, kv: KeyValue, caller: AgentCaller, approvals: ApprovalStore,
                 catalog: Callable[[], Catalog], audit: Audit, *,
                 planner: Planner | None = None) -> None:
        self.kv = kv
        self.planner = planner
        self.caller = caller
        self.approvals = approvals
        self.catalog = catalog
        self.audit = audit
        # a workflow's lock lives while an advance holds or awaits it, then goes (before:
        # one per workflow for the process's life, 1.7 MB per 10,000 workflows)
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = \
            weakref.WeakValueDictionary()
        self._tasks: set[asyncio.Task[Workflow]] = set()

    async def save(self, wf: Workflow) -> None:
        wf.updated_at = time.time()
        await self.kv.put(PREFIX + wf.id, wf.model_dump_json().encode())

    async def load(self, workflow_id: str) -> Workflow | None:
        try:
            entry = await self.kv.get(PREFIX + workflow_id)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        return Workflow.model_validate_json(entry.value or b"")

    async def all(self) -> list[Workflow]:
        found = [await self.load(k.removeprefix(PREFIX))
                 for k in await bucket_keys(self.kv, PREFIX)]
        return sorted((w for w in found if w is not None), key=lambda w: w.created_at)

    async def submit(self, request: str, plan: Plan, *, trace_id: str | None = None) -> Workflow:
        """Validate and record a plan; a rejected plan is recorded and audited too."""
        now = time.time()
        wf = Workflow(id=f"wf-{uuid.uuid4().hex[:12]}", request=request[:2000],
                      planner=plan.planner, plan=plan, trace_id=trace_id,
                      created_at=now, updated_at=now)
        catalog = self.catalog()
        try:
            validate_plan(plan, catalog)
        except PlanRejected as exc:
            wf.status, wf.reason = "rejected", exc.reason
            await self.save(wf)
            await self.audit("workflow", "orchestrator", "plan", "refused", code="plan_rejected",
                             workflow_id=wf.id, trace_id=trace_id, detail={"reason": exc.reason})
            return wf
        for step in plan.steps:
            info = catalog.get(step.agent, step.action)
            wf.steps[step.id] = StepState(sensitive=bool(info and info.sensitive))
        await self.save(wf)
        await self.audit("workflow", "orchestrator", "plan", "ok", workflow_id=wf.id,
                         trace_id=trace_id, detail={"steps": len(plan.steps),
                                                    "planner": plan.planner})
        return wf

    def start(self, workflow_id: str) -> asyncio.Task[Workflow]:
        task = asyncio.create_task(self.advance(workflow_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def advance(self, workflow_id: str) -> Workflow:
        """Run every step that can run now; return when the workflow is finished or waits."""
        lock = self._locks.setdefault(workflow_id, asyncio.Lock())
        async with lock:
            wf = await self.load(workflow_id)
            if wf is None or wf.plan is None:
                raise KeyError(workflow_id)
            if wf.finished:  # rejected, completed or failed: nothing more to run
                return wf
            while True:
                await self._run_ready(wf)
                self._settle(wf)
                if wf.status != "completed" or not await self._follow_up(wf):
                    break
            await self.save(wf)
            if wf.finished:
                await self.audit("workflow", "orchestrator", "finish",
                                 "ok" if wf.status == "completed" else "error",
                                 workflow_id=wf.id, trace_id=wf.trace_id,
                                 detail={"status": wf.status, "rounds": wf.round})
            return wf

    async def _run_ready(self, wf: Workflow) -> None:
        assert wf.plan is not None
        first = True
        while not wf.finished:
            # steps already waiting for a human are looked at once per advance
            ready = [s for s in wf.plan.steps if self._ready(wf, s, waiting=first)]
            first = False
            if not ready:
                break
            before = {sid: st.status for sid, st in wf.steps.items()}
            await asyncio.gather(*(self._run_step(wf, s) for s in ready))
            await self.save(wf)
            if before == {sid: st.status for sid, st in wf.steps.items()}:
                break

    async def _follow_up(self, wf: Workflow) -> bool:
        """Ask the planner that made ``wf`` what to do next, given the steps' output.
        True when a new round of steps was added."""
        planner = self.planner
        if planner is None or not planner.follows_up or wf.planner != planner.name \
                or wf.round >= MAX_ROUNDS or wf.plan is None:
            return False
        reports = [self._report(wf, step) for step in wf.plan.steps]
        catalog = self.catalog()
        try:
            plan = await planner.plan(wf.request, catalog, untrusted=reports)
            steps = validate_plan(plan, catalog)
            merged = self._merged(wf.plan, steps, wf.round + 1)
        except NothingToDo:
            return False
        except PlanRejected as exc:
            wf.status = "failed"
            wf.reason = f"round {wf.round + 1} plan rejected: {exc.reason}"[:500]
            await self.audit("workflow", "orchestrator", "plan", "refused", code=exc.code,
                             workflow_id=wf.id, trace_id=wf.trace_id,
                             detail={"round": wf.round + 1, "reason": exc.reason})
            return False
        wf.round += 1
        wf.plan = merged
        for step in merged.steps[len(merged.steps) - len(steps):]:
            info = catalog.get(step.agent, step.action)
            wf.steps[step.id] = StepState(sensitive=bool(info and info.sensitive))
        wf.status = "running"
        await self.save(wf)
        await self.audit("workflow", "orchestrator", "plan", "ok", workflow_id=wf.id,
                         trace_id=wf.trace_id, detail={"round": wf.round, "steps": len(steps),
                                                       "planner": plan.planner})
        return True

    @staticmethod
    def _report(wf: Workflow, step: Step) -> str:
        """What the planner may read about one step: written by an agent, so untrusted."""
        state = wf.steps[step.id]
        return json.dumps({"step": step.id, "agent": step.agent, "action": step.action,
                           "status": state.status, "output": state.output,
                           "reason": state.reason}, sort_keys=True, ensure_ascii=False)

    @staticmethod
    def _merged(plan: Plan, steps: list[Step], round_no: int) -> Plan:
        if len(plan.steps) + len(steps) > MAX_STEPS:
            raise PlanRejected(f"the workflow would have more than {MAX_STEPS} steps")
        prefix = f"r{round_no}-"
        renamed = [step.model_copy(update={"id": prefix + step.id,
                                           "after": [prefix + a for a in step.after]})
                   for step in steps]
        return plan.model_copy(update={"steps": [*plan.steps, *renamed]})

    @staticmethod
    def _ready(wf: Workflow, step: Step, *, waiting: bool) -> bool:
        state = wf.steps[step.id]
        runnable = ("pending", "running", "waiting_approval") if waiting else ("pending",)
        if state.status not in runnable:
            return False
        return all(wf.steps[d].status == "done" for d in step.after)

    @staticmethod
    def _settle(wf: Workflow) -> None:
        assert wf.plan is not None
        failed = {sid for sid, s in wf.steps.items() if s.status in ("failed", "refused")}
        changed = True
        while changed:  # steps waiting on a failed step will never run
            changed = False
            for step in wf.plan.steps:
                state = wf.steps[step.id]
                if state.status == "pending" and set(step.after) & failed:
                    state.status, state.reason = "skipped", "an earlier step failed"
                    failed.add(step.id)
                    changed = True
        statuses = {s.status for s in wf.steps.values()}
        if statuses <= {"done"}:
            wf.status = "completed"
        elif statuses & {"failed", "refused"} and not statuses & {"pending", "running",
                                                                   "waiting_approval"}:
            wf.status, wf.reason = "failed", next(
                f"step {sid}: {s.code or s.status}" for sid, s in wf.steps.items()
                if s.status in ("failed", "refused"))
        elif "waiting_approval" in statuses:
            wf.status = "waiting_approval"
        else:
            wf.status = "running"

    async def _run_step(self, wf: Workflow, step: Step) -> None:
        state = wf.steps[step.id]
        approval_id = None
        if state.sensitive:
            approval_id = await self._approval_for(wf, step, state)
            if approval_id is None:
                return
        if state.jti is None:
            state.jti = f"{wf.id}-{step.id}"
        while True:
            state.status, state.attempts = "running", state.attempts + 1
            await self.save(wf)  # the jti is durable before the command goes out
            await self.audit("command", step.agent, step.action, "pending", workflow_id=wf.id,
                             trace_id=wf.trace_id, detail={"step": step.id, "jti": state.jti,
                                                           "attempt": state.attempts})
            token, claims = self.caller.mint(step.agent, step.action, dict(step.args),
                                             approval_id=approval_id, jti=state.jti)
            await self.audit("token_issued", step.agent, step.action, "ok", workflow_id=wf.id,
                             trace_id=wf.trace_id,
                             detail={"step": step.id, "jti": claims.jti, "exp": claims.exp,
                                     "single_use": claims.single_use,
                                     "approval_id": claims.approval_id,
                                     "args_sha256": claims.args_sha256})
            try:
                reply = await self.caller.call(step.agent, step.action, dict(step.args),
                                               token=token, timeout=STEP_TIMEOUT_S)
            except Exception as exc:  # broker gone, no responders, timeout: not raised
                if state.attempts < MAX_ATTEMPTS:
                    # Same jti: if the agent did run it and only the reply was lost, it
                    # refuses the repeat (token_replayed) and the step counts as done.
                    await self.audit("command", step.agent, step.action, "error",
                                     code="retrying", workflow_id=wf.id, trace_id=wf.trace_id,
                                     detail={"step": step.id, "attempt": state.attempts,
                                             "error": type(exc).__name__})
                    absent = isinstance(exc, nats.errors.NoRespondersError)
                    await asyncio.sleep(RETRY_DELAY_S * state.attempts
                                        * (ABSENT_BACKOFF if absent else 1))
                    continue
                state.status, state.code = "failed", "unreachable"
                state.reason = (f"{type(exc).__name__}: the agent did not answer "
                                f"({state.attempts} attempts)")
            else:
                self._record_reply(state, reply)
            break
        await self.audit("command", step.agent, step.action, self._outcome(state),
                         code=state.code, workflow_id=wf.id, trace_id=wf.trace_id,
                         detail={"step": step.id, "jti": state.jti})

    @staticmethod
    def _outcome(state: StepState) -> str:
        return {"done": "ok", "refused": "refused"}.get(state.status, "error")

    @staticmethod
    def _record_reply(state: StepState, reply: Completed | Refused | Failed) -> None:
        if isinstance(reply, Completed):
            state.status, state.output = "done", reply.output
        elif isinstance(reply, Refused) and reply.code == "token_replayed" \
                and state.attempts > 1:
            # sent before (a restart or a lost reply) and run then: done once, output lost
            state.status, state.code = "done", "already_done"
            state.reason = "the agent ran this step on an earlier attempt"
        else:
            state.status = "refused" if isinstance(reply, Refused) else "failed"
            state.code, state.reason = reply.code, reply.reason

    async def _approval_for(self, wf: Workflow, step: Step, state: StepState) -> str | None:
        """The approval id once approved (and consumed); None while waiting or refused."""
        if state.approval_id is None:
            explanation = step.explanation or Explanation(
                summary=f"{step.agent}.{step.action} in workflow {wf.id}",
                reason=f"requested: {wf.request[:300]}", confidence=0.5)
            approval = await self.approvals.create(
                agent=step.agent, action=step.action, args=dict(step.args),
                explanation=explanation,
                # an agent's own token request counts against that agent's pending limit
                requested_by=wf.planner if wf.planner.startswith("agent:") else
                f"workflow:{wf.id}",
                workflow_id=wf.id, step_id=step.id, trace_id=wf.trace_id)
            state.approval_id, state.status = approval.id, "waiting_approval"
            await self.audit("approval_requested", step.agent, step.action, "pending",
                             workflow_id=wf.id, trace_id=wf.trace_id,
                             detail={"approval_id": approval.id, "step": step.id})
            return None
        approval = await self.approvals.get(state.approval_id)
        if approval.status == "pending":
            state.status = "waiting_approval"
            return None
        if approval.status == "approved":
            try:
                await self.approvals.consume(approval.id, f"{wf.id}-{step.id}")
            except ApprovalError as exc:
                state.status, state.code, state.reason = "refused", exc.code, exc.reason
                return None
            return approval.id
        if approval.status == "used" and approval.token_jti == f"{wf.id}-{step.id}":
            return approval.id  # consumed by us before a restart: resend, the agent dedupes
        state.status, state.code = "refused", f"approval_{approval.status}"
        reason = approval.decision.reason if approval.decision else ""
        state.reason = f"approval {approval.status}{': ' + reason if reason else ''}"[:500]
        return None

    async def resume_all(self) -> list[str]:
        """After a restart: carry on with every workflow that was not finished."""
        resumed = [wf.id for wf in await self.all() if wf.status == "running"
                   or wf.status == "waiting_approval"]
        for workflow_id in resumed:
            self.start(workflow_id)
        return resumed

    async def on_decision(self, workflow_id: str) -> None:
        self.start(workflow_id)
