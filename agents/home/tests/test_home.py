"""The home agent against a loopback Home Assistant that answers in HA's own formats."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from pydantic import ValidationError
from structlog.testing import capture_logs

from agents.home.agent import agent, cooldown
from agents.home.classify import classify, explain_call
from agents.home.models import CallServiceOut, GetStateOut, HomeSuggestion, ListStatesOut
from agents.home.settings import HomeSettings
from agents.home.tests.fake_ha import CAMERA_TOKEN, TOKEN, FakeHomeAssistant, serve
from agents.home.tests.real_ha import hass_executable, running
from agents.runtime import Context, Event
from agents.runtime.testing import collect, serving, without_settings_env, write_token
from protocol.actions import Completed, Refused
from tests.conftest import ConnectAs, RunningBroker, commander, eventually


@pytest.fixture
def ha() -> Iterator[FakeHomeAssistant]:
    with serve(FakeHomeAssistant()) as fake:
        yield fake


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    return write_token(tmp_path / "ha-token", TOKEN)


@pytest.fixture(autouse=True)
def _fresh_cooldown(monkeypatch: pytest.MonkeyPatch) -> None:
    cooldown.last.clear()
    without_settings_env(monkeypatch, HomeSettings)


def context(ha: FakeHomeAssistant, token_file: Path | None, **extra: str) -> Context:
    settings = {"url": ha.url, "timeout_s": "2", **extra}
    if token_file is not None:
        settings["token_file"] = str(token_file)
    return Context.offline("home", settings=settings)


async def test_list_states_sends_the_bearer_token_and_returns_every_state(
        ha: FakeHomeAssistant, token_file: Path) -> None:
    out = await agent.invoke("list_states", {}, context(ha, token_file))
    assert isinstance(out, ListStatesOut)
    assert out.error is None
    assert [s.entity_id for s in out.states] == list(ha.states)
    assert (out.total, out.truncated) == (len(ha.states), False)
    [request] = ha.requests
    assert (request.method, request.path) == ("GET", "/api/states")
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    lock = next(s for s in out.states if s.entity_id == "lock.front_door")
    assert lock.state == "locked"
    assert lock.context is not None
    assert lock.context.id == "01HRJ8ZK4C6V5Q8W6T3N2M1P0A"
    assert lock.last_changed.isoformat() == "2024-03-10T07:12:45.031536+00:00"


async def test_camera_access_tokens_never_leave_the_agent(
        ha: FakeHomeAssistant, token_file: Path) -> None:
    out = await agent.invoke("list_states", {"domain": "camera"}, context(ha, token_file))
    [camera] = out.states
    assert "access_token" not in camera.attributes
    assert camera.attributes["entity_picture"] == "/api/camera_proxy/camera.porch"
    assert CAMERA_TOKEN not in out.model_dump_json()


async def test_list_states_filters_by_domain_and_truncates_to_the_reply_budget(
        ha: FakeHomeAssistant, token_file: Path) -> None:
    out = await agent.invoke("list_states", {"domain": "light"}, context(ha, token_file))
    assert [s.entity_id for s in out.states] == ["light.kitchen", "light.desk"]
    for i in range(40):
        ha.states[f"sensor.s{i}"] = {**ha.states["sensor.outside_temperature"],
                                     "entity_id": f"sensor.s{i}",
                                     "attributes": {"friendly_name": "x" * 100}}
    small = await agent.invoke("list_states", {},
                               context(ha, token_file, max_reply_bytes="2048"))
    assert small.truncated
    assert small.total == len(ha.states)
    assert 0 < len(small.states) < small.total
    assert sum(len(s.model_dump_json()) for s in small.states) <= 2048


async def test_get_state_asks_for_the_one_entity(ha: FakeHomeAssistant, token_file: Path) -> None:
    out = await agent.invoke("get_state", {"entity_id": "cover.garage_door"},
                             context(ha, token_file))
    assert isinstance(out, GetStateOut)
    assert out.state is not None
    assert (out.state.entity_id, out.state.state) == ("cover.garage_door", "closed")
    assert out.state.attributes["device_class"] == "garage"
    assert [r.path for r in ha.requests] == ["/api/states/cover.garage_door"]


async def test_an_unknown_entity_is_a_not_found_error(
        ha: FakeHomeAssistant, token_file: Path) -> None:
    out = await agent.invoke("get_state", {"entity_id": "lock.back_door"},
                             context(ha, token_file))
    assert out.state is None
    assert out.error is not None
    assert out.error.code == "not_found"
    assert "lock.back_door" in out.error.message


async def test_a_wrong_token_says_how_to_fix_it_and_is_never_logged(
        ha: FakeHomeAssistant, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token-0451\n")
    with capture_logs() as logs:
        out = await agent.invoke("list_states", {}, context(ha, wrong))
    assert out.error is not None
    assert out.error.code == "unauthorized"
    assert "long-lived access token" in out.error.message
    assert "MAS_HOME_TOKEN_FILE" in out.error.message
    assert ha.requests[0].headers["authorization"] == "Bearer not-the-token-0451"
    assert "not-the-token-0451" not in repr(logs) + out.model_dump_json()
    assert [e["code"] for e in logs if e["event"] == "home.request_failed"] == ["unauthorized"]


async def test_without_a_token_file_nothing_is_sent(ha: FakeHomeAssistant, tmp_path: Path) -> None:
    out = await agent.invoke("list_states", {}, context(ha, None))
    assert out.error is not None
    assert out.error.code == "not_configured"
    assert "MAS_HOME_TOKEN_FILE" in out.error.message
    missing = await agent.invoke("list_states", {}, context(ha, tmp_path / "absent"))
    assert missing.error is not None
    assert missing.error.code == "not_configured"
    assert ha.requests == []


async def test_a_slow_home_assistant_is_a_timeout(ha: FakeHomeAssistant, token_file: Path) -> None:
    ha.delay_s = 1.0
    out = await agent.invoke("get_state", {"entity_id": "light.desk"},
                             context(ha, token_file, timeout_s="0.2"))
    assert out.error is not None
    assert out.error.code == "timeout"
    assert "0.2s" in out.error.message


async def test_nothing_listening_is_unreachable(token_file: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = Context.offline("home", settings={"url": f"http://127.0.0.1:{port}",
                                            "token_file": str(token_file)})
    out = await agent.invoke("list_states", {}, ctx)
    assert out.error is not None
    assert out.error.code == "unreachable"


async def test_a_bad_setting_is_reported_by_its_variable_name(token_file: Path) -> None:
    ctx = Context.offline("home", settings={"url": "ftp://127.0.0.1",
                                            "token_file": str(token_file)})
    out = await agent.invoke("list_states", {}, ctx)
    assert out.error is not None
    assert out.error.code == "not_configured"
    assert "MAS_HOME_URL" in out.error.message


async def test_call_service_posts_the_targets_and_returns_the_changed_states(
        ha: FakeHomeAssistant, token_file: Path) -> None:
    out = await agent.invoke("call_service", {"domain": "lock", "service": "unlock",
                                              "entity_id": ["lock.front_door"]},
                             context(ha, token_file))
    assert isinstance(out, CallServiceOut)
    assert out.error is None
    [request] = ha.requests
    assert (request.method, request.path) == ("POST", "/api/services/lock/unlock")
    assert json.loads(request.body) == {"entity_id": ["lock.front_door"]}
    assert request.headers["content-type"] == "application/json"
    [changed] = out.changed
    assert (changed.entity_id, changed.state) == ("lock.front_door", "unlocked")
    assert changed.context is not None
    assert changed.context.user_id is not None
    assert out.explanation.data["risk"] == "security"
    assert out.explanation.data["high_risk"] is True
    assert "lock.front_door" in out.explanation.summary


async def test_a_call_that_changes_nothing_returns_no_states(
        ha: FakeHomeAssistant, token_file: Path) -> None:
    out = await agent.invoke("call_service", {"domain": "light", "service": "turn_on",
                                              "entity_id": ["light.desk"],
                                              "data": {"brightness_pct": 40}},
                             context(ha, token_file))
    assert out.error is None
    assert out.changed == []
    assert json.loads(ha.requests[0].body) == {"brightness_pct": 40, "entity_id": ["light.desk"]}
    assert out.explanation.data["risk"] == "lighting"
    assert out.explanation.data["data_keys"] == ["brightness_pct"]


async def test_an_unknown_service_is_a_bad_request(ha: FakeHomeAssistant, token_file: Path) -> None:
    out = await agent.invoke("call_service", {"domain": "lock", "service": "explode",
                                              "entity_id": ["lock.front_door"]},
                             context(ha, token_file))
    assert out.error is not None
    assert out.error.code == "bad_request"
    assert "lock.explode" in out.error.message
    assert ha.states["lock.front_door"]["state"] == "locked"


@pytest.mark.parametrize("args", [
    {"domain": "lock/../../api/config", "service": "x"},
    {"domain": "lock", "service": "unlock?x=1"},
    {"domain": "lock", "service": "unlock", "entity_id": ["front door"]},
    {"domain": "lock", "service": "unlock", "data": {"entity_id": "lock.front_door"}},
    {"domain": "lock", "service": "unlock", "data": {"area_id": "house"}},
])
async def test_arguments_that_could_reach_other_paths_or_targets_are_refused(
        ha: FakeHomeAssistant, token_file: Path, args: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        await agent.invoke("call_service", args, context(ha, token_file))
    assert ha.requests == []


def test_domains_are_classified_for_the_explanation() -> None:
    assert classify("lock").risk == "security"
    assert classify("alarm_control_panel").risk == "security"
    assert classify("cover").risk == "access"
    assert classify("script").risk == "automation"
    assert classify("light").risk == "lighting"
    unknown = explain_call("teleporter", "engage", [], {"secret_code": "1234"})
    assert unknown.data["risk"] == "other"
    assert unknown.confidence == 0.5
    assert "1234" not in unknown.model_dump_json()
    garage = explain_call("cover", "open_cover", ["cover.garage_door"], {})
    assert "way into the home" in garage.reason
    assert garage.data["high_risk"] is True


def health_event(topic: str, payload: object) -> Event:
    return Event(f"mas.event.health.{topic}", json.dumps(payload).encode(), "health")


async def test_break_due_becomes_one_suggestion_and_no_call(
        ha: FakeHomeAssistant, token_file: Path) -> None:
    ctx = context(ha, token_file, break_light="light.desk")
    [handler] = agent.events
    assert handler.subject == "mas.event.health.>"
    await handler.handler(health_event("break_due", {"sedentary_minutes": 97,
                                                     "hrv_ms": 41.5}), ctx)
    await handler.handler(health_event("break_due", {"sedentary_minutes": 98}), ctx)
    [(subject, payload)] = ctx.published
    assert subject == "mas.event.home.suggestion"
    assert isinstance(payload, HomeSuggestion)
    proposal = payload.proposal
    assert (proposal.agent, proposal.action) == ("home", "call_service")
    assert proposal.args == {"domain": "light", "service": "turn_on",
                             "entity_id": ["light.desk"], "data": {"flash": "short"}}
    assert proposal.explanation.summary == "Flash light.desk briefly: a break is due"
    assert proposal.explanation.data["trigger"] == "mas.event.health.break_due"
    assert "97" not in payload.model_dump_json()
    assert "41.5" not in payload.model_dump_json()
    assert ha.requests == []


async def test_break_due_may_also_come_as_a_kind_field(
        ha: FakeHomeAssistant, token_file: Path) -> None:
    ctx = context(ha, token_file, break_light="light.desk")
    [handler] = agent.events
    await handler.handler(health_event("proposal", {"kind": "break_due"}), ctx)
    assert [s for s, _ in ctx.published] == ["mas.event.home.suggestion"]


@pytest.mark.parametrize("event", [
    health_event("daily_summary", {"steps": 4000}),
    health_event("proposal", {"kind": "walk"}),
    health_event("proposal", ["break_due"]),
    Event("mas.event.health.proposal", b"\xff not json", "health"),
])
async def test_other_health_events_are_ignored(
        ha: FakeHomeAssistant, token_file: Path, event: Event) -> None:
    ctx = context(ha, token_file, break_light="light.desk")
    await agent.events[0].handler(event, ctx)
    assert ctx.published == []


async def test_without_a_break_light_a_break_is_only_logged(
        ha: FakeHomeAssistant, token_file: Path) -> None:
    ctx = context(ha, token_file)
    with capture_logs() as logs:
        await agent.events[0].handler(health_event("break_due", {}), ctx)
    assert ctx.published == []
    assert [e["reason"] for e in logs if e["event"] == "home.break_ignored"] == \
        ["no MAS_HOME_BREAK_LIGHT"]


@pytest.mark.broker
async def test_the_running_agent_serves_reads_gates_calls_and_suggests(
        ha: FakeHomeAssistant, token_file: Path, broker: RunningBroker,
        connect_as: ConnectAs) -> None:
    orch, caller = await commander(connect_as)
    suggestions = await collect(orch, "mas.event.home.>")
    async with serving(agent, broker.secrets, broker.url, settings={
            "url": ha.url, "token_file": str(token_file), "break_light": "light.kitchen"}):
        reply = await caller.call("home", "get_state", {"entity_id": "lock.front_door"})
        assert isinstance(reply, Completed), reply
        assert reply.output["state"]["state"] == "locked"  # type: ignore[index,call-overload]

        args = {"domain": "lock", "service": "unlock", "entity_id": ["lock.front_door"]}
        refused = await caller.call("home", "call_service", args)
        assert isinstance(refused, Refused)
        assert refused.code == "token_args_mismatch"
        assert [r.method for r in ha.requests] == ["GET"], "an unapproved call reached HA"

        approved = await caller.call("home", "call_service", args, approval_id="appr-home-1")
        assert isinstance(approved, Completed), approved
        assert [(r.method, r.path) for r in ha.requests][-1] == \
            ("POST", "/api/services/lock/unlock")
        assert ha.states["lock.front_door"]["state"] == "unlocked"
        assert approved.output["explanation"]["data"]["risk"] == "security"  # type: ignore[index,call-overload]

        before = len(ha.requests)
        health = await connect_as("health")
        await health.publish("mas.event.health.break_due", b'{"sedentary_minutes": 95}')
        await eventually(lambda: bool(suggestions), timeout=5, what="a home suggestion")
        [msg] = suggestions
        assert (msg.subject, msg.sender) == ("mas.event.home.suggestion", "home")
        suggestion = HomeSuggestion.model_validate_json(msg.data)
        assert suggestion.proposal.args["entity_id"] == ["light.kitchen"]
        await asyncio.sleep(0.2)
        assert len(ha.requests) == before, "a health event made the agent call Home Assistant"


def raw_answers(url: str, token: str) -> list[tuple[int, str, str]]:
    """What a server says to a wrong token, an unknown entity and an unknown service."""
    good = {"Authorization": f"Bearer {token}"}
    answers = [httpx2.get(f"{url}/api/states", headers={"Authorization": "Bearer wrong"}),
               httpx2.get(f"{url}/api/states/lock.back_door", headers=good),
               httpx2.post(f"{url}/api/services/lock/explode", headers=good, json={}),
               httpx2.post(f"{url}/api/services/lock/lock", headers=good, content=b"{bad")]
    return [(r.status_code, r.headers["content-type"], r.text) for r in answers]


@pytest.mark.skipif(hass_executable() is None,
                    reason="Home Assistant is not installed: set MAS_TEST_HASS to the hass "
                           "of a `pip install homeassistant==2024.3.3` venv to run this")
async def test_against_a_real_home_assistant(tmp_path: Path, ha: FakeHomeAssistant) -> None:
    hass = hass_executable()
    assert hass is not None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with running(hass, tmp_path / "hass", port) as real:
        assert raw_answers(real.url, real.token) == raw_answers(ha.url, TOKEN), \
            "the fake answers differently from Home Assistant"
        token_file = tmp_path / "real-token"
        token_file.write_text(real.token)
        ctx = Context.offline("home", settings={"url": real.url, "token_file": str(token_file)})
        listed = await agent.invoke("list_states", {"domain": "input_boolean"}, ctx)
        assert [(s.entity_id, s.state) for s in listed.states] == \
            [("input_boolean.desk_lamp", "off")]
        args = {"domain": "input_boolean", "service": "turn_on",
                "entity_id": ["input_boolean.desk_lamp"]}
        called = await agent.invoke("call_service", args, ctx)
        assert called.error is None
        assert [(s.entity_id, s.state) for s in called.changed] == \
            [("input_boolean.desk_lamp", "on")]
        assert (await agent.invoke("call_service", args, ctx)).changed == []
        missing = await agent.invoke("get_state", {"entity_id": "lock.back_door"}, ctx)
        assert missing.error is not None
        assert missing.error.code == "not_found"
        token_file.write_text("not-a-valid-token")
        refused = await agent.invoke("list_states", {}, ctx)
        assert refused.error is not None
        assert refused.error.code == "unauthorized"
