"""Control's actions and anomaly alerts reach the audit log through the orchestrator, the
log's one writer, with the identity that announced them; nobody else can announce them."""

from __future__ import annotations

import asyncio
import json

import pytest

from protocol.audit import AuditRecord
from protocol.control import ACTION_EVENT, ControlAction
from tests.conftest import ConnectAs, wait_for_violation
from tests.platform import Platform
from tests.test_orchestrator import audit_records

pytestmark = pytest.mark.broker
ALERT = {"kind": "refusal_burst", "severity": "high", "identity": "home", "ts": 1.0,
         "record_ids": [3, 4], "explanation": {
             "summary": "home was refused 12 times in a minute", "reason": "burst",
             "data": {"count": 12}, "confidence": 0.9}}


async def records_of(platform: Platform, kind: str, count: int) -> list[AuditRecord]:
    found: list[AuditRecord] = []

    async def poll() -> None:
        while len(found) < count:
            found[:] = [r for r in await audit_records(platform.operator) if r.kind == kind]
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), 10)
    return found


async def test_a_control_action_is_audited_with_the_operator_who_asked(
        platform: Platform, connect_fresh: ConnectAs) -> None:
    control = await connect_fresh("control")
    action = ControlAction(agent="notify", action="stop", by="operator", outcome="ok",
                           state="stopped")
    await control.publish(ACTION_EVENT, action.model_dump_json().encode())
    [record] = await records_of(platform, "control", 1)
    assert (record.identity, record.action, record.outcome) == ("operator", "stop", "ok")
    assert record.detail["agent"] == "notify"
    assert record.detail["via"] == "control"


async def test_an_agent_cannot_announce_a_control_action(
        platform: Platform, connect_fresh: ConnectAs) -> None:
    home = await connect_fresh("home")
    forged = ControlAction(agent="notify", action="stop", by="operator", outcome="ok")
    await home.publish(ACTION_EVENT, forged.model_dump_json().encode())
    await wait_for_violation(home, "publish", ACTION_EVENT)
    await asyncio.sleep(0.3)
    assert [r for r in await audit_records(platform.operator) if r.kind == "control"] == []


async def test_alerts_are_audited_with_their_sender_and_summary_and_junk_is_marked(
        platform: Platform, connect_fresh: ConnectAs) -> None:
    anomaly = await connect_fresh("anomaly")
    await anomaly.publish("mas.alert.refusal_burst", json.dumps(ALERT).encode())
    await anomaly.publish("mas.alert.refusal_burst", b"{not json")
    first, junk = await records_of(platform, "alert", 2)
    assert (first.identity, first.action, first.outcome) == ("anomaly", "refusal_burst", "info")
    assert first.detail["summary"] == "home was refused 12 times in a minute"
    assert first.detail["severity"] == "high"
    assert first.payload_sha256 is not None
    assert (junk.outcome, junk.code) == ("error", "malformed")
