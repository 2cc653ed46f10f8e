"""Operator commands: run the orchestrator, answer approvals, start and inspect workflows,
revoke tokens. Each talks to the orchestrator over the broker as the operator identity;
approval decisions are signed with the operator's key before they leave this machine."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from pathlib import Path
from typing import Annotated, Literal

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.table import Table

from broker import subjects as subj
from broker.errors import BrokerError
from broker.kv import bucket_keys
from broker.secrets import load_identity
from mas.approvals_watch import Watcher, WatchError, load_ntfy, pick_dialog
from mas.audit_cli import StreamReader, parse_since
from mas.project import Project, find_project
from mas.sessions import M, ServiceSession, broker_url
from mas.tokens_list import token_rows
from orchestrator.planners import (
    PlannerConfigError,
    WorkflowError,
    load_settings,
    make_library,
    make_planner,
)
from orchestrator.service import Orchestrator, WorkflowList
from orchestrator.settings import OrchestratorSettingsError, load_orchestrator_settings
from protocol import admin
from protocol.approvals import Approval, ApprovalList, ApprovalQuery
from protocol.audit import AuditRecord
from security.decisions import sign_decision
from security.revocation import Revocation

out = Console(highlight=False, soft_wrap=True)
orchestrator_app = typer.Typer(help="The orchestrator service.", no_args_is_help=True)
approvals_app = typer.Typer(help="Answer sensitive actions waiting for a human.",
                            no_args_is_help=True)
workflow_app = typer.Typer(help="Start and inspect workflows.", no_args_is_help=True)
tokens_app = typer.Typer(help="Revoke capability tokens.", no_args_is_help=True)
RootOption = Annotated[
    Path | None, typer.Option("--root", help="Project folder (default: nearest policy.yaml).")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
MAX_REASON = 500  # ApprovalDecision.reason and RevokeRequest.reason


class OperatorSession(ServiceSession):
    """One connection to the broker as the operator: requests to the orchestrator's admin
    endpoints, each answer checked to be signed by the orchestrator, and decisions signed
    with the operator's key. The one-shot commands open one per command; `mas approvals
    watch` keeps one open."""

    service = "orchestrator"
    title = "the orchestrator"
    start_hint = "`mas orchestrator run`"
    timeout_s = 10.0

    async def pending(self) -> list[Approval]:
        query = ApprovalQuery(status="pending")
        return (await self.ask(admin.APPROVALS_LIST, query, ApprovalList)).approvals

    async def decide(self, approval: Approval, decision: Literal["approve", "deny"],
                     reason: str) -> Approval:
        """Sign ``decision`` for exactly the arguments ``approval`` holds and send it."""
        signed = sign_decision(load_identity(self.project.secrets, "operator").signing_key,
                               approval_id=approval.id, args_sha256=approval.args_sha256,
                               decision=decision, reason=reason, by="operator")
        [result] = (await self.ask(admin.APPROVALS_DECIDE, signed, ApprovalList)).approvals
        return result


async def _ask(project: Project, subject: str, payload: BaseModel | bytes, answer: type[M],
               timeout: float | None = None) -> M:
    async with await OperatorSession.open(project) as session:
        return await session.ask(subject, payload, answer, timeout)


@orchestrator_app.command("run")
def orchestrator_run(root: RootOption = None) -> None:
    """Run the orchestrator in the foreground until SIGTERM or Ctrl-C."""
    project = find_project(root)
    try:
        settings = load_settings()
        planner = make_planner(settings, project.root)
        library = make_library(settings, project.root)
    except (PlannerConfigError, WorkflowError) as exc:
        raise BrokerError(f"planner: {exc}") from None
    try:
        own = load_orchestrator_settings()
    except OrchestratorSettingsError as exc:
        raise BrokerError(str(exc)) from None
    service = Orchestrator(project.policy(), load_identity(project.secrets, "orchestrator"),
                           broker_url(project), planner=planner, library=library,
                           approval_ttl_s=own.approval_ttl_s, ready_file=own.ready_file)
    asyncio.run(service.run())


def _approval_table(approvals: list[Approval]) -> Table:
    table = Table(title="Approvals")
    for column in ("id", "status", "agent.action", "summary", "confidence", "expires"):
        table.add_column(column, overflow="fold")
    for a in approvals:
        table.add_row(a.id, a.status, f"{a.agent}.{a.action}", a.explanation.summary,
                      f"{a.explanation.confidence:.2f}",
                      f"{max(0, a.expires_at - int(time.time()))}s"
                      if a.status == "pending" else "")
    return table


@approvals_app.command("list")
def approvals_list(
    status: Annotated[str | None, typer.Option(help="pending, approved, denied, expired, used")]
    = "pending",
    root: RootOption = None, as_json: JsonOption = False,
) -> None:
    """Approvals (pending ones by default)."""
    project = find_project(root)
    try:
        query = ApprovalQuery.model_validate({"status": status})
    except ValidationError:
        raise BrokerError(f"unknown status {status!r}; use pending, approved, denied, expired "
                          "or used") from None
    found = asyncio.run(_ask(project, admin.APPROVALS_LIST, query, ApprovalList)).approvals
    if as_json:
        typer.echo(json.dumps([a.model_dump(mode="json") for a in found], indent=2))
    else:
        out.print(_approval_table(found))


def _one(project: Project, approval_id: str) -> Approval:
    try:
        query = ApprovalQuery(id=approval_id)
    except ValidationError:
        raise BrokerError(f"{approval_id!r} is not an approval id (see `mas approvals list`)") \
            from None
    [approval] = asyncio.run(_ask(project, admin.APPROVALS_LIST, query, ApprovalList)).approvals
    return approval


@approvals_app.command("show")
def approvals_show(approval_id: str, root: RootOption = None, as_json: JsonOption = False) -> None:
    """One approval: the exact arguments and the agent's explanation."""
    approval = _one(find_project(root), approval_id)
    if as_json:
        typer.echo(approval.model_dump_json(indent=2))
        return
    e = approval.explanation
    out.print(f"[bold]{approval.id}[/bold]  {approval.status}  "
              f"{approval.agent}.{approval.action}  requested by {approval.requested_by}")
    out.print(f"summary:    {e.summary}\nreason:     {e.reason}\n"
              f"confidence: {e.confidence:.2f}\ndata:       {json.dumps(e.data)}")
    out.print(f"arguments (sha256 {approval.args_sha256[:16]}...):")
    out.print(json.dumps(approval.args, indent=2, sort_keys=True), markup=False)


def _decide(approval_id: str, decision: Literal["approve", "deny"], reason: str,
            root: Path | None) -> None:
    if len(reason) > MAX_REASON:  # checked here, not after asking the orchestrator
        raise BrokerError(f"--reason may be at most {MAX_REASON} characters")
    project = find_project(root)
    approval = _one(project, approval_id)

    async def send() -> Approval:
        async with await OperatorSession.open(project) as session:
            return await session.decide(approval, decision, reason)

    result = asyncio.run(send())
    out.print(f"{result.id}: {result.status} ({result.agent}.{result.action})")


ReasonOption = Annotated[str, typer.Option("--reason", help="Why; stored and audited.")]


@approvals_app.command("approve")
def approvals_approve(approval_id: str, reason: ReasonOption = "", root: RootOption = None
                      ) -> None:
    """Approve exactly the arguments shown by `mas approvals show` (signed with your key)."""
    _decide(approval_id, "approve", reason, root)


@approvals_app.command("deny")
def approvals_deny(approval_id: str, reason: ReasonOption = "", root: RootOption = None) -> None:
    """Deny; the requester is told the reason."""
    _decide(approval_id, "deny", reason, root)


@approvals_app.command("watch")
def approvals_watch(
    dialog: Annotated[str, typer.Option(
        help="auto (a macOS dialog where osascript exists), osascript, or none (terminal).")]
    = "auto",
    ntfy: Annotated[str | None, typer.Option(
        "--ntfy", help="Also push each new approval to this ntfy topic URL "
        "(default $MAS_NTFY_URL; off when unset).")] = None,
    interval: Annotated[float, typer.Option(help="Seconds between polls.", min=0.1, max=60)]
    = 1.0,
    once: Annotated[bool, typer.Option("--once", help="Handle what is pending now, then exit.")]
    = False,
    root: RootOption = None,
) -> None:
    """Announce each new approval once: a macOS dialog with Deny/Approve (decisions signed
    with your key), or a block on the terminal; optionally an ntfy push."""
    project = find_project(root)
    if dialog not in ("auto", "osascript", "none"):
        raise BrokerError(f"--dialog {dialog!r}: use auto, osascript or none")
    try:
        osascript = pick_dialog(dialog)  # type: ignore[arg-type]
        ntfy_settings = load_ntfy(ntfy)
    except WatchError as exc:
        raise BrokerError(str(exc)) from None
    push = ntfy_settings if ntfy_settings.url is not None else None
    out.print(f"watching approvals ({'macOS dialog' if osascript else 'terminal'}; ntfy push "
              f"{'on' if push else 'off'}){'' if once else '; Ctrl-C stops'}")

    async def watch() -> None:
        session = await OperatorSession.open(project, reconnect=not once)
        watcher = Watcher(session, osascript=osascript, ntfy=push)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        task = asyncio.create_task(watcher.run(interval_s=interval, once=once))
        stopper = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (task, stopper):
                t.cancel()
            await asyncio.gather(task, stopper, return_exceptions=True)
            await session.close()
        if task.done() and not task.cancelled() and (failed := task.exception()) is not None:
            raise failed
        if stop.is_set():
            out.print("stopped watching")

    asyncio.run(watch())


def _workflow_table(result: WorkflowList) -> Table:
    table = Table(title="Workflows")
    for column in ("id", "status", "request", "steps", "reason"):
        table.add_column(column, overflow="fold")
    for wf in result.workflows:
        steps = ", ".join(f"{sid}:{s.status}" for sid, s in wf.steps.items())
        table.add_row(wf.id, wf.status, wf.request, steps, wf.reason)
    return table


def run_request(request: str, wait: float, root: Path | None, as_json: bool) -> None:
    try:
        query = admin.WorkflowRunRequest(request=request, wait_s=wait)
    except ValidationError as exc:
        raise BrokerError("the request must be 1 to 2000 characters"
                          if exc.errors()[0]["loc"][0] == "request"
                          else "--wait must be 0 to 120 seconds") from None
    project = find_project(root)
    result = asyncio.run(_ask(project, admin.WORKFLOWS_RUN, query, WorkflowList,
                              timeout=wait + 15))
    if as_json:
        typer.echo(result.model_dump_json(indent=2))
    else:
        out.print(_workflow_table(result))
        for wf in result.workflows:
            waiting = [s.approval_id for s in wf.steps.values() if s.status == "waiting_approval"]
            for approval_id in waiting:
                out.print(f"waiting for you: mas approvals show {approval_id}")


WaitOption = Annotated[float, typer.Option(help="Seconds to wait for the outcome.")]


@workflow_app.command("run")
def workflow_run(name: str, wait: WaitOption = 10.0, root: RootOption = None,
                 as_json: JsonOption = False) -> None:
    """Run a named workflow from workflows/."""
    run_request(name, wait, root, as_json)


@workflow_app.command("list")
def workflow_list(root: RootOption = None, as_json: JsonOption = False) -> None:
    """Recent workflows and where each stands."""
    result = asyncio.run(_ask(find_project(root), admin.WORKFLOWS_LIST, admin.WorkflowQuery(),
                              WorkflowList))
    if as_json:
        typer.echo(result.model_dump_json(indent=2))
    else:
        out.print(_workflow_table(result))


@workflow_app.command("show")
def workflow_show(workflow_id: str, root: RootOption = None, as_json: JsonOption = False) -> None:
    """One workflow, step by step."""
    try:
        query = admin.WorkflowQuery(id=workflow_id)
    except ValidationError:
        raise BrokerError(f"{workflow_id!r} is not a workflow id") from None
    result = asyncio.run(_ask(find_project(root), admin.WORKFLOWS_LIST, query, WorkflowList))
    if as_json:
        typer.echo(result.model_dump_json(indent=2))
    else:
        out.print(_workflow_table(result))


@tokens_app.command("revoke")
def tokens_revoke(
    target: Annotated[str, typer.Argument(help="A token's jti, or an agent with --agent.")],
    agent: Annotated[bool, typer.Option("--agent", help="Revoke every token of this agent "
                                        "(kill switch).")] = False,
    reason: ReasonOption = "", lift: Annotated[bool, typer.Option(help="Undo.")] = False,
    root: RootOption = None,
) -> None:
    """Revoke a token (or all of an agent's): agents refuse it on their next message."""
    try:
        request = admin.RevokeRequest(kind="agent" if agent else "jti", target=target,
                                      reason=reason, lift=lift)
    except ValidationError as exc:
        if exc.errors()[0]["loc"][0] == "reason":
            raise BrokerError(f"--reason may be at most {MAX_REASON} characters") from None
        raise BrokerError(f"{target!r} is not a token id or agent name") from None
    result = asyncio.run(_ask(find_project(root), admin.REVOKE, request, admin.Ok))
    out.print(result.detail)


@tokens_app.command("list")
def tokens_list(
    since: Annotated[str, typer.Option(help="How far back: 30m, 2h, 1d or an ISO time.")] = "1h",
    show_all: Annotated[bool, typer.Option("--all", help="Also expired tokens.")] = False,
    root: RootOption = None, as_json: JsonOption = False,
) -> None:
    """Tokens issued recently (from the audit log) and whether each is live, expired or
    revoked (from the revocations bucket)."""
    start = parse_since(since)
    project = find_project(root)

    async def read() -> tuple[list[AuditRecord], list[Revocation]]:
        async with await OperatorSession.open(project) as session:
            records = [AuditRecord.model_validate_json(raw) async for _, raw in
                       StreamReader(session.client).records(since=start)]
            kv = await session.client.nc.jetstream(timeout=5).key_value(
                subj.REVOCATIONS_BUCKET)
            revocations = []
            for key in await bucket_keys(kv):
                entry = await kv.get(key)
                with contextlib.suppress(ValidationError):
                    revocations.append(Revocation.model_validate_json(entry.value or b""))
            return records, revocations

    records, revocations = asyncio.run(read())
    rows = [r for r in token_rows(records, revocations, since=start or 0.0)
            if show_all or r.state != "expired"]
    if as_json:
        typer.echo(json.dumps([r.model_dump() for r in rows], indent=2))
        return
    table = Table(title=f"Tokens issued since {since} ago" if since[-1:].isalpha()
                  else f"Tokens issued since {since}")
    for column in ("jti", "agent.action", "state", "expires", "single use", "approval"):
        table.add_column(column, overflow="fold")
    now = time.time()
    for r in rows:
        left = f"in {int(r.expires_at - now)}s" if r.expires_at > now else "past"
        table.add_row(r.jti, f"{r.agent}.{r.action}", r.state, left,
                      "yes" if r.single_use else "", r.approval_id or "")
    out.print(table if rows else "no tokens issued in that period"
              + ("" if show_all else " that are still live (--all shows expired ones)"))
