"""The pre-approval workflow's durable state: one KV entry per approval.

Every change is a compare-and-set on the entry's revision, so two deciders (or a
decision racing the expiry sweep) cannot both win. Entries live in JetStream's file
store and so survive orchestrator and broker restarts. A decision is accepted only
if the operator's signature verifies and it names this approval's exact argument
hash; an approval is approved or denied once, expires unanswered, and mints at most
one token ("used").
"""

from __future__ import annotations

import contextlib
import time
import uuid

import nats.js.errors
from nats.js.kv import KeyValue
from pydantic import JsonValue

from broker.kv import bucket_keys
from orchestrator.errors import Refusal
from protocol.approvals import Approval, ApprovalStatus
from protocol.explain import Explanation
from security.decisions import ApprovalDecision, verify_decision
from security.encoding import args_sha256
from security.errors import DecisionError
from security.keys import KeyRing

DEFAULT_TTL_S = 15 * 60


class ApprovalError(Refusal):
    """A decision or use the approval's state does not allow."""


class ApprovalStore:
    def __init__(self, kv: KeyValue, approvers: KeyRing, *, ttl_s: int = DEFAULT_TTL_S) -> None:
        self.kv = kv
        self.approvers = approvers
        self.ttl_s = ttl_s

    async def create(self, *, agent: str, action: str, args: dict[str, JsonValue],
                     explanation: Explanation, requested_by: str,
                     workflow_id: str | None = None, step_id: str | None = None,
                     trace_id: str | None = None) -> Approval:
        now = int(time.time())
        approval = Approval(
            id=f"ap-{uuid.uuid4().hex[:16]}", agent=agent, action=action, args=args,
            args_sha256=args_sha256(args), explanation=explanation, requested_by=requested_by,
            workflow_id=workflow_id, step_id=step_id, trace_id=trace_id,
            created_at=now, expires_at=now + self.ttl_s)
        await self.kv.create(approval.id, approval.model_dump_json().encode())
        return approval

    async def _read(self, approval_id: str) -> tuple[Approval, int]:
        try:
            entry = await self.kv.get(approval_id)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            raise ApprovalError("unknown_approval", f"no approval {approval_id}") from None
        return Approval.model_validate_json(entry.value or b""), int(entry.revision or 0)

    async def _write(self, approval: Approval, revision: int) -> Approval:
        try:
            await self.kv.update(approval.id, approval.model_dump_json().encode(), last=revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            raise ApprovalError("conflict", f"approval {approval.id} changed meanwhile; "
                                "look again") from None
        return approval

    async def _current(self, approval_id: str, now: float | None) -> tuple[Approval, int]:
        """The approval and its revision, marked expired first if its time ran out."""
        approval, revision = await self._read(approval_id)
        t = time.time() if now is None else now
        if approval.status == "pending" and t >= approval.expires_at:
            # if someone else changed it first, read what they wrote
            with contextlib.suppress(ApprovalError):
                await self._write(approval.model_copy(update={"status": "expired"}), revision)
            approval, revision = await self._read(approval_id)
        return approval, revision

    async def get(self, approval_id: str, *, now: float | None = None) -> Approval:
        return (await self._current(approval_id, now))[0]

    async def find(self, status: ApprovalStatus | None = None,
                   now: float | None = None) -> list[Approval]:
        found = [await self.get(k, now=now) for k in await bucket_keys(self.kv)]
        return sorted((a for a in found if status is None or a.status == status),
                      key=lambda a: a.created_at)

    async def decide(self, decision: ApprovalDecision, *, now: float | None = None) -> Approval:
        try:
            verify_decision(decision, self.approvers)
        except DecisionError as exc:
            raise ApprovalError("bad_signature", str(exc)) from exc
        approval, revision = await self._current(decision.approval_id, now)
        if approval.status != "pending":
            raise ApprovalError("not_pending", f"approval {approval.id} is {approval.status}; "
                                "a decision is taken once")
        if decision.args_sha256 != approval.args_sha256:
            raise ApprovalError("args_mismatch",
                                "the decision is for other arguments than this request")
        status: ApprovalStatus = "approved" if decision.decision == "approve" else "denied"
        return await self._write(
            approval.model_copy(update={"status": status, "decision": decision}), revision)

    async def consume(self, approval_id: str, jti: str) -> Approval:
        """Mark an approved approval used by the token ``jti``; a second use is refused."""
        approval, revision = await self._current(approval_id, None)
        if approval.status != "approved":
            raise ApprovalError("not_approved", f"approval {approval_id} is {approval.status}")
        return await self._write(
            approval.model_copy(update={"status": "used", "token_jti": jti}), revision)

    async def sweep(self, now: float | None = None) -> list[Approval]:
        """Expire what ran out; returns the approvals that expired in this sweep."""
        expired = []
        for key in await bucket_keys(self.kv):
            before, _ = await self._read(key)
            if before.status != "pending":
                continue
            after = await self.get(key, now=now)
            if after.status == "expired":
                expired.append(after)
        return expired
