"""The notify agent against loopback ntfy and webhook receivers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError
from structlog.testing import capture_logs

from agents.notify.agent import agent
from agents.notify.models import NotifyOut
from agents.notify.settings import NotifySettings
from agents.notify.tests.receivers import NTFY_TOKEN, FakeNtfy, FakeWebhook, serve
from agents.runtime import Context
from agents.runtime.testing import serving, without_settings_env, write_token
from protocol.actions import Completed, Failed, Refused
from tests.conftest import ConnectAs, RunningBroker, commander

TOPIC = "mas-owner-7Hq2"
HEALTH_PROPOSAL = {"title": "Time for a break", "message": "You have been sitting a while.",
                   "priority": "high", "tags": ["person_walking", "health"]}


@pytest.fixture
def ntfy() -> Iterator[FakeNtfy]:
    with serve(FakeNtfy(token=NTFY_TOKEN)) as fake:
        yield fake


@pytest.fixture
def webhook() -> Iterator[FakeWebhook]:
    with serve(FakeWebhook()) as fake:
        yield fake


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    return write_token(tmp_path / "ntfy-token", NTFY_TOKEN)


@pytest.fixture(autouse=True)
def _no_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    without_settings_env(monkeypatch, NotifySettings)


def ntfy_settings(ntfy: FakeNtfy, token_file: Path) -> dict[str, str]:
    return {"ntfy_url": ntfy.url, "topic": TOPIC, "token_file": str(token_file),
            "timeout_s": "2"}


async def test_notify_owner_publishes_ntfy_json_with_the_token(
        ntfy: FakeNtfy, token_file: Path) -> None:
    ctx = Context.offline("notify", settings=ntfy_settings(ntfy, token_file))
    out = await agent.invoke("notify_owner", HEALTH_PROPOSAL, ctx)
    assert isinstance(out, NotifyOut)
    assert (out.delivered, out.recipient, out.error) == (True, "owner", None)
    [request] = ntfy.received
    assert (request.method, request.path) == ("POST", "/")
    assert request.headers["authorization"] == f"Bearer {NTFY_TOKEN}"
    assert request.headers["content-type"] == "application/json"
    assert request.json() == {"topic": TOPIC, "title": "Time for a break",
                              "message": "You have been sitting a while.", "priority": 4,
                              "tags": ["person_walking", "health"]}
    [delivery] = out.deliveries
    assert (delivery.channel, delivery.ok, delivery.status) == ("ntfy", True, 200)
    assert delivery.id is not None
    assert len(delivery.id) == 12


@pytest.mark.parametrize(("priority", "level"), [
    ("min", 1), ("low", 2), ("default", 3), ("high", 4), ("urgent", 5)])
async def test_priorities_map_to_ntfy_levels(
        ntfy: FakeNtfy, token_file: Path, priority: str, level: int) -> None:
    ctx = Context.offline("notify", settings=ntfy_settings(ntfy, token_file))
    out = await agent.invoke("notify_owner", {"title": "", "message": "m",
                                              "priority": priority}, ctx)
    assert out.delivered
    body = ntfy.received[0].json()
    assert body["priority"] == level
    assert "title" not in body
    assert "tags" not in body


async def test_any_utf8_title_arrives_intact(ntfy: FakeNtfy, token_file: Path) -> None:
    ctx = Context.offline("notify", settings=ntfy_settings(ntfy, token_file))
    await agent.invoke("notify_owner", {"title": "Pause ☕ — Grüße", "message": "ünïcødé"}, ctx)
    assert ntfy.received[0].json()["title"] == "Pause ☕ — Grüße"


def test_the_input_is_exactly_the_health_agents_shape() -> None:
    with pytest.raises(ValidationError):
        agent.actions["notify_owner"].input_model.model_validate(
            {**HEALTH_PROPOSAL, "priority": "critical"})
    with pytest.raises(ValidationError):
        agent.actions["notify_owner"].input_model.model_validate(
            {**HEALTH_PROPOSAL, "to": "bob"})
    schema = agent.actions["notify_owner"].input_model.model_json_schema()
    assert set(schema["properties"]) == {"title", "message", "priority", "tags"}


async def test_both_channels_get_the_owners_notification(
        ntfy: FakeNtfy, webhook: FakeWebhook, token_file: Path) -> None:
    settings = {**ntfy_settings(ntfy, token_file), "webhook_url": webhook.url + "/hooks/mas"}
    out = await agent.invoke("notify_owner", HEALTH_PROPOSAL,
                             Context.offline("notify", settings=settings))
    assert out.delivered
    assert sorted((d.channel, d.ok) for d in out.deliveries) == \
        [("ntfy", True), ("webhook", True)]
    [hook] = webhook.received
    assert (hook.method, hook.path) == ("POST", "/hooks/mas")
    assert "authorization" not in hook.headers
    assert hook.json() == {"recipient": "owner", "title": "Time for a break",
                           "message": "You have been sitting a while.", "priority": "high",
                           "tags": ["person_walking", "health"], "source": "mas.notify"}


async def test_with_nothing_configured_nothing_is_sent() -> None:
    out = await agent.invoke("notify_owner", HEALTH_PROPOSAL, Context.offline("notify"))
    assert not out.delivered
    assert out.error is not None
    assert out.error.code == "not_configured"
    assert out.error.message.startswith("no delivery channel configured")


async def test_a_server_without_a_topic_is_a_configuration_error(ntfy: FakeNtfy) -> None:
    out = await agent.invoke("notify_owner", HEALTH_PROPOSAL,
                             Context.offline("notify", settings={"ntfy_url": ntfy.url}))
    assert out.error is not None
    assert out.error.code == "not_configured"
    assert "MAS_NOTIFY_TOPIC" in out.error.message
    assert ntfy.received == []


async def test_ntfy_refusals_are_reported_with_ntfys_reason(
        ntfy: FakeNtfy, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("tk_wrong\n")
    ctx = Context.offline("notify", settings={"ntfy_url": ntfy.url, "topic": TOPIC,
                                              "token_file": str(wrong)})
    out = await agent.invoke("notify_owner", HEALTH_PROPOSAL, ctx)
    assert not out.delivered
    [delivery] = out.deliveries
    assert (delivery.ok, delivery.status) == (False, 401)
    assert delivery.error == "the ntfy server answered HTTP 401: unauthorized " \
        "(check the token file)"
    assert out.error is not None
    assert out.error.code == "not_delivered"
    no_token = await agent.invoke("notify_owner", HEALTH_PROPOSAL, Context.offline(
        "notify", settings={"ntfy_url": ntfy.url, "topic": TOPIC}))
    assert no_token.deliveries[0].status == 403
    assert "forbidden" in (no_token.deliveries[0].error or "")


async def test_one_working_channel_is_enough(
        ntfy: FakeNtfy, webhook: FakeWebhook, token_file: Path) -> None:
    webhook.status = 500
    settings = {**ntfy_settings(ntfy, token_file), "webhook_url": webhook.url}
    out = await agent.invoke("notify_owner", HEALTH_PROPOSAL,
                             Context.offline("notify", settings=settings))
    assert out.delivered
    assert out.error is None
    failed = next(d for d in out.deliveries if d.channel == "webhook")
    assert (failed.ok, failed.status) == (False, 500)


async def test_a_slow_server_times_out(token_file: Path) -> None:
    with serve(FakeNtfy(delay_s=1.0)) as slow:
        ctx = Context.offline("notify", settings={"ntfy_url": slow.url, "topic": TOPIC,
                                                  "timeout_s": "0.2"})
        out = await agent.invoke("notify_owner", HEALTH_PROPOSAL, ctx)
    assert not out.delivered
    assert out.deliveries[0].error == "no answer within 0.2s"


async def test_the_topic_and_token_are_never_logged_or_returned(
        ntfy: FakeNtfy, webhook: FakeWebhook, token_file: Path) -> None:
    webhook.status = 502
    settings = {**ntfy_settings(ntfy, token_file), "webhook_url": webhook.url}
    with capture_logs() as logs:
        out = await agent.invoke("notify_owner", HEALTH_PROPOSAL,
                                 Context.offline("notify", settings=settings))
    seen = repr(logs) + out.model_dump_json()
    for secret in (TOPIC, NTFY_TOKEN, ntfy.url, webhook.url, "sitting a while"):
        assert secret not in seen
    assert sorted((e["channel"], e["ok"]) for e in logs if e["event"] == "notify.delivery") == \
        [("ntfy", True), ("webhook", False)]


def contacts(ntfy: FakeNtfy, webhook: FakeWebhook) -> str:
    return json.dumps({"alice": {"kind": "ntfy", "url": f"{ntfy.url}/alice-x1"},
                       "bob": {"kind": "webhook", "url": f"{webhook.url}/bob"}})


async def test_send_message_reaches_a_configured_contact_from_the_environment(
        ntfy: FakeNtfy, webhook: FakeWebhook, token_file: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    ntfy.token = None
    monkeypatch.setenv("MAS_NOTIFY_CONTACTS", contacts(ntfy, webhook))
    ctx = Context.offline("notify")
    alice = await agent.invoke("send_message", {"to": "alice", "title": "Hi",
                                                "message": "Dinner at 7?"}, ctx)
    assert (alice.delivered, alice.recipient) == (True, "alice")
    assert ntfy.received[0].json() == {"topic": "alice-x1", "title": "Hi",
                                       "message": "Dinner at 7?", "priority": 3}
    bob = await agent.invoke("send_message", {"to": "bob", "title": "Hi", "message": "Yo"}, ctx)
    assert bob.delivered
    assert webhook.received[0].path == "/bob"
    assert webhook.received[0].json()["recipient"] == "bob"


async def test_send_message_to_an_unknown_contact_sends_nothing(
        ntfy: FakeNtfy, webhook: FakeWebhook, token_file: Path) -> None:
    settings = {**ntfy_settings(ntfy, token_file), "contacts": contacts(ntfy, webhook)}
    out = await agent.invoke("send_message", {"to": "mallory", "title": "x", "message": "y"},
                             Context.offline("notify", settings=settings))
    assert not out.delivered
    assert out.error is not None
    assert out.error.code == "unknown_contact"
    assert "known: alice, bob" in out.error.message
    assert ntfy.received == webhook.received == []


@pytest.mark.parametrize("to", ["https://attacker.invalid/hook", "bob@example.com", "Bob", ""])
def test_send_message_takes_a_contact_name_never_an_address(to: str) -> None:
    with pytest.raises(ValidationError):
        agent.actions["send_message"].input_model.model_validate(
            {"to": to, "title": "x", "message": "y"})


async def test_a_bad_contacts_setting_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAS_NOTIFY_CONTACTS", '{"alice": {"kind": "ntfy", "url": "ftp://x/t"}}')
    out = await agent.invoke("send_message", {"to": "alice", "title": "x", "message": "y"},
                             Context.offline("notify"))
    assert out.error is not None
    assert out.error.code == "not_configured"
    assert "MAS_NOTIFY_CONTACTS" in out.error.message


@pytest.mark.broker
async def test_the_running_agent_notifies_the_owner_and_gates_other_recipients(
        ntfy: FakeNtfy, webhook: FakeWebhook, token_file: Path,
        broker: RunningBroker, connect_as: ConnectAs) -> None:
    _, caller = await commander(connect_as)
    async with serving(agent, broker.secrets, broker.url, settings={
            **ntfy_settings(ntfy, token_file), "contacts": contacts(ntfy, webhook)}):
        reply = await caller.call("notify", "notify_owner", HEALTH_PROPOSAL)
        assert isinstance(reply, Completed), reply
        assert reply.output["delivered"] is True
        assert ntfy.received[0].json()["topic"] == TOPIC

        args = {"to": "bob", "title": "Hi", "message": "Running late"}
        refused = await caller.call("notify", "send_message", args)
        assert isinstance(refused, Refused)
        assert refused.code == "token_args_mismatch"
        await asyncio.sleep(0.1)
        assert webhook.received == [], "an unapproved message reached its recipient"

        approved = await caller.call("notify", "send_message", args, approval_id="appr-n-1")
        assert isinstance(approved, Completed), approved
        assert approved.output["recipient"] == "bob"
        assert webhook.received[0].json()["message"] == "Running late"

        bad = await caller.call("notify", "notify_owner", {"message": "no title"})
        assert isinstance(bad, Failed)
        assert bad.code == "invalid_input"
