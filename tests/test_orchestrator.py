"""The orchestrator on a real broker: registration against the policy, sensitive steps
held for a signed human decision, denial, expiry, forgery, restarts, and the audit trail."""

from __future__ import annotations

import asyncio

import pytest

from agents.runtime.service import AgentService
from broker import subjects as subj
from broker.connection import BrokerClient
from broker.secrets import load_identity
from orchestrator.audit import record_hash, signing_bytes
from orchestrator.plan import Step
from protocol import admin
from protocol.approvals import AdminError, ApprovalList
from protocol.audit import AuditRecord
from protocol.explain import Explanation
from protocol.tokens import TokenRequest, TokenRequestReply
from security.decisions import sign_decision
from security.encoding import args_sha256, b64url_decode
from security.keys import SigningKey
from tests.conftest import RunningBroker, eventually, wait_for_violation
from tests.platform import Platform
from tests.test_runtime import Seen, make_agent

pytestmark = pytest.mark.broker
MESSAGE = {"to": "bob", "text": "dinner at 8"}
SEND = Step(id="s1", agent="notify", action="send_message", args=MESSAGE,
            explanation=Explanation(summary="Tell Bob about dinner", reason="asked",
                                    confidence=0.9))


async def audit_records(client: BrokerClient) -> list[AuditRecord]:
    js = client.nc.jetstream()
    info = await js.stream_info(subj.AUDIT_STREAM)
    return [AuditRecord.model_validate_json((await js.get_msg(subj.AUDIT_STREAM, seq=i)).data)
            for i in range(1, info.state.last_seq + 1)]


async def test_registration_accepts_only_what_the_policy_grants(platform: Platform) -> None:
    catalog = platform.orch.registry.catalog()
    assert {(a.agent, a.action, a.sensitive) for a in catalog} == {
        ("notify", "notify_owner", False), ("notify", "send_message", True)}
    assert platform.agent.registration is not None
    assert sorted(platform.agent.registration.accepted) == ["notify_owner", "send_message"]


async def test_an_action_the_policy_does_not_grant_is_rejected_at_registration(
        fresh_broker: RunningBroker, platform: Platform) -> None:
    seen = Seen()
    agent = make_agent("home", seen)  # home's policy has no notify_owner/send_message

    service = AgentService(agent, load_identity(fresh_broker.secrets, "home"), fresh_broker.url)
    await service.start()
    try:
        await eventually(lambda: service.registration is not None, timeout=5, what="ack")
        assert service.registration is not None
        assert service.registration.accepted == []
        assert set(service.registration.rejected) == {"notify_owner", "send_message"}
        assert platform.orch.registry.catalog().get("home", "notify_owner") is None
    finally:
        await service.stop()


async def test_a_sensitive_step_waits_for_a_signed_approval_then_runs_once(
        platform: Platform) -> None:
    wf = await platform.run_plan(SEND)
    assert wf.status == "waiting_approval"
    assert platform.seen.calls == []
    approval = await platform.pending()
    assert (approval.agent, approval.action, approval.args) == ("notify", "send_message", MESSAGE)
    assert approval.args_sha256 == args_sha256(MESSAGE)
    assert approval.explanation.summary == "Tell Bob about dinner"
    answer = ApprovalList.model_validate_json(await platform.decide(approval))
    assert answer.approvals[0].status == "approved"
    await eventually(lambda: platform.seen.calls != [], timeout=5, what="step ran")
    done = await platform.orch.engine.advance(wf.id)
    assert done.status == "completed"
    assert platform.seen.calls == [("send_message", "dinner at 8")]
    used = (await platform.orch.approvals.get(approval.id))
    assert used.status == "used"
    assert used.token_jti == f"{wf.id}-s1"


async def test_a_denial_reaches_the_workflow_with_its_reason(platform: Platform) -> None:
    wf = await platform.run_plan(SEND)
    approval = await platform.pending()
    await platform.decide(approval, "deny")
    await eventually(lambda: not platform.orch.engine._tasks, timeout=5,
                     what="engine idle")
    done = await platform.workflow(wf.id)
    assert done.status == "failed"
    assert done.steps["s1"].code == "approval_denied"
    assert "checked it" in done.steps["s1"].reason
    assert platform.seen.calls == []


@pytest.mark.attack("approve its own request",
                    threat="an approval decision forged, bound to other arguments or replayed")
async def test_forged_replayed_and_misdirected_decisions_are_refused(platform: Platform) -> None:
    await platform.run_plan(SEND)
    approval = await platform.pending()
    forged = AdminError.model_validate_json(await platform.decide(approval,
                                                                  key=SigningKey.generate()))
    assert forged.code == "bad_signature"
    other_args = AdminError.model_validate_json(await platform.decide(
        approval, args_hash=args_sha256({"to": "mallory", "text": "dinner at 8"})))
    assert other_args.code == "args_mismatch"
    assert (await platform.orch.approvals.get(approval.id)).status == "pending"
    await platform.decide(approval)
    twice = AdminError.model_validate_json(await platform.decide(approval))
    assert twice.code == "not_pending"


async def test_an_unanswered_approval_expires_and_the_step_never_runs(
        platform: Platform) -> None:
    await platform.restart_orchestrator(approval_ttl_s=1)
    wf = await platform.run_plan(SEND)

    async def expired() -> bool:
        return (await platform.workflow(wf.id)).status == "failed"

    for _ in range(100):
        if await expired():
            break
        await asyncio.sleep(0.1)
    done = await platform.workflow(wf.id)
    assert done.steps["s1"].code == "approval_expired"
    assert platform.seen.calls == []
    late = AdminError.model_validate_json(await platform.decide(
        await platform.orch.approvals.get(done.steps["s1"].approval_id or "")))
    assert late.code == "not_pending"


async def test_approvals_and_workflows_survive_an_orchestrator_restart(
        platform: Platform) -> None:
    wf = await platform.run_plan(SEND)
    approval = await platform.pending()
    await platform.restart_orchestrator()
    assert (await platform.pending()).id == approval.id
    await platform.decide(approval)
    await eventually(lambda: platform.seen.calls != [], timeout=5, what="step ran")
    await asyncio.sleep(0.2)
    assert (await platform.workflow(wf.id)).status == "completed"
    assert platform.seen.calls == [("send_message", "dinner at 8")]


async def test_a_step_sent_before_a_restart_is_not_run_twice(platform: Platform) -> None:
    note = Step(id="s1", agent="notify", action="notify_owner", args={"text": "once"})
    wf = await platform.run_plan(note)
    assert wf.status == "completed"
    # as if the orchestrator died after sending but before recording the result
    wf.status, wf.steps["s1"].status = "running", "running"
    await platform.orch.engine.save(wf)
    await platform.restart_orchestrator()
    await eventually(lambda: not platform.orch.engine._tasks, timeout=5, what="resume")
    resumed = await platform.workflow(wf.id)
    assert resumed.status == "completed"
    assert resumed.steps["s1"].code == "already_done"
    assert platform.seen.calls == [("notify_owner", "once")]


async def test_an_agent_token_request_becomes_a_pending_approval(platform: Platform) -> None:
    request = TokenRequest(agent="notify", action="send_message", args=MESSAGE,
                           explanation=Explanation(summary="Bob should know", confidence=0.7))
    reply = await platform.agent.client.request(subj.TOKEN_REQUEST, request, timeout=10)
    answer = TokenRequestReply.model_validate_json(reply.data)
    assert answer.status == "pending"
    approval = await platform.pending()
    assert approval.id == answer.approval_id
    assert approval.requested_by == "agent:notify"  # counts against its pending limit
    assert platform.seen.calls == []


@pytest.mark.attack("approve its own request",
                    threat="an agent publishes its own signed approval to the operator's endpoint")
async def test_an_agent_cannot_reach_the_operator_endpoints(platform: Platform) -> None:
    await platform.run_plan(SEND)
    approval = await platform.pending()
    signed = sign_decision(platform.agent.material.signing_key, approval_id=approval.id,
                           args_sha256=approval.args_sha256, decision="approve", reason="",
                           by="operator")
    await platform.agent.client.publish(admin.APPROVALS_DECIDE, signed)
    await wait_for_violation(platform.agent.client, "publish", admin.APPROVALS_DECIDE)
    assert (await platform.orch.approvals.get(approval.id)).status == "pending"


async def test_every_step_is_in_a_signed_hash_chained_audit_log(platform: Platform) -> None:
    await platform.run_plan(SEND)
    await platform.decide(await platform.pending())
    await eventually(lambda: platform.seen.calls != [], timeout=5, what="step ran")
    await asyncio.sleep(0.3)
    records = await audit_records(platform.operator)
    kinds = [(r.kind, r.outcome) for r in records]
    for expected in [("workflow", "ok"), ("approval_requested", "pending"),
                     ("approval_decided", "approved"), ("command", "ok")]:
        assert expected in kinds
    key = platform.orch.material.trust.sender_rings()["orchestrator"]
    prev = "0" * 64
    for record in records:
        assert record.prev_hash == prev
        verify_key = key.get(record.kid)
        assert verify_key is not None
        assert verify_key.verify(signing_bytes(record), b64url_decode(record.sig))
        prev = record_hash(record)
