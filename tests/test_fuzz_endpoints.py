"""Bad input to every NATS endpoint the orchestrator and an agent serve, sent by the
identity allowed to use it: malformed JSON, wrong types, missing and extra fields, junk
text, huge and deeply nested payloads, unknown ids, garbage envelopes. Every request gets
a typed refusal (or, past the broker's payload limit, the broker's own clear error),
never silence or an ``internal`` error; afterwards the services still serve, the
approval and workflows made before the fuzzing are untouched and the audit log verifies.

One broker, orchestrator and agent serve the whole module (hypothesis runs many examples
per test); the tests run in file order and the last one checks nothing was lost.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError
from structlog.testing import capture_logs

from agents.runtime import Agent, Context
from agents.runtime.service import AgentService
from broker import connection
from broker import subjects as subj
from broker.connection import BrokerClient, reply_binding
from broker.secrets import SecretsLayout, load_identity
from broker.server import NatsServer
from orchestrator import audit_verify
from orchestrator.plan import Plan, Step
from orchestrator.planners import OfflinePlanner
from orchestrator.service import Orchestrator, WorkflowList
from orchestrator.workflows import Workflow
from protocol import admin
from protocol.actions import REPLY, Completed, Failed, Refused
from protocol.approvals import AdminError, Approval, ApprovalList
from protocol.control import ACTION_EVENT
from protocol.explain import Explanation
from protocol.registry import Registration, RegistrationAck
from protocol.tokens import TokenRequest, TokenRequestReply
from security.decisions import sign_decision
from security.envelope import H_KID, H_NONCE, H_SENDER, H_SIG, H_TOKEN, H_TS
from security.keys import SigningKey
from tests.conftest import REPO, RunningBroker, eventually, make_project, start_broker
from tests.platform import start_orchestrator
from tests.test_orchestrator import SEND, audit_records
from tests.test_runtime import NoteIn, Seen, make_agent

pytestmark = [pytest.mark.broker, pytest.mark.asyncio(loop_scope="module")]

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])
REPLY_TIMEOUT_S = 15.0
MAX_PAYLOAD = 1024 * 1024  # policy.yaml's broker.max_payload ("1m")


@dataclass
class Fuzz:
    server: NatsServer
    url: str
    orch: Orchestrator
    agent: AgentService
    operator: BrokerClient
    seen: Seen
    connect: Callable[[str], Any]
    pending: Approval
    waiting: Workflow
    done: Workflow
    secrets: SecretsLayout | None = None
    codes: Counter[str] = field(default_factory=Counter)
    feeders: dict[str, BrokerClient] = field(default_factory=dict)

    async def ask(self, client: BrokerClient, subject: str, data: bytes) -> bytes:
        """Send ``data`` as ``client``; the answer must come, signed by whoever serves it."""
        reply = await client.request(subject, data, timeout=REPLY_TIMEOUT_S)
        server = subject.split(".")[2] if subject.startswith("mas.agent.") else "orchestrator"
        assert reply.sender == server
        return reply.data


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fuzz(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Fuzz]:
    root = tmp_path_factory.mktemp("fuzz")
    project = make_project(root / "project")
    broker = RunningBroker(start_broker(project, root), project)
    server, url = broker.server, broker.url
    clients: list[BrokerClient] = []

    async def connect(identity: str) -> BrokerClient:
        client = await connection.connect(load_identity(project.secrets, identity), url,
                                          max_reconnect_attempts=0)
        clients.append(client)
        return client

    orch = await start_orchestrator(broker, planner=OfflinePlanner(REPO / "workflows"))
    seen = Seen()
    seen.gate.set()  # a fuzzed {"text": "slow"} must not hold a handler forever
    agent = AgentService(make_agent("notify", seen), load_identity(project.secrets, "notify"),
                         url)
    await agent.start()
    await eventually(lambda: len(orch.registry.catalog()) == 2 and agent.registration is not None,
                     timeout=10, what="notify registered and acknowledged")
    operator = await connect("operator")
    waiting = await orch.engine.advance((await orch.engine.submit("before", Plan(
        steps=[SEND], planner="test"))).id)
    assert waiting.status == "waiting_approval"
    done = await orch.engine.advance((await orch.engine.submit("before", Plan(steps=[
        Step(id="s1", agent="notify", action="notify_owner", args={"text": "kept"})],
        planner="test"))).id)
    assert done.status == "completed"
    [pending] = await orch.approvals.find("pending")
    seen.calls.clear()
    state = Fuzz(server, url, orch, agent, operator, seen, connect, pending, waiting, done,
                 secrets=project.secrets)
    try:
        yield state
    finally:
        print(f"\nrefusal codes seen while fuzzing: {dict(state.codes.most_common())}")
        for client in clients:
            client.closing = True
            if not client.nc.is_closed:
                await client.nc.close()
        await agent.stop()
        await orch.stop()
        server.stop()


# --- strategies ------------------------------------------------------------------------------

SCALARS = (st.none() | st.booleans() | st.integers() | st.floats()
           | st.text(max_size=40) | st.sampled_from(["", "0", "-", "ap-", "null", "\u0000",
                                                      "\ud800", "é" * 70, "x" * 600]))
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=4),
    max_leaves=12)


def dumps(value: object) -> bytes:
    """JSON as a careless or hostile client writes it: NaN, Infinity, lone surrogates."""
    return json.dumps(value, allow_nan=True).encode("utf-8", "surrogatepass")


@st.composite
def mutated(draw: st.DrawFn, valid: dict[str, Any]) -> dict[str, Any]:
    """``valid`` with one field retyped, removed or added, at the top or one level down."""
    out: dict[str, Any] = json.loads(json.dumps(valid))
    target: dict[str, Any] = out
    nested = [k for k, v in out.items() if isinstance(v, dict) and v]
    dive: bool = draw(st.booleans())
    if nested and dive:
        target = out[draw(st.sampled_from(sorted(nested)))]
    keys = sorted(target)
    how = draw(st.sampled_from(["retype", "drop", "add"] if keys else ["add"]))
    if how == "retype":
        target[draw(st.sampled_from(keys))] = draw(JSON_VALUES)
    elif how == "drop":
        del target[draw(st.sampled_from(keys))]
    else:
        target[draw(st.text(min_size=1, max_size=12))] = draw(JSON_VALUES)
    return out


def payloads(valid: dict[str, Any]) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=300),
        st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
        JSON_VALUES.map(dumps),
        mutated(valid).map(dumps),
        mutated(valid).map(lambda v: dumps(v)[: max(1, len(dumps(v)) // 2)]),  # cut short
    )


# --- what an answer may be ---------------------------------------------------------------------


def check_admin_answer(fuzz: Fuzz, data: bytes, answer: type[BaseModel]) -> BaseModel:
    """A typed answer or a typed refusal; ``internal`` means an unexpected exception."""
    try:
        error = AdminError.model_validate_json(data)
    except ValidationError:
        return answer.model_validate_json(data)
    fuzz.codes[error.code] += 1
    assert error.code != "internal", error
    assert error.reason
    return error


def check_agent_answer(fuzz: Fuzz, data: bytes) -> Completed | Refused | Failed:
    reply = REPLY.validate_json(data)
    if not isinstance(reply, Completed):
        fuzz.codes[f"agent:{reply.code}"] += 1
        assert reply.code != "handler_error", reply
    return reply


REGISTRATION = Registration(
    agent="notify", version="9.9.9", kind="stateless", instance="fuzz",
    actions=[a.spec() for a in make_agent("notify", Seen()).actions.values()],
).model_dump(mode="json")
TOKEN_REQUEST = TokenRequest(
    agent="notify", action="send_message", args={"to": "bob", "text": "hi"},
    explanation=Explanation(summary="fuzz", confidence=0.5)).model_dump(mode="json")
DECISION = sign_decision(  # by a key nobody trusts, for an approval that does not exist
    SigningKey.generate(), approval_id="ap-0000000000000000", args_sha256="0" * 64,
    decision="approve", reason="fuzz", by="operator").model_dump(mode="json")
# endpoint, who may use it, a valid request to mutate, the answer it gives when not refusing
ORCH_ENDPOINTS: list[tuple[str, str, dict[str, Any], type[BaseModel]]] = [
    (subj.REGISTER, "notify", REGISTRATION, RegistrationAck),
    (subj.TOKEN_REQUEST, "notify", TOKEN_REQUEST, TokenRequestReply),
    (admin.APPROVALS_LIST, "operator", {"status": "pending"}, ApprovalList),
    (admin.APPROVALS_DECIDE, "operator", DECISION, ApprovalList),
    (admin.REVOKE, "operator", {"kind": "jti", "target": "fuzz-jti", "reason": "fuzz"}, admin.Ok),
    (admin.WORKFLOWS_RUN, "operator", {"request": "nothing we know", "wait_s": 0}, WorkflowList),
    (admin.WORKFLOWS_LIST, "operator", {"id": "wf-000000000000"}, WorkflowList),
]
ORCH_IDS = [e[0] for e in ORCH_ENDPOINTS]
AGENT_ACTIONS = [("notify_owner", {"text": "hi"}), ("send_message", {"to": "bob", "text": "hi"})]


def sender(fuzz: Fuzz, identity: str) -> BrokerClient:
    return {"notify": fuzz.agent.client, "operator": fuzz.operator,
            "orchestrator": fuzz.orch.client}[identity]


async def assert_alive(fuzz: Fuzz) -> None:
    """The orchestrator answers the operator and the agent runs a valid command."""
    data = await fuzz.ask(fuzz.operator, admin.WORKFLOWS_LIST, dumps({"id": fuzz.done.id}))
    [wf] = WorkflowList.model_validate_json(data).workflows
    assert (wf.id, wf.status) == (fuzz.done.id, "completed")
    reply = await fuzz.orch.caller.call("notify", "notify_owner", {"text": "alive"}, timeout=15)
    assert reply == Completed(output={"delivered": True, "length": 5})


@pytest.mark.parametrize(("subject", "identity", "valid", "answer"), ORCH_ENDPOINTS, ids=ORCH_IDS)
@FUZZ
@given(data=st.data())
async def test_orchestrator_endpoints_refuse_bad_input_with_a_code(
        fuzz: Fuzz, subject: str, identity: str, valid: dict[str, Any],
        answer: type[BaseModel], data: st.DataObject) -> None:
    payload = data.draw(payloads(valid), label="payload")
    reply = await fuzz.ask(sender(fuzz, identity), subject, payload)
    check_admin_answer(fuzz, reply, answer)


@pytest.mark.parametrize(("action", "valid"), AGENT_ACTIONS, ids=[a for a, _ in AGENT_ACTIONS])
@FUZZ
@given(data=st.data())
async def test_agent_commands_refuse_bad_input_with_a_code(
        fuzz: Fuzz, action: str, valid: dict[str, Any], data: st.DataObject) -> None:
    payload = data.draw(payloads(valid), label="payload")
    before = len(fuzz.seen.calls)
    token, _ = fuzz.orch.caller.mint("notify", action, {})
    reply = check_agent_answer(fuzz, await _command(fuzz, action, payload, token))
    if action == "send_message":  # sensitive: never without an approved, bound token
        assert not isinstance(reply, Completed), reply
        assert len(fuzz.seen.calls) == before


async def _command(fuzz: Fuzz, action: str, payload: bytes, token: str | None) -> bytes:
    reply = await fuzz.orch.client.request(subj.command("notify", action), payload, token=token,
                                           timeout=REPLY_TIMEOUT_S)
    assert reply.sender == "notify"
    return reply.data


@FUZZ
@given(action=st.from_regex(r"[A-Za-z0-9_\-]{1,40}", fullmatch=True),
       token=st.none() | st.text(min_size=1, max_size=300,
                                 alphabet=st.characters(min_codepoint=33, max_codepoint=126)))
async def test_unknown_actions_and_garbage_tokens_are_refused(
        fuzz: Fuzz, action: str, token: str | None) -> None:
    before = len(fuzz.seen.calls)
    reply = check_agent_answer(fuzz, await _command(fuzz, action, b'{"text": "x"}', token))
    assert isinstance(reply, Refused), reply
    assert len(fuzz.seen.calls) == before


HEADER_TEXT = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=120)
ENVELOPE_HEADERS = st.dictionaries(
    st.sampled_from([H_SENDER, H_KID, H_TS, H_SIG, H_TOKEN, "Mas-Other", "traceparent"]),
    HEADER_TEXT, max_size=6)
NONCES = st.from_regex(r"[A-Za-z0-9_\-]{16,32}", fullmatch=True)
ENVELOPE_TARGETS = [(s, i) for s, i, _, _ in ORCH_ENDPOINTS] + [
    (subj.command("notify", a), "orchestrator") for a, _ in AGENT_ACTIONS]


@pytest.mark.parametrize(("subject", "identity"), ENVELOPE_TARGETS,
                         ids=[s for s, _ in ENVELOPE_TARGETS])
@settings(FUZZ, max_examples=25)
@given(headers=ENVELOPE_HEADERS, nonce=NONCES, body=st.binary(max_size=64))
async def test_garbage_envelopes_are_refused_with_the_envelope_code(
        fuzz: Fuzz, subject: str, identity: str, headers: dict[str, str], nonce: str,
        body: bytes) -> None:
    """Unsigned or forged envelopes from a connection that may publish there: the answer
    names the envelope check, and is sealed so it verifies only for that request."""
    client = sender(fuzz, identity)
    raw = await client.nc.request(subject, body, headers={**headers, H_NONCE: nonce},
                                  timeout=5)
    opened = client.open(raw, sealed_for=reply_binding(nonce))
    answer = (REPLY.validate_json(opened.data) if subject.startswith("mas.agent.")
              else AdminError.model_validate_json(opened.data))
    assert not isinstance(answer, Completed), answer
    code = answer.code
    fuzz.codes[f"envelope:{code}"] += 1
    assert code.startswith("envelope_"), code


async def test_a_message_with_no_envelope_at_all_gets_no_answer_and_harms_nothing(
        fuzz: Fuzz) -> None:
    """Without a nonce there is nothing a reply could be bound to: silence, then service."""
    for subject, identity in ENVELOPE_TARGETS:
        with pytest.raises(nats.errors.TimeoutError):
            await sender(fuzz, identity).nc.request(subject, b"{}", timeout=0.5)
    await assert_alive(fuzz)


def deep(depth: int) -> list[bytes]:
    return [b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth,
            b"[" * depth]


@pytest.mark.parametrize(("subject", "identity", "valid", "answer"), ORCH_ENDPOINTS, ids=ORCH_IDS)
async def test_deeply_nested_and_near_limit_payloads_are_refused(
        fuzz: Fuzz, subject: str, identity: str, valid: dict[str, Any],
        answer: type[BaseModel]) -> None:
    near_limit = MAX_PAYLOAD - 16 * 1024  # the envelope headers need the rest
    bodies = [*deep(100_000), b"\xff" * near_limit,
              dumps({**valid, "junk": "x" * (near_limit - len(dumps(valid)) - 20)}),
              dumps({k: "é" * (near_limit // (6 * len(valid)) - 20) for k in valid})]
    for body in bodies:
        assert len(body) <= near_limit
        reply = check_admin_answer(
            fuzz, await fuzz.ask(sender(fuzz, identity), subject, body), answer)
        assert isinstance(reply, AdminError), (subject, body[:40])
        assert reply.code in {"invalid_request", "too_large"}, reply


async def test_deeply_nested_and_near_limit_commands_are_refused(fuzz: Fuzz) -> None:
    near_limit = MAX_PAYLOAD - 16 * 1024
    before = len(fuzz.seen.calls)
    for action, valid in AGENT_ACTIONS:
        token, _ = fuzz.orch.caller.mint("notify", action, {})
        for body in [*deep(100_000), dumps({**valid, "text": "x" * (near_limit - 100)})]:
            reply = check_agent_answer(fuzz, await _command(fuzz, action, body, token))
            assert isinstance(reply, Refused), reply
            assert reply.code == "invalid_input"
    assert len(fuzz.seen.calls) == before


async def test_payloads_over_the_broker_limit_fail_clearly_and_only_for_the_sender(
        fuzz: Fuzz) -> None:
    """Our client refuses, before sending, a message whose body and envelope exceed
    max_payload, and stays connected. A client that sends one anyway (nats-py checks only
    the body) loses its own connection to nats-server, and nobody else notices."""
    client = await fuzz.connect("operator")
    for size in (MAX_PAYLOAD - 200, MAX_PAYLOAD, MAX_PAYLOAD + 1):
        with pytest.raises(connection.MessageTooLarge, match="with its envelope; the broker "
                           f"takes at most {MAX_PAYLOAD}"):
            await client.request(admin.WORKFLOWS_LIST, b"x" * size, timeout=5)
        with pytest.raises(connection.MessageTooLarge):
            await client.publish(admin.WORKFLOWS_LIST, b"x" * size)
    assert client.nc.is_connected
    await client.sync()
    raw = await fuzz.connect("operator")
    headers = raw.sealed_headers(admin.WORKFLOWS_LIST, b"")  # any headers count
    await raw.nc.publish(admin.WORKFLOWS_LIST, b"x" * MAX_PAYLOAD, headers=headers)
    await eventually(lambda: raw.nc.is_closed, timeout=10, what="server closed the sender")
    assert "maximum payload exceeded" in fuzz.server.log_text()
    assert client.nc.is_connected
    await assert_alive(fuzz)


async def test_unknown_ids_are_refused_by_name(fuzz: Fuzz) -> None:
    op = fuzz.operator

    async def refused(subject: str, payload: BaseModel | dict[str, Any]) -> AdminError:
        data = payload.model_dump_json().encode() if isinstance(payload, BaseModel) \
            else dumps(payload)
        reply = check_admin_answer(fuzz, await fuzz.ask(op, subject, data), BaseModel)
        assert isinstance(reply, AdminError), reply
        return reply

    assert (await refused(admin.APPROVALS_LIST, {"id": "ap-doesnotexist00"})).code == \
        "unknown_approval"
    assert (await refused(admin.WORKFLOWS_LIST, {"id": "wf-doesnotexist"})).code == \
        "unknown_workflow"
    signed = sign_decision(fuzz.operator.material.signing_key,
                           approval_id="ap-doesnotexist00", args_sha256="0" * 64,
                           decision="approve", reason="", by="operator")
    assert (await refused(admin.APPROVALS_DECIDE, signed)).code == "unknown_approval"
    assert (await refused(admin.WORKFLOWS_RUN, {"request": "launch the rockets"})).code == \
        "plan_rejected"
    reply = TokenRequestReply.model_validate_json(await fuzz.ask(
        fuzz.agent.client, subj.TOKEN_REQUEST, dumps({**TOKEN_REQUEST, "target": "nobody"})))
    assert reply.status == "denied"
    ack = RegistrationAck.model_validate_json(await fuzz.ask(
        fuzz.agent.client, subj.REGISTER, dumps({**REGISTRATION, "agent": "home"})))
    assert ack.accepted == []
    assert set(ack.rejected) == {"notify_owner", "send_message"}


# Values JSON parsers accept but RFC 8785 cannot sign (NaN, infinities, integers past 2**53,
# lone surrogates), inside otherwise valid arguments: they reach the argument hash.
UNSIGNABLE = [b"NaN", b"Infinity", b"-Infinity", b"123456789012345678901234567890",
              b'"\\ud800"', b"1e400", b'{"\\udfff": 1}']


@pytest.mark.parametrize("value", UNSIGNABLE, ids=[v.decode() for v in UNSIGNABLE])
async def test_unsignable_argument_values_are_refused_not_crashed_on(
        fuzz: Fuzz, value: bytes) -> None:
    before = len(fuzz.seen.calls)
    for args in (b'{"to": "bob", "text": ' + value + b"}",
                 b'{"to": "bob", "text": "hi", "extra": ' + value + b"}"):
        request = (b'{"agent": "notify", "action": "send_message", "args": ' + args
                   + b', "explanation": {"summary": "x", "confidence": 0.5}}')
        data = await fuzz.ask(fuzz.agent.client, subj.TOKEN_REQUEST, request)
        answer = check_admin_answer(fuzz, data, TokenRequestReply)
        assert not isinstance(answer, TokenRequestReply) or answer.status == "denied", answer
    # a hand-made command (the engine itself sends only canonical JSON): the sensitive
    # action cannot hash these arguments, so it refuses; the plain one may run
    token, _ = fuzz.orch.caller.mint("notify", "send_message", {})
    body = b'{"to": "bob", "text": ' + value + b"}"
    reply = check_agent_answer(fuzz, await _command(fuzz, "send_message", body, token))
    assert isinstance(reply, Refused | Failed), reply
    assert len(fuzz.seen.calls) == before
    token, _ = fuzz.orch.caller.mint("notify", "notify_owner", {})
    check_agent_answer(fuzz, await _command(fuzz, "notify_owner", body, token))


ALERT = {"kind": "rate", "severity": "high", "identity": "notify",
         "explanation": {"summary": "too many requests"}}
CONTROL_ACTION = {"agent": "notify", "action": "restart", "by": "operator", "outcome": "ok",
                  "reason": "fuzz"}
FEEDS = [("mas.alert.rate", "anomaly", ALERT), (ACTION_EVENT, "control", CONTROL_ACTION)]


@pytest.mark.parametrize(("subject", "identity", "valid"), FEEDS, ids=[f[0] for f in FEEDS])
@settings(FUZZ, max_examples=40)
@given(data=st.data(), suffix=st.none() | st.from_regex(r"[a-z0-9_\-]{1,200}", fullmatch=True))
async def test_every_alert_and_control_announcement_is_audited_whatever_it_holds(
        fuzz: Fuzz, subject: str, identity: str, valid: dict[str, Any], data: st.DataObject,
        suffix: str | None) -> None:
    """The feeds have no reply: each message, well-formed or not, must become exactly one
    audit record (``malformed`` when it does not parse), never a swallowed exception."""
    client = fuzz.feeders.get(identity) or await fuzz.connect(identity)
    fuzz.feeders[identity] = client
    if suffix is not None and subject.startswith("mas.alert."):
        subject = f"mas.alert.{suffix}"
    payload = data.draw(payloads(valid), label="payload")
    before = fuzz.orch.audit_log.last_seq
    with capture_logs() as logs:
        await client.publish(subject, payload)
        await eventually(lambda: fuzz.orch.audit_log.last_seq > before, timeout=15,
                         what=f"an audit record for a message on {subject}")
    assert not [e for e in logs if e["event"] == "orchestrator.feed_failed"], logs


async def test_an_agent_cannot_silence_the_operators_lists_with_big_requests(
        fuzz: Fuzz) -> None:
    """A token request is capped in size, an agent may have only a few waiting for the
    operator, and list answers stay within one message: a flood of big requests can
    neither make the lists unanswerable nor push the other requests out of them."""
    big = {**TOKEN_REQUEST, "args": {"to": "bob", "text": "x" * (16 * 1024)}}
    data = await fuzz.ask(fuzz.agent.client, subj.TOKEN_REQUEST, dumps(big))
    refusal = check_admin_answer(fuzz, data, TokenRequestReply)
    assert isinstance(refusal, AdminError), refusal
    assert refusal.code == "too_large"
    before = ApprovalList.model_validate_json(await fuzz.ask(
        fuzz.operator, admin.APPROVALS_LIST, dumps({"status": "pending"}))).approvals
    fits = {**TOKEN_REQUEST, "args": {"to": "bob", "text": "x" * (15 * 1024)}}
    replies = [TokenRequestReply.model_validate_json(
        await fuzz.ask(fuzz.agent.client, subj.TOKEN_REQUEST, dumps(fits))) for _ in range(12)]
    mine = [a for a in before if a.requested_by == f"agent:{fuzz.agent.agent.name}"]
    allowed = max(0, 4 - len(mine))
    assert [r.status for r in replies] == ["pending"] * allowed + ["denied"] * (12 - allowed)
    assert "still wait for the operator" in (replies[-1].reason or "")
    listed = ApprovalList.model_validate_json(await fuzz.ask(
        fuzz.operator, admin.APPROVALS_LIST, dumps({"status": "pending"})))
    assert {a.id for a in before} <= {a.id for a in listed.approvals}, "a request was buried"
    answer = check_admin_answer(fuzz, await fuzz.ask(fuzz.operator, admin.WORKFLOWS_LIST,
                                                     dumps({})), WorkflowList)
    assert isinstance(answer, WorkflowList), answer
    await assert_alive(fuzz)
    assert fuzz.seen.calls.count(("send_message", "x" * 15 * 1024)) == 0


class Blob(BaseModel):
    blob: str


async def test_an_output_over_the_broker_limit_comes_back_as_a_failure(fuzz: Fuzz) -> None:
    """An agent whose answer would exceed max_payload says so; the caller does not wait
    for a reply that can never be sent, and the agent keeps serving."""
    big = Agent("home", version="1.0.0", kind="stateless")

    @big.action(description="Answer with as many bytes as asked.")
    async def notify_owner(args: NoteIn, ctx: Context) -> Blob:
        return Blob(blob="x" * int(args.text))

    assert fuzz.secrets is not None
    service = AgentService(big, load_identity(fuzz.secrets, "home"), fuzz.url, register=False)
    await service.start()
    try:
        reply = await fuzz.orch.caller.call("home", "notify_owner", {"text": str(MAX_PAYLOAD)},
                                            timeout=REPLY_TIMEOUT_S)
        assert isinstance(reply, Failed), reply
        assert reply.code == "output_too_large"
        assert "max_payload" in reply.reason
        small = await fuzz.orch.caller.call("home", "notify_owner", {"text": "3"},
                                            timeout=REPLY_TIMEOUT_S)
        assert small == Completed(output={"blob": "xxx"})
    finally:
        await service.stop()


async def test_nothing_was_lost_and_everything_still_works(fuzz: Fuzz) -> None:
    """Runs last: the approval and workflows made before the fuzzing are as they were,
    the approval still works end to end, and the audit chain verifies."""
    orch = fuzz.orch
    assert await orch.approvals.get(fuzz.pending.id) == fuzz.pending
    for before in (fuzz.waiting, fuzz.done):
        after = await orch.engine.load(before.id)
        assert after is not None
        assert after.model_dump(exclude={"updated_at"}) == before.model_dump(
            exclude={"updated_at"})
    assert {(a.agent, a.action) for a in orch.registry.catalog()} == {
        ("notify", "notify_owner"), ("notify", "send_message")}
    await assert_alive(fuzz)
    signed = sign_decision(fuzz.operator.material.signing_key, approval_id=fuzz.pending.id,
                           args_sha256=fuzz.pending.args_sha256, decision="approve",
                           reason="after the fuzzing", by="operator")
    [decided] = ApprovalList.model_validate_json(await fuzz.ask(
        fuzz.operator, admin.APPROVALS_DECIDE, signed.model_dump_json().encode())).approvals
    assert decided.status == "approved"
    await eventually(lambda: ("send_message", "dinner at 8") in fuzz.seen.calls, timeout=15,
                     what="the approved step ran")
    await eventually(lambda: not orch.engine._tasks, timeout=15, what="engine idle")
    assert (await orch.engine.load(fuzz.waiting.id)).status == "completed"  # type: ignore[union-attr]
    assert [c for c in fuzz.seen.calls if c[0] == "send_message"] == \
        [("send_message", "dinner at 8")]
    js = fuzz.operator.nc.jetstream()
    last = (await js.stream_info(subj.AUDIT_STREAM)).state.last_seq
    raws = [(await js.get_msg(subj.AUDIT_STREAM, seq=i)).data or b""
            for i in range(1, last + 1)]
    report = audit_verify.verify(raws, orch.material.trust.sender_rings()["orchestrator"])
    assert report.ok, report.problems
    assert report.records == last
    records = await audit_records(fuzz.operator)
    assert ("approval_decided", "approved") in [(r.kind, r.outcome) for r in records]
