"""The orchestrator process: registry, token requests, approvals, workflows, audit.

Every endpoint parses its request into a pydantic model and answers a refusal with
``AdminError`` (code and one-line reason) instead of crashing or going silent. Admin
endpoints answer only the operator; registrations and token requests only the agent
they concern.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import structlog
from nats.aio.msg import Msg
from pydantic import BaseModel, ValidationError

from broker import subjects as subj
from broker.connection import MessageTooLarge, SignedMessage, connect
from broker.discovery import Discovery, EndpointSpec, package_version
from broker.kv import bucket_keys
from broker.policy import Policy
from broker.revocations import RevocationAuthority
from broker.secrets import IdentityMaterial
from orchestrator import checkpoint
from orchestrator.approvals import ApprovalError, ApprovalStore
from orchestrator.audit import AuditLog, open_readers
from orchestrator.dispatch import AgentCaller
from orchestrator.engine import Engine
from orchestrator.errors import Refusal
from orchestrator.feeds import FeedRecorder
from orchestrator.plan import Plan, Planner, PlanRejected, Step
from orchestrator.planners.offline import OfflinePlanner
from orchestrator.planners.workflow_files import Workflow as WorkflowFile
from orchestrator.registry import Registry
from orchestrator.triggers import EVENTS, Library, Triggers
from orchestrator.violations import BrokerLogWatcher
from orchestrator.workflows import Workflow
from protocol import admin
from protocol.approvals import AdminError, ApprovalList, ApprovalQuery
from protocol.registry import Registration
from protocol.tokens import TokenRequest, TokenRequestReply
from security.decisions import ApprovalDecision
from security.errors import EnvelopeError
from security.revocation import Revocation
from security.tokens import TokenIssuer

log = structlog.get_logger("mas.orchestrator")
OPERATOR = "operator"
SWEEP_S = 2.0
READY_EVERY_S = 5.0
MAX_TOKEN_REQUEST_BYTES = 16 * 1024
MAX_PENDING_PER_AGENT = 4  # token requests of one agent waiting for the operator at once
LIST_BUDGET_BYTES = 512 * 1024  # of a list answer (the broker's max_payload is 1 MiB)
M = TypeVar("M", bound=BaseModel)


class WorkflowList(BaseModel):
    workflows: list[Workflow]
    omitted: int = 0  # left out to keep the answer within one message; ask by id


def within_budget(items: list[M], budget: int = LIST_BUDGET_BYTES) -> tuple[list[M], int]:
    """The newest ``items`` (the list is oldest first) whose JSON fits ``budget`` bytes,
    still oldest first, and how many were left out: a list answer is one NATS message,
    and a flood of big entries must not make the whole list unanswerable."""
    kept: list[M] = []
    used = 0
    for item in reversed(items):
        used += len(item.model_dump_json()) + 1
        if used > budget:
            break
        kept.append(item)
    return kept[::-1], len(items) - len(kept)


class Orchestrator:
    def __init__(self, policy: Policy, material: IdentityMaterial, url: str, *,
                 planner: Planner | None = None, approval_ttl_s: int = 15 * 60,
                 library: Library | None = None, ready_file: Path | None = None) -> None:
        self.policy = policy
        self.material = material
        self.url = url
        self.planner = planner
        # the workflow files whose event and schedule triggers start workflows by themselves
        self.library = library if library is not None else (
            planner if isinstance(planner, OfflinePlanner) else None)
        self.approval_ttl_s = approval_ttl_s
        self.ready_file = ready_file
        self.registry = Registry(policy)
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self.client = client = await connect(self.material, self.url, name="orchestrator")
        js = client.nc.jetstream(timeout=5)
        self.audit_log = await AuditLog(client, self.material.signing_key,
                                        checkpoint_file=checkpoint.default_file()).open()
        await open_readers(js, sorted(a for a, spec in self.policy.agents.items()
                                      if "audit" in spec.read_streams))
        self.broker_log = await BrokerLogWatcher.start(self.audit_log, self.material)
        self.revocations = await RevocationAuthority.start(client)
        approvals_kv = await js.create_key_value(bucket=subj.APPROVALS_BUCKET, history=5)
        workflows_kv = await js.create_key_value(bucket=subj.WORKFLOWS_BUCKET, history=5)
        self.approvals = ApprovalStore(approvals_kv, self.material.trust.approver_ring(),
                                       ttl_s=self.approval_ttl_s)
        self.issuer = TokenIssuer("orchestrator", self.material.signing_key)
        self.caller = AgentCaller(client, self.issuer)
        self.engine = Engine(workflows_kv, self.caller, self.approvals, self.registry.catalog,
                             self.audit_log.record, planner=self.planner)
        self.workflows_kv = workflows_kv
        await self._load_registrations()
        endpoints: dict[str, Callable[[SignedMessage], Awaitable[BaseModel]]] = {
            subj.REGISTER: self._register,
            subj.TOKEN_REQUEST: self._token_request,
            admin.APPROVALS_LIST: self._approvals_list,
            admin.APPROVALS_DECIDE: self._approvals_decide,
            admin.REVOKE: self._revoke,
            admin.WORKFLOWS_RUN: self._workflows_run,
            admin.WORKFLOWS_LIST: self._workflows_list,
        }
        self.discovery = Discovery(  # $SRV.* answers (nats.micro); commands stay verified here
            client.nc, "orchestrator", package_version(),
            self.policy.services.orchestrator.description,
            [EndpointSpec("_".join(s.split(".")[2:]), s, "orchestrator") for s in endpoints])
        for subject, handler in endpoints.items():
            await client.subscribe(subject, self.discovery.counted(
                subject, self._endpoint(subject, handler)), queue="orchestrator",
                                   on_refused=self._bad_envelope)
        await self.discovery.start()
        self.feeds = feeds = FeedRecorder(self.audit_log.record)
        for subject in feeds.subjects:
            if self.library is not None and subj.within(subject, EVENTS):
                # _on_event hands it over: a second subscription on this connection would
                # take each message's envelope nonce for a replay, or, sharing the queue
                # group, NATS would give each message to only one of the two
                continue
            await client.subscribe(subject, feeds.on_message, queue="orchestrator")
        if self.library is not None:
            self.triggers = Triggers(self.library, self._launch, self.engine.load)
            await client.subscribe(EVENTS, self._on_event, queue="orchestrator")
            self._tasks.append(asyncio.create_task(self.triggers.run_schedule()))
        await client.sync()
        resumed = await self.engine.resume_all()
        client.reconnect_hooks.append(self._resume_after_reconnect)
        self._tasks.append(asyncio.create_task(self._sweep_loop()))
        await self.audit_log.record("system", "orchestrator", "start", "info",
                                    detail={"resumed": resumed})
        if self.ready_file is not None:
            self._tasks.append(asyncio.create_task(self._keep_ready(self.ready_file)))
        log.info("orchestrator.ready", resumed=resumed)

    async def _keep_ready(self, path: Path) -> None:
        """Touch ``path`` while the broker connection is up (a healthcheck reads its age)."""
        while True:
            if self.client.nc.is_connected:
                with contextlib.suppress(OSError):
                    await asyncio.to_thread(path.touch)
            await asyncio.sleep(READY_EVERY_S)

    async def _resume_after_reconnect(self) -> None:
        """A broker outage can end a workflow's advance half way (its writes failed while
        the broker was gone): pick up every unfinished one again, as after a restart.
        Advances of one workflow take turns, so one still under way is not doubled."""
        self._tasks.append(asyncio.create_task(self._resume_soon()))

    async def _resume_soon(self) -> None:
        for delay in (0.0, 1.0, 2.0, 4.0, 8.0):  # JetStream may need a moment after a restart
            await asyncio.sleep(delay)
            try:
                resumed = await self.engine.resume_all()
            except Exception as exc:
                log.warning("orchestrator.resume_failed", error=type(exc).__name__)
                continue
            log.info("orchestrator.resumed_after_reconnect", resumed=resumed)
            return

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.broker_log is not None:
            await self.broker_log.stop()
        await self.audit_log.close()
        with contextlib.suppress(Exception):
            await self.discovery.stop()
        await self.client.close()
        if self.ready_file is not None:
            self.ready_file.unlink(missing_ok=True)

    def _endpoint(self, subject: str,
                  handler: Callable[[SignedMessage], Awaitable[BaseModel]]
                  ) -> Callable[[SignedMessage], Awaitable[None]]:
        async def serve(msg: SignedMessage) -> None:
            try:
                answer = await handler(msg)
            except Refusal as exc:  # ApprovalError included
                answer = AdminError(code=exc.code, reason=exc.reason[:500])
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(map(str, first["loc"])) or "request"
                answer = AdminError(code="invalid_request", reason=f"{where}: {first['msg']}"[:500])
            except Exception as exc:
                log.exception("orchestrator.endpoint_failed", subject=subject)
                answer = AdminError(code="internal", reason=f"{type(exc).__name__}; see the "
                                    "orchestrator's log")
            if isinstance(answer, AdminError):
                log.warning("orchestrator.refused", subject=subject, sender=msg.sender,
                            code=answer.code)
            if msg.reply:
                with contextlib.suppress(Exception):
                    try:
                        await self.client.respond(msg, answer)
                    except MessageTooLarge as exc:  # say so rather than leave it to time out
                        log.warning("orchestrator.answer_too_large", subject=subject)
                        await self.client.respond(msg, AdminError(
                            code="answer_too_large", reason=f"{exc}; ask for less (one id)"[:500]))
        return serve

    async def _bad_envelope(self, msg: Msg, error: EnvelopeError) -> None:
        """Name the failed envelope check instead of leaving the requester to time out
        (only to the operator's inbox or a response subject the server mapped)."""
        await self.client.answer_unverified(
            msg, AdminError(code=error.code, reason=str(error)[:500]), commander=OPERATOR)

    @staticmethod
    def _operator_only(msg: SignedMessage) -> None:
        if msg.sender != OPERATOR:
            raise Refusal("not_operator", f"only the operator may use {msg.subject}")

    async def _load_registrations(self) -> None:
        for key in await bucket_keys(self.workflows_kv, "registry."):
            if key.startswith("registry."):
                entry = await self.workflows_kv.get(key)
                with contextlib.suppress(ValidationError):
                    announcement = Registration.model_validate_json(entry.value or b"")
                    self.registry.register(announcement.agent, announcement)

    async def _register(self, msg: SignedMessage) -> BaseModel:
        announcement = Registration.model_validate_json(msg.data)
        ack = self.registry.register(msg.sender, announcement)
        if ack.accepted:
            await self.workflows_kv.put(f"registry.{announcement.agent}", msg.data)
        await self.audit_log.record(
            "registration", msg.sender, "register", "refused" if ack.rejected else "ok",
            trace_id=msg.trace_id, detail={"accepted": list(ack.accepted),
                                           "rejected": dict(ack.rejected)})
        return ack

    async def _token_request(self, msg: SignedMessage) -> BaseModel:
        """An agent asks for a sensitive action: it becomes a one-step workflow that
        waits for the operator, and the answer names the approval."""
        if len(msg.data) > MAX_TOKEN_REQUEST_BYTES:  # it is stored, listed and shown to a human
            raise Refusal("too_large", f"a token request may be {MAX_TOKEN_REQUEST_BYTES} bytes")
        request = TokenRequest.model_validate_json(msg.data)
        if request.agent != msg.sender:
            raise Refusal("wrong_sender", f"{msg.sender} cannot ask in {request.agent}'s name")
        info = self.registry.catalog().get(request.action_agent, request.action)
        await self.audit_log.record("token_request", msg.sender, request.action, "pending",
                                    trace_id=msg.trace_id,
                                    detail={"target": request.action_agent,
                                            "summary": request.explanation.summary})
        if info is None:
            return TokenRequestReply(status="denied", reason="no such registered action")
        if not info.sensitive:
            return TokenRequestReply(status="denied", reason="not a sensitive action; "
                                     "propose it in a reply instead")
        waiting = [a for a in await self.approvals.find("pending")
                   if a.requested_by == f"agent:{msg.sender}"]
        if len(waiting) >= MAX_PENDING_PER_AGENT:  # one agent cannot bury the operator
            await self.audit_log.record("token_request", msg.sender, request.action, "refused",
                                        code="too_many_pending", trace_id=msg.trace_id)
            return TokenRequestReply(status="denied", reason=f"{len(waiting)} earlier requests "
                                     "still wait for the operator; ask again once answered")
        plan = Plan(summary=request.explanation.summary, planner=f"agent:{msg.sender}", steps=[
            Step(id="s1", agent=request.action_agent, action=request.action, args=request.args,
                 explanation=request.explanation)])
        wf = await self.engine.submit(f"{msg.sender} asks: {request.explanation.summary}", plan,
                                      trace_id=msg.trace_id)
        if wf.status == "rejected":
            return TokenRequestReply(status="denied", reason=wf.reason)
        wf = await self.engine.advance(wf.id)
        return TokenRequestReply(status="pending", approval_id=wf.steps["s1"].approval_id)

    async def _approvals_list(self, msg: SignedMessage) -> BaseModel:
        self._operator_only(msg)
        query = ApprovalQuery.model_validate_json(msg.data or b"{}")
        if query.id is not None:
            return ApprovalList(approvals=[await self.approvals.get(query.id)])
        approvals, omitted = within_budget(await self.approvals.find(query.status))
        return ApprovalList(approvals=approvals, omitted=omitted)

    async def _approvals_decide(self, msg: SignedMessage) -> BaseModel:
        self._operator_only(msg)
        decision = ApprovalDecision.model_validate_json(msg.data)
        try:
            approval = await self.approvals.decide(decision)
        except ApprovalError as exc:
            await self.audit_log.record("approval_decided", msg.sender, decision.approval_id,
                                        "refused", code=exc.code, trace_id=msg.trace_id)
            raise
        await self.audit_log.record(
            "approval_decided", decision.by, approval.id,
            "approved" if approval.status == "approved" else "denied", trace_id=msg.trace_id,
            workflow_id=approval.workflow_id,
            detail={"agent": approval.agent, "action": approval.action,
                    "reason": decision.reason, "args_sha256": approval.args_sha256})
        if approval.workflow_id:
            self.engine.start(approval.workflow_id)
        return ApprovalList(approvals=[approval])

    async def _revoke(self, msg: SignedMessage) -> BaseModel:
        self._operator_only(msg)
        request = admin.RevokeRequest.model_validate_json(msg.data)
        if request.lift:
            await self.revocations.lift(request.kind, request.target)
        else:
            now = int(time.time())
            await self.revocations.revoke(Revocation(
                kind=request.kind, target=request.target, revoked_at=now,
                expires_at=now + 900 if request.kind == "jti" else None,
                reason=request.reason, by=msg.sender))
        await self.audit_log.record("revocation", msg.sender, request.kind,
                                    "info" if request.lift else "ok", trace_id=msg.trace_id,
                                    detail={"target": request.target, "lift": request.lift,
                                            "reason": request.reason})
        return admin.Ok(detail=f"{'lifted' if request.lift else 'revoked'} "
                        f"{request.kind} {request.target}")

    async def _workflows_run(self, msg: SignedMessage) -> BaseModel:
        self._operator_only(msg)
        request = admin.WorkflowRunRequest.model_validate_json(msg.data)
        if self.planner is None:
            raise Refusal("no_planner", "no planner is configured")
        try:
            plan = await self.planner.plan(request.request, self.registry.catalog())
        except PlanRejected as exc:  # PlannerUnavailable included, with its own code
            await self.audit_log.record("workflow", msg.sender, "plan", "refused",
                                        code=exc.code, trace_id=msg.trace_id,
                                        detail={"reason": exc.reason})
            raise Refusal(exc.code, exc.reason) from exc
        wf = await self.engine.submit(request.request, plan, trace_id=msg.trace_id)
        if wf.status != "rejected":
            task = self.engine.start(wf.id)
            if request.wait_s:
                with contextlib.suppress(TimeoutError):
                    wf = await asyncio.wait_for(asyncio.shield(task), request.wait_s)
        return WorkflowList(workflows=[wf])

    async def _workflows_list(self, msg: SignedMessage) -> BaseModel:
        self._operator_only(msg)
        query = admin.WorkflowQuery.model_validate_json(msg.data or b"{}")
        if query.id is not None:
            wf = await self.engine.load(query.id)
            if wf is None:
                raise Refusal("unknown_workflow", f"no workflow {query.id}")
            return WorkflowList(workflows=[wf])
        workflows, omitted = within_budget((await self.engine.all())[-50:])
        return WorkflowList(workflows=workflows, omitted=omitted)

    async def _launch(self, file: WorkflowFile, cause: str, trace_id: str | None) -> Workflow:
        wf = await self.engine.submit(f"{cause}: {file.name}", file.plan(), trace_id=trace_id)
        await self.audit_log.record("workflow", "orchestrator", "trigger",
                                    "refused" if wf.status == "rejected" else "ok",
                                    workflow_id=wf.id, trace_id=trace_id,
                                    detail={"workflow": file.name, "cause": cause})
        if wf.status != "rejected":
            self.engine.start(wf.id)
        return wf

    async def _on_event(self, msg: SignedMessage) -> None:
        if msg.subject in self.feeds.subjects:
            await self.feeds.on_message(msg)
        try:
            await self.triggers.on_event(msg)
        except Exception:
            log.exception("orchestrator.trigger_failed", subject=msg.subject)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            try:
                for approval in await self.approvals.sweep():
                    await self.audit_log.record(
                        "approval_decided", "orchestrator", approval.id, "expired",
                        workflow_id=approval.workflow_id, trace_id=approval.trace_id)
                    if approval.workflow_id:
                        self.engine.start(approval.workflow_id)
            except Exception as exc:
                log.warning("orchestrator.sweep_failed", error=type(exc).__name__)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        await stop.wait()
        await self.stop()

