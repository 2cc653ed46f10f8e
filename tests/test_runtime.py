"""The agent runtime against a real broker: every command is checked before its handler
runs, and every refusal reaches the caller with its own code."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import nats.js.errors
import pytest
from pydantic import BaseModel
from structlog.testing import capture_logs

from agents.runtime import ActionError, Agent, Context, Explanation, MemoryState, update_model
from agents.runtime.ledger import PREFIX, RETAIN_S, SingleUseLedger, record_ttl
from agents.runtime.service import AgentService
from broker import subjects as subj
from broker.connection import BrokerClient, reply_binding
from broker.revocations import RevocationAuthority
from broker.secrets import load_identity
from orchestrator.dispatch import AgentCaller
from protocol.actions import REPLY, Completed, Failed, Refused
from protocol.registry import Heartbeat
from security.envelope import H_NONCE
from security.errors import TokenExpired
from security.keys import SigningKey
from security.revocation import Revocation
from security.tokens import DEFAULT_LEEWAY_S, MAX_LIFETIME_S, TokenIssuer, TokenVerifier
from tests.conftest import ConnectAs, RunningBroker, eventually

pytestmark = pytest.mark.broker


class NoteIn(BaseModel):
    text: str


class NoteOut(BaseModel):
    delivered: bool
    length: int


class MessageIn(BaseModel):
    to: str
    text: str


@dataclass
class Seen:
    """What the handlers saw: a refused command must never show up here."""

    calls: list[tuple[str, str]] = field(default_factory=list)
    gate: asyncio.Event = field(default_factory=asyncio.Event)


def make_agent(name: str, seen: Seen) -> Agent:
    agent = Agent(name, version="9.9.9", kind="stateless")

    @agent.action(description="Tell the owner something.")
    async def notify_owner(args: NoteIn, ctx: Context) -> NoteOut:
        seen.calls.append(("notify_owner", args.text))
        if args.text == "boom":
            raise RuntimeError("handler bug")
        if args.text == "missing":
            raise ActionError("not_configured", "no channel; set MAS_NOTIFY_WEBHOOK_URL")
        if args.text == "slow":
            await seen.gate.wait()
        if args.text == "propose":
            ctx.propose("send_message", Explanation(summary="tell Bob", confidence=0.6),
                        args={"to": "bob", "text": "hi"})
        return NoteOut(delivered=True, length=len(args.text))

    @agent.action(sensitive=True)
    async def send_message(args: MessageIn, ctx: Context) -> NoteOut:
        """Message someone else."""
        seen.calls.append(("send_message", args.text))
        return NoteOut(delivered=True, length=len(args.text))

    return agent


@dataclass
class Rig:
    broker: RunningBroker
    orch: BrokerClient
    authority: RevocationAuthority
    issuer: TokenIssuer
    caller: AgentCaller
    seen: Seen
    start: Callable[..., Awaitable[AgentService]]


@pytest.fixture
async def rig(broker: RunningBroker, connect_as: ConnectAs) -> AsyncIterator[Rig]:
    orch = await connect_as("orchestrator")
    authority = await RevocationAuthority.start(orch)
    material = load_identity(broker.secrets, "orchestrator")
    issuer = TokenIssuer("orchestrator", material.signing_key)
    seen = Seen()
    services: list[AgentService] = []

    async def start(name: str = "notify", **options: object) -> AgentService:
        service = AgentService(make_agent(name, seen), load_identity(broker.secrets, name),
                               broker.url, register=False, **options)  # type: ignore[arg-type]
        await service.start()
        services.append(service)
        return service

    yield Rig(broker, orch, authority, issuer, AgentCaller(orch, issuer), seen, start)
    seen.gate.set()
    for service in services:
        await service.stop()
    for entry in authority.revocations.entries():
        await authority.lift(entry.kind, entry.target)


async def test_a_valid_command_runs_the_handler_and_returns_its_output(rig: Rig) -> None:
    await rig.start()
    reply = await rig.caller.call("notify", "notify_owner", {"text": "hello"})
    assert reply == Completed(output={"delivered": True, "length": 5})
    assert rig.seen.calls == [("notify_owner", "hello")]


async def test_proposals_come_back_with_their_explanation(rig: Rig) -> None:
    await rig.start()
    reply = await rig.caller.call("notify", "notify_owner", {"text": "propose"})
    assert isinstance(reply, Completed)
    [proposal] = reply.proposals
    assert (proposal.agent, proposal.action, proposal.args) == \
        ("notify", "send_message", {"to": "bob", "text": "hi"})
    assert proposal.explanation.summary == "tell Bob"
    assert proposal.explanation.confidence == 0.6


async def _refused(rig: Rig, action: str, args: dict[str, object], token: str | None,
                   *, mint: bool = False) -> Refused:
    reply = await (rig.caller.call("notify", action, args) if mint else
                   _send(rig, action, args, token))
    assert isinstance(reply, Refused), reply
    assert rig.seen.calls == [], "a refused command reached the handler"
    return reply


async def _send(rig: Rig, action: str, args: dict[str, object],
                token: str | None) -> Completed | Refused | Failed:
    reply = await rig.orch.request(subj.command("notify", action), json.dumps(args).encode(),
                                   token=token, timeout=5)
    return REPLY.validate_json(reply.data)


async def test_no_token_is_refused(rig: Rig) -> None:
    await rig.start()
    reply = await _refused(rig, "notify_owner", {"text": "x"}, None)
    assert reply.code == "token_missing"


async def test_a_token_signed_by_an_untrusted_key_is_refused(rig: Rig) -> None:
    await rig.start()
    rogue = TokenIssuer("orchestrator", SigningKey.generate())
    token, _ = rogue.issue(audience="notify", actions=["notify_owner"],
                           subjects=[subj.command("notify", "notify_owner")])
    assert (await _refused(rig, "notify_owner", {"text": "x"}, token)).code == \
        "token_unknown_key"


@pytest.mark.attack("forge, replay or extend tokens",
                    threat="a command carrying a forged token reaches an agent's runtime")
async def test_a_forged_signature_under_the_real_key_id_is_refused(rig: Rig) -> None:
    await rig.start()
    _, claims = rig.issuer.issue(audience="notify", actions=["notify_owner"],
                                 subjects=[subj.command("notify", "notify_owner")])
    forged = TokenIssuer("orchestrator", SigningKey.generate()).sign(claims)
    assert (await _refused(rig, "notify_owner", {"text": "x"}, forged)).code == \
        "token_bad_signature"


async def test_an_expired_token_is_refused(rig: Rig) -> None:
    await rig.start()
    token, _ = rig.issuer.issue(audience="notify", actions=["notify_owner"],
                                subjects=[subj.command("notify", "notify_owner")],
                                now=int(time.time()) - 600, lifetime_s=60)
    assert (await _refused(rig, "notify_owner", {"text": "x"}, token)).code == "token_expired"


@pytest.mark.attack("forge, replay or extend tokens",
                    threat="a token issued to one agent replayed against another")
async def test_a_token_for_another_agent_is_refused(rig: Rig) -> None:
    await rig.start()
    token, _ = rig.issuer.issue(audience="home", actions=["notify_owner"],
                                subjects=[subj.command("notify", "notify_owner")])
    assert (await _refused(rig, "notify_owner", {"text": "x"}, token)).code == \
        "token_wrong_audience"


async def test_a_token_for_another_action_is_refused(rig: Rig) -> None:
    await rig.start()
    token, _ = rig.caller.mint("notify", "notify_owner", {})
    reply = await _refused(rig, "send_message", {"to": "bob", "text": "x"}, token)
    assert reply.code in {"token_out_of_scope", "token_args_mismatch"}
    token, _ = rig.issuer.issue(audience="notify", actions=["notify_owner", "send_message"],
                                subjects=[subj.command("notify", "notify_owner")])
    # right action, but the subject it arrived on is not in the token's scope
    reply = await _refused(rig, "notify_owner", {"text": "x"},
                           rig.issuer.issue(audience="notify", actions=["notify_owner"],
                                            subjects=["mas.agent.notify.other"])[0])
    assert reply.code == "token_out_of_scope"


@pytest.mark.attack("forge, replay or extend tokens",
                    threat="a revoked token used again before it expires")
async def test_revoking_a_token_stops_it_on_the_next_message(rig: Rig) -> None:
    await rig.start()
    token, claims = rig.caller.mint("notify", "notify_owner", {"text": "x"})
    assert isinstance(await _send(rig, "notify_owner", {"text": "x"}, token), Completed)
    rig.seen.calls.clear()
    await rig.authority.revoke(Revocation(kind="jti", target=claims.jti,
                                          revoked_at=int(time.time()), expires_at=claims.exp))
    await rig.orch.sync()
    reply = await _send(rig, "notify_owner", {"text": "x"}, token)
    assert isinstance(reply, Refused)
    assert reply.code == "token_revoked"
    assert rig.seen.calls == []


async def test_the_kill_switch_refuses_every_token_issued_before_it(rig: Rig) -> None:
    await rig.start()
    token, _ = rig.caller.mint("notify", "notify_owner", {"text": "x"})
    await rig.authority.revoke(Revocation(kind="agent", target="notify",
                                          revoked_at=int(time.time()) + 1))
    await rig.orch.sync()
    reply = await _send(rig, "notify_owner", {"text": "x"}, token)
    assert isinstance(reply, Refused)
    assert reply.code == "token_revoked"
    assert rig.seen.calls == []


@pytest.mark.attack("forge, replay or extend tokens",
                    threat="an approved single-use token replayed for a second side effect")
async def test_a_single_use_token_works_once(rig: Rig) -> None:
    await rig.start()
    args = {"to": "bob", "text": "hi"}
    token, _ = rig.caller.mint("notify", "send_message", args, approval_id="appr-1")
    assert isinstance(await _send(rig, "send_message", args, token), Completed)
    replay = await _send(rig, "send_message", args, token)
    assert isinstance(replay, Refused)
    assert replay.code == "token_replayed"
    assert rig.seen.calls == [("send_message", "hi")]


async def test_a_sensitive_token_bound_to_other_arguments_is_refused(rig: Rig) -> None:
    await rig.start()
    token, _ = rig.caller.mint("notify", "send_message", {"to": "bob", "text": "hi"},
                               approval_id="appr-2")
    reply = await _refused(rig, "send_message", {"to": "mallory", "text": "hi"}, token)
    assert reply.code == "token_args_mismatch"


async def test_a_sensitive_action_needs_an_approved_single_use_token(rig: Rig) -> None:
    await rig.start()
    args = {"to": "bob", "text": "hi"}
    unbound, _ = rig.caller.mint("notify", "send_message", args)
    assert (await _refused(rig, "send_message", args, unbound)).code == "token_args_mismatch"
    from security.encoding import args_sha256
    reusable, _ = rig.issuer.issue(audience="notify", actions=["send_message"],
                                   subjects=[subj.command("notify", "send_message")],
                                   args_sha256=args_sha256(args))
    assert (await _refused(rig, "send_message", args, reusable)).code == "approval_required"


@pytest.mark.attack("forge, replay or extend tokens",
                    threat="a captured command envelope replayed verbatim")
async def test_a_replayed_envelope_is_answered_with_a_refusal(rig: Rig) -> None:
    await rig.start()
    token, _ = rig.caller.mint("notify", "notify_owner", {"text": "x"})
    subject, data = subj.command("notify", "notify_owner"), b'{"text":"x"}'
    headers = rig.orch.signer.seal(subject, data, token=token)
    first = await rig.orch.nc.request(subject, data, headers=headers, timeout=5)
    assert REPLY.validate_json(first.data).status == "ok"
    again = await rig.orch.nc.request(subject, data, headers=headers, timeout=5)
    opened = rig.orch.open(again, sealed_for=reply_binding(headers[H_NONCE]))
    reply = REPLY.validate_json(opened.data)
    assert isinstance(reply, Refused)
    assert reply.code == "envelope_replayed"
    assert rig.seen.calls == [("notify_owner", "x")]


async def test_unknown_actions_and_invalid_input_never_reach_a_handler(rig: Rig) -> None:
    await rig.start()
    reply = await rig.caller.call("notify", "launch_rockets", {})
    assert isinstance(reply, Refused)
    assert reply.code == "unknown_action"
    bad = await rig.caller.call("notify", "notify_owner", {"text": 42})
    assert isinstance(bad, Failed)
    assert bad.code == "invalid_input"
    assert "text" in bad.reason
    garbage = await rig.orch.request(subj.command("notify", "notify_owner"), b"[1,2",
                                     token=rig.caller.mint("notify", "notify_owner", {})[0])
    parsed = REPLY.validate_json(garbage.data)
    assert isinstance(parsed, Refused)
    assert parsed.code == "invalid_input"
    assert rig.seen.calls == []


async def test_a_failing_handler_is_reported_without_its_internals(rig: Rig) -> None:
    await rig.start()
    reply = await rig.caller.call("notify", "notify_owner", {"text": "boom"})
    assert isinstance(reply, Failed)
    assert reply.code == "handler_error"
    assert "handler bug" not in reply.reason
    expected = await rig.caller.call("notify", "notify_owner", {"text": "missing"})
    assert expected == Failed(code="not_configured",
                              reason="no channel; set MAS_NOTIFY_WEBHOOK_URL")


async def test_each_request_is_logged_once_without_its_payload(rig: Rig) -> None:
    await rig.start()
    with capture_logs() as logs:
        await rig.caller.call("notify", "notify_owner", {"text": "secret-glucose-7.2"})
        await _send(rig, "notify_owner", {"text": "y"}, None)
    lines = [e for e in logs if e["event"] == "agent.request"]
    assert [(e["action"], e["outcome"]) for e in lines] == \
        [("notify_owner", "ok"), ("notify_owner", "refused")]
    assert lines[1]["code"] == "token_missing"
    assert all(e["trace_id"] and e["duration_ms"] >= 0 for e in lines)
    assert "secret-glucose" not in repr(logs)


async def test_replicas_share_the_load_and_each_request_runs_once(rig: Rig) -> None:
    first, second = await rig.start(), await rig.start()
    replies = await asyncio.gather(*(
        rig.caller.call("notify", "notify_owner", {"text": f"m{i}"}) for i in range(40)))
    assert all(isinstance(r, Completed) for r in replies)
    assert sorted(t for _, t in rig.seen.calls) == sorted(f"m{i}" for i in range(40))
    assert first.counts["ok"] > 0
    assert second.counts["ok"] > 0
    assert first.counts["ok"] + second.counts["ok"] == 40


async def test_heartbeats_report_the_instance(rig: Rig) -> None:
    beats: list[Heartbeat] = []

    async def on_beat(msg: object) -> None:
        beats.append(Heartbeat.model_validate_json(msg.data))  # type: ignore[attr-defined]

    await rig.orch.subscribe(subj.heartbeat("notify"), on_beat)
    await rig.orch.sync()
    service = await rig.start(heartbeat_s=0.1)
    await eventually(lambda: len(beats) >= 3, timeout=3, what="three heartbeats")
    assert {b.instance for b in beats} == {service.instance}
    assert beats[-1].version == "9.9.9"
    assert beats[-1].state == "ready"


async def test_stop_drains_the_request_in_hand(rig: Rig, tmp_path: object) -> None:
    service = await rig.start()
    pending = asyncio.create_task(rig.caller.call("notify", "notify_owner", {"text": "slow"}))
    await eventually(lambda: rig.seen.calls != [], timeout=3, what="handler started")
    stopping = asyncio.create_task(service.stop())
    await asyncio.sleep(0.2)
    rig.seen.gate.set()
    reply = await pending
    await stopping
    assert reply == Completed(output={"delivered": True, "length": 4})
    assert service.state == "stopped"


async def test_a_restarted_stateless_agent_still_refuses_a_step_it_ran(rig: Rig) -> None:
    """The single-use ledger is in the agent's bucket even without `state: true`: a
    stateless agent killed after running a step and started again refuses the resend."""
    first = await rig.start("notify")
    args = {"text": "once"}
    token, _ = rig.caller.mint("notify", "notify_owner", args, jti="wf-restart-s1")
    assert isinstance(await rig.caller.call("notify", "notify_owner", args, token=token),
                      Completed)
    await first.stop()
    await rig.start("notify")
    replay = await rig.caller.call("notify", "notify_owner", args, token=token)
    assert isinstance(replay, Refused)
    assert replay.code == "token_replayed"
    assert rig.seen.calls == [("notify_owner", "once")]


async def test_single_use_holds_across_replicas_of_a_stateful_agent(rig: Rig) -> None:
    first = await rig.start("aggregator", stateful=True)
    second = await rig.start("aggregator", stateful=True)
    args = {"to": "bob", "text": "hi"}
    token, _ = rig.caller.mint("aggregator", "send_message", args, approval_id="appr-3")
    ok = await rig.caller.call("aggregator", "send_message", args, token=token)
    assert isinstance(ok, Completed)
    used = first if first.counts["ok"] else second
    await used.stop()
    replay = await rig.caller.call("aggregator", "send_message", args, token=token)
    assert isinstance(replay, Refused)
    assert replay.code == "token_replayed"
    assert [c for c in rig.seen.calls if c[0] == "send_message"] == [("send_message", "hi")]


async def test_a_used_jti_is_remembered_by_every_replica_while_its_token_lives(
    connect_as: ConnectAs,
) -> None:
    health = await connect_as("health")
    kv = await health.nc.jetstream(timeout=3).create_key_value(
        bucket=subj.kv_bucket("health"), history=1)
    jti, exp = f"live-{uuid.uuid4().hex}", int(time.time()) + 60
    assert await SingleUseLedger(kv).consume(jti, exp)
    assert not await SingleUseLedger(kv).consume(jti, exp)  # another replica, or a restart
    entry = await kv.get(PREFIX + jti)
    assert entry.value == str(exp).encode()


async def test_a_used_jti_leaves_the_bucket_once_its_token_cannot_verify(
    rig: Rig, connect_as: ConnectAs,
) -> None:
    """The record carries a per-message TTL: the server removes it when the token it
    records is past its expiry, leeway and skew margin; replaying that token then fails
    on its expiry instead."""
    health = await connect_as("health")
    kv = await health.nc.jetstream(timeout=3).create_key_value(
        bucket=subj.kv_bucket("health"), history=1)
    now = int(time.time())
    token, claims = rig.issuer.issue(audience="health", actions=["send_message"],
                                     single_use=True, lifetime_s=60, now=now - 200)
    assert record_ttl(claims.exp, now, retain_s=1) == 1
    assert await SingleUseLedger(kv, retain_s=1).consume(claims.jti, claims.exp)
    await kv.get(PREFIX + claims.jti)

    async def gone() -> bool:
        try:
            await kv.get(PREFIX + claims.jti)
        except nats.js.errors.KeyNotFoundError:
            return True
        return False

    deadline = time.monotonic() + 20
    while not await gone():
        assert time.monotonic() < deadline, "the used-jti record was never removed"
        await asyncio.sleep(0.2)
    with pytest.raises(TokenExpired):
        TokenVerifier(load_identity(rig.broker.secrets, "health").trust.issuer_ring(),
                      issuer="orchestrator").verify(token, audience="health",
                                                    action="send_message")


def test_records_outlive_every_token_they_record() -> None:
    now = time.time()
    for lifetime in (1, 60, MAX_LIFETIME_S):
        exp = int(now) + lifetime
        assert now + record_ttl(exp, now, retain_s=0) > exp + DEFAULT_LEEWAY_S
    assert record_ttl(int(now) + 5, now) == RETAIN_S


async def test_state_update_loses_no_increment_between_two_replicas(rig: Rig) -> None:
    """Two replicas of a stateful agent bump one counter concurrently, each through its own
    connection: every increment lands (compare-and-set on the entry's revision)."""
    first = await rig.start("aggregator", stateful=True)
    second = await rig.start("aggregator", stateful=True)
    key = f"counter-{uuid.uuid4().hex}"
    calls = 0

    def bump(raw: bytes | None) -> bytes:
        nonlocal calls
        calls += 1
        return str(int(raw or b"0") + 1).encode()

    async def writer(service: AgentService) -> None:
        state = service.context.state
        assert state is not None
        for _ in range(30):
            await state.update(key, bump)

    await asyncio.gather(writer(first), writer(second))
    assert first.context.state is not None
    assert await first.context.state.get(key) == b"60"
    assert calls >= 60  # more when a write lost a race and was retried on the newer value


async def test_update_model_reads_changes_and_writes_a_model() -> None:
    state = MemoryState()

    class Tally(BaseModel):
        n: int = 0

    def add(t: Tally | None) -> Tally:
        return Tally(n=(t.n if t else 0) + 2)

    assert (await update_model(state, "t", Tally, add)).n == 2
    assert (await update_model(state, "t", Tally, add)).n == 4
