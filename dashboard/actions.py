"""The dashboard's controls, each over the operator's signed broker path.

Approvals, revocations and workflow runs go to the orchestrator through
``mas.ops_cli.OperatorSession``, the very object the CLI uses: a decision is signed with
the operator key by ``OperatorSession.decide`` exactly as for ``mas approvals approve``.
Agent start/stop/restart, status and logs go to the control service on
``mas.control.*`` (``protocol.control``); its answers must be signed by ``control``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from broker.errors import BrokerError
from mas.ops_cli import OperatorSession
from mas.sessions import ControlSession
from orchestrator.service import WorkflowList
from orchestrator.workflows import Workflow
from protocol import admin
from protocol import control as wire
from protocol.approvals import Approval, ApprovalId, ApprovalList, ApprovalQuery

M = TypeVar("M", bound=BaseModel)
RUN_WAIT_S = 3.0


class ActionFailed(Exception):
    """A control the broker side refused or did not answer; ``str()`` is one line."""


class DecideForm(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    reason: Annotated[str, Field(max_length=500)] = ""


RevokeForm = admin.RevokeRequest  # the form is exactly the operator's revoke request


class RunForm(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    request: Annotated[str, Field(min_length=1, max_length=2000)]


class Controls:
    def __init__(self, session: OperatorSession) -> None:
        self.session = session

    async def approval(self, approval_id: str) -> Approval:
        try:
            query = ApprovalQuery(id=approval_id)
        except ValidationError:
            raise ActionFailed(f"{approval_id!r} is not an approval id") from None
        [found] = (await self._ask(admin.APPROVALS_LIST, query, ApprovalList)).approvals
        return found

    async def decide(self, approval_id: ApprovalId, decision: Literal["approve", "deny"],
                     form: DecideForm) -> Approval:
        """Fetch the approval, then sign the decision for exactly its argument hash."""
        approval = await self.approval(approval_id)
        if approval.status != "pending":
            raise ActionFailed(f"approval {approval.id} is {approval.status}, not pending")
        try:
            return await self.session.decide(approval, decision, form.reason)
        except BrokerError as exc:
            raise ActionFailed(str(exc)) from None

    async def revoke(self, form: admin.RevokeRequest) -> str:
        return (await self._ask(admin.REVOKE, form, admin.Ok)).detail

    async def run(self, form: RunForm) -> Workflow:
        # a few seconds, so the answer usually says where it stands (waiting for approval)
        request = admin.WorkflowRunRequest(request=form.request, wait_s=RUN_WAIT_S)
        [wf] = (await self._ask(admin.WORKFLOWS_RUN, request, WorkflowList,
                                timeout=30)).workflows
        return wf

    async def pending(self) -> list[Approval]:
        return (await self._ask(admin.APPROVALS_LIST, ApprovalQuery(status="pending"),
                                ApprovalList)).approvals

    async def workflows(self) -> list[Workflow]:
        return (await self._ask(admin.WORKFLOWS_LIST, admin.WorkflowQuery(),
                                WorkflowList)).workflows

    async def _ask(self, subject: str, payload: BaseModel, answer: type[M],
                   timeout: float = 10.0) -> M:
        try:
            return await self.session.ask(subject, payload, answer, timeout)
        except BrokerError as exc:
            raise ActionFailed(str(exc)) from None

    # control (mas.control.*): answered by the control identity, not the orchestrator

    async def agent(self, agent: str, action: wire.Action) -> wire.AgentStatus:
        subject = {"start": wire.AGENT_START, "stop": wire.AGENT_STOP,
                   "restart": wire.AGENT_RESTART}[action]
        request = _parse(wire.AgentRequest, agent=agent)
        return await self._ask_control(subject, request, wire.AgentStatus, timeout=60)

    async def status(self, timeout: float = 2.0) -> list[wire.AgentStatus]:
        return (await self._ask_control(wire.STATUS, wire.StatusRequest(), wire.StatusReply,
                                        timeout=timeout)).agents

    async def logs(self, agent: str, tail: int = 200, cursor: str | None = None
                   ) -> wire.LogsReply:
        request = _parse(wire.LogsRequest, agent=agent, tail=tail, cursor=cursor)
        return await self._ask_control(wire.LOGS, request, wire.LogsReply)

    async def _ask_control(self, subject: str, payload: BaseModel, answer: type[M],
                           timeout: float = 10.0) -> M:
        control = ControlSession(self.session.project, self.session.client)
        try:
            return await control.ask(subject, payload, answer, timeout)
        except BrokerError as exc:
            raise ActionFailed(str(exc)) from None


def _parse(model: type[M], **fields: Any) -> M:
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ActionFailed(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
