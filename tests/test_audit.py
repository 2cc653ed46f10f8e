"""The audit log on a real broker: `mas audit verify` finds each kind of tampering at the
right record, the broker refuses deletes, purges and out-of-order appends, a rogue
agent's permission violations land in the log under its own identity, and the tail,
export and report commands read the stream as the operator."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import nats.errors
import nats.js.errors
import nkeys
import pytest
from typer.testing import CliRunner

from broker import connection
from broker import subjects as subj
from broker.errors import BrokerError
from broker.secrets import load_identity
from mas.audit_cli import StreamReader, audit_app
from orchestrator import checkpoint as cp
from orchestrator import violations
from orchestrator.audit import DOMAIN, AuditLog
from orchestrator.service import Orchestrator
from protocol.audit import AuditRecord
from security.encoding import b64url_encode, canonical_json
from security.keys import SigningKey
from tests.conftest import RunningBroker

pytestmark = pytest.mark.broker
RECORDS = 32  # with a checkpoint every 10: checkpoints at 11, 22, 33 and 36 on close
TAMPERED = 15
NEW_SEED = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode()


@dataclass
class Written:
    broker: RunningBroker
    export: Path
    checkpoints: Path
    lines: list[bytes]


def cli(broker: RunningBroker, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(audit_app, [*args, "--root", str(broker.project.root)],
                                env={"MAS_BROKER_URL": broker.url, "MAS_AUDIT_CHECKPOINTS": ""})
    if isinstance(result.exception, BrokerError):  # what `mas` prints as one line
        return 1, f"mas: {result.exception}"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


async def write_log(broker: RunningBroker, checkpoints: Path) -> None:
    client = await connection.connect(load_identity(broker.secrets, "orchestrator"), broker.url,
                                      max_reconnect_attempts=0)
    audit = await AuditLog(client, client.material.signing_key, checkpoint_file=checkpoints,
                           checkpoint_every=10).open()
    for i in range(RECORDS):
        await audit.record("command", ["notify", "health", "home"][i % 3], "do_it",
                           "ok" if i % 4 else "refused", workflow_id=f"wf-{i // 5}",
                           detail={"step": f"s{i}"})
    await audit.close()
    await client.close()


@pytest.fixture
def written(fresh_broker: RunningBroker, tmp_path: Path) -> Written:
    checkpoints = tmp_path / "checkpoints.jsonl"
    asyncio.run(write_log(fresh_broker, checkpoints))
    export = tmp_path / "export.jsonl"
    code, output = cli(fresh_broker, "export", "--output", str(export))
    assert code == 0, output
    return Written(fresh_broker, export, checkpoints, export.read_bytes().splitlines())


def verify_copy(w: Written, lines: list[bytes], tmp_path: Path, *options: str
                ) -> tuple[int, str]:
    copy = tmp_path / "tampered.jsonl"
    copy.write_bytes(b"".join(line + b"\n" for line in lines))
    return cli(w.broker, "verify", "--input", str(copy), "--checkpoints", str(w.checkpoints),
               *options)


def resign(raw: bytes, key: SigningKey, **changes: object) -> bytes:
    record = json.loads(raw) | changes
    record.pop("sig")
    record["sig"] = b64url_encode(key.sign(DOMAIN + canonical_json(record)))
    return canonical_json(record)


def test_an_untouched_log_verifies_from_the_stream_and_from_its_export(
        written: Written) -> None:
    assert len(written.lines) == RECORDS + 4
    kinds = [json.loads(line)["kind"] for line in written.lines]
    assert [i + 1 for i, k in enumerate(kinds) if k == "checkpoint"] == [11, 22, 33, 36]
    notes = cp.read_notes(written.checkpoints)
    assert [n.splitlines()[1] for n in notes] == ["10", "21", "32", "35"]
    assert "\n\n\u2014 mas-orchestrator " in notes[0]  # signed-note form
    code, output = cli(written.broker, "verify", "--checkpoints", str(written.checkpoints))
    assert code == 0, output
    assert "audit log verified: 36 records, 4 checkpoints, 4 in" in output
    code, output = cli(written.broker, "verify", "--input", str(written.export),
                       "--checkpoints", str(written.checkpoints), "--json")
    assert code == 0, output
    assert json.loads(output)["ok"] is True
    code, output = cli(written.broker, "verify", "--trust-checkpoints", "--checkpoints",
                       str(written.checkpoints))
    assert code == 0, output


@pytest.mark.parametrize("case", ["changed", "removed", "swapped", "foreign_key",
                                  "foreign_sig_same_kid", "truncated_tail"])
@pytest.mark.attack("delete or rewrite the audit stream",
                    threat="records changed, removed, swapped, re-signed or cut off are found by "
                           "mas audit verify")
def test_tampering_is_found_at_the_right_record(written: Written, tmp_path: Path,
                                                case: str) -> None:
    lines = list(written.lines)
    i = TAMPERED - 1
    expected = TAMPERED
    if case == "changed":
        lines[i] = lines[i].replace(b'"outcome":"ok"', b'"outcome":"error"')
        assert lines[i] != written.lines[i]
    elif case == "removed":
        del lines[i]
    elif case == "swapped":
        lines[i], lines[i + 1] = lines[i + 1], lines[i]
    elif case == "foreign_key":
        lines[i] = resign(lines[i], SigningKey.generate(), outcome="refused")
    elif case == "foreign_sig_same_kid":
        forged = SigningKey.generate()
        kid = json.loads(lines[i])["kid"]
        record = json.loads(lines[i])
        record.pop("sig")
        record["outcome"] = "refused"
        record["sig"] = b64url_encode(forged.sign(DOMAIN + canonical_json(record)))
        assert record["kid"] == kid
        lines[i] = canonical_json(record)
    elif case == "truncated_tail":
        lines = lines[:30]  # cut after checkpoint 22; the file's checkpoints cover 32 and 35
        expected = 31
    # in process, with signature worker processes, and trusting signed checkpoints
    for options in (("--jobs", "1"), ("--jobs", "2"), ("--trust-checkpoints",)):
        code, output = verify_copy(written, lines, tmp_path, *options)
        assert code == 1, output
        assert f"FAILED verification at record {expected}:" in output, (options, output)


def test_without_a_checkpoint_file_a_changed_last_record_still_fails_its_signature(
        written: Written, tmp_path: Path) -> None:
    lines = list(written.lines)
    lines[-1] = lines[-1].replace(b'"kind":"checkpoint"', b'"kind":"system"')
    code, output = cli(written.broker, "verify", "--input", str(tmp_path / "none.jsonl"))
    assert (code, output) == (1, f"mas: {tmp_path / 'none.jsonl'} does not exist; export one "
                              "with `mas audit export`")
    copy = tmp_path / "c.jsonl"
    copy.write_bytes(b"".join(line + b"\n" for line in lines))
    code, output = cli(written.broker, "verify", "--input", str(copy))
    assert code == 1, output
    assert f"FAILED verification at record {RECORDS + 4}:" in output, output


@pytest.mark.attack("delete or rewrite the audit stream",
                    threat="the audit stream deleted, purged, or forked by an out-of-order "
                           "append; the operator writes to it")
async def test_the_broker_refuses_deletes_purges_and_out_of_order_appends(
        fresh_broker: RunningBroker, connect_fresh: object) -> None:
    orch = await connection.connect(load_identity(fresh_broker.secrets, "orchestrator"),
                                    fresh_broker.url, max_reconnect_attempts=0)
    try:
        audit = await AuditLog(orch, orch.material.signing_key).open()
        await audit.record("system", "orchestrator", "start", "info")
        await audit.record("system", "orchestrator", "tick", "info")
        js = orch.nc.jetstream(timeout=1)
        for attempt in (js.delete_stream(subj.AUDIT_STREAM), js.purge_stream(subj.AUDIT_STREAM),
                        js.delete_msg(subj.AUDIT_STREAM, 1)):
            with pytest.raises((nats.errors.TimeoutError, nats.js.errors.Error)):
                await attempt
        for what in ("DELETE", "PURGE", "MSG.DELETE"):
            await fresh_broker.wait_for_log(
                f'Publish Violation - Subject "$JS.API.STREAM.{what}.{subj.AUDIT_STREAM}')
        # a second writer that has not seen the latest record cannot append
        stale = AuditLog(orch, orch.material.signing_key)
        stale.js = orch.nc.jetstream(timeout=5)
        stale.last_seq, stale.head = 1, audit.head
        with pytest.raises(nats.js.errors.APIError) as refused:
            await stale.record("system", "orchestrator", "fork", "info")
        assert "wrong last sequence" in str(refused.value)
        # the operator reads the log but cannot append to it
        operator = await connection.connect(load_identity(fresh_broker.secrets, "operator"),
                                            fresh_broker.url, max_reconnect_attempts=0)
        await operator.nc.publish("mas.audit.system", b"{}")
        await operator.nc.flush()
        await fresh_broker.wait_for_log('Publish Violation - Subject "mas.audit.system"')
        await operator.close()
        info = await orch.nc.jetstream().stream_info(subj.AUDIT_STREAM)
        assert info.state.messages == info.state.last_seq == 2  # nothing deleted, no fork
    finally:
        await audit.close()
        await orch.close()


async def test_a_rogue_agents_violations_are_audited_under_its_own_identity(
        fresh_broker: RunningBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAS_NATS_LOG", str(fresh_broker.server.log_file))
    orch = Orchestrator(fresh_broker.project.policy(),
                        load_identity(fresh_broker.secrets, "orchestrator"), fresh_broker.url)
    await orch.start()
    try:
        assert orch.broker_log is not None
        # the rogue claims to be "home" in its connection name; the server knows better
        rogue = await connection.connect(load_identity(fresh_broker.secrets, "notify"),
                                         fresh_broker.url, name="home", max_reconnect_attempts=0)
        await rogue.nc.publish("mas.agent.home.call_service", b"{}")
        await rogue.nc.subscribe("mas.audit.>")
        await rogue.nc.flush()
        # someone with home's certificate but an nkey the broker does not know
        intruder = dataclasses.replace(load_identity(fresh_broker.secrets, "home"),
                                       nkey_seed=NEW_SEED)
        with pytest.raises(BrokerError, match="Authorization Violation"):
            await connection.connect(intruder, fresh_broker.url, connect_timeout=1,
                                     max_reconnect_attempts=0)

        async def records() -> list[AuditRecord]:
            js = orch.client.nc.jetstream()
            last = (await js.stream_info(subj.AUDIT_STREAM)).state.last_seq
            return [AuditRecord.model_validate_json(
                (await js.get_msg(subj.AUDIT_STREAM, seq=s)).data) for s in range(1, last + 1)]

        found: list[AuditRecord] = []

        async def wait_for(kind: str) -> None:
            for _ in range(100):
                found[:] = [r for r in await records() if r.kind == kind]
                if found:
                    return
                await asyncio.sleep(0.1)
            raise AssertionError(f"no {kind} record in the audit log")

        await wait_for("violation")
        await asyncio.sleep(0.5)  # the subscription violation comes a moment after the publish
        violations = [r for r in await records() if r.kind == "violation"]
        by_subject = {r.detail["subject"]: r for r in violations}
        assert set(by_subject) >= {"mas.agent.home.call_service", "mas.audit.>"}
        for record in by_subject.values():
            assert record.identity == "notify"
            assert record.outcome == "refused"
            assert record.detail["account"] == "AGENT_NOTIFY"
            assert record.detail["nkey"] == load_identity(fresh_broker.secrets,
                                                          "notify").nkey_public
        assert by_subject["mas.agent.home.call_service"].action == "publish"
        assert by_subject["mas.audit.>"].action == "subscribe"
        await wait_for("auth_failure")
        assert (found[0].identity, found[0].action, found[0].outcome) == (
            "unknown", "login", "refused")
        assert found[0].detail["nkey"] == nkeys.from_seed(
            bytearray(NEW_SEED.encode())).public_key.decode()
        await rogue.close()
    finally:
        await orch.stop()


def test_tail_filters_and_report_summarises_the_period(written: Written) -> None:
    code, output = cli(written.broker, "tail", "--agent", "health", "-n", "50", "--json")
    assert code == 0, output
    rows = [json.loads(line) for line in output.splitlines()]
    assert len(rows) == len(range(1, RECORDS, 3))
    assert {r["identity"] for r in rows} == {"health"}
    code, output = cli(written.broker, "tail", "--action", "checkpoint", "-n", "50")
    assert code == 0, output
    assert len(output.splitlines()) == 4
    assert "checkpoint orchestrator checkpoint info" in output
    code, output = cli(written.broker, "report", "--since", "1h", "--checkpoints",
                       str(written.checkpoints))
    assert code == 0, output
    assert "Log integrity: verified: 36 records" in output
    assert "| notify | do_it | ok |" in output
    code, output = cli(written.broker, "report", "--format", "html")
    assert code == 0, output
    assert output.startswith("<!doctype html>")
    code, output = cli(written.broker, "export", "--since", "yesterday-ish")
    assert code == 1
    assert "is not a date or an age" in output, output
    # everything above read the stream with the operator's read-only grants alone
    assert "Violation" not in written.broker.log()


async def test_a_flood_of_violations_cannot_fill_the_audit_log(
        fresh_broker: RunningBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAS_NATS_LOG", str(fresh_broker.server.log_file))
    monkeypatch.setattr(violations, "WINDOW_S", 2.0)
    orch = Orchestrator(fresh_broker.project.policy(),
                        load_identity(fresh_broker.secrets, "orchestrator"), fresh_broker.url)
    await orch.start()
    rogue = await connection.connect(load_identity(fresh_broker.secrets, "notify"),
                                     fresh_broker.url, max_reconnect_attempts=0)
    try:
        flood = 3 * violations.BURST
        for i in range(flood):
            await rogue.nc.publish(f"mas.agent.home.x{i}", b"{}")
        await rogue.nc.flush()
        js = orch.client.nc.jetstream()
        summary: list[AuditRecord] = []
        for _ in range(100):
            last = (await js.stream_info(subj.AUDIT_STREAM)).state.last_seq
            records = [AuditRecord.model_validate_json(
                (await js.get_msg(subj.AUDIT_STREAM, seq=s)).data) for s in range(1, last + 1)]
            summary = [r for r in records if r.action == "suppressed"]
            if summary:
                break
            await asyncio.sleep(0.1)
        kept = [r for r in records if r.kind == "violation" and r.action == "publish"]
        assert len(kept) == violations.BURST
        assert [(r.identity, r.detail["suppressed"]) for r in summary] == [
            ("notify", flood - violations.BURST)]
    finally:
        await rogue.close()
        await orch.stop()


async def test_tail_follow_sees_records_appended_after_it_started(
        fresh_broker: RunningBroker) -> None:
    orch = await connection.connect(load_identity(fresh_broker.secrets, "orchestrator"),
                                    fresh_broker.url, max_reconnect_attempts=0)
    operator = await connection.connect(load_identity(fresh_broker.secrets, "operator"),
                                        fresh_broker.url, max_reconnect_attempts=0)
    audit = await AuditLog(orch, orch.material.signing_key).open()
    try:
        await audit.record("system", "orchestrator", "before", "info")
        seen: list[str] = []

        async def follow() -> None:
            async for _, raw in StreamReader(operator).records(follow=True):
                seen.append(AuditRecord.model_validate_json(raw).action)
                if len(seen) == 2:
                    return

        task = asyncio.create_task(follow())
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.05)
        await audit.record("system", "orchestrator", "after", "info")
        await asyncio.wait_for(task, 10)
        assert seen == ["before", "after"]
    finally:
        await audit.close()
        await operator.close()
        await orch.close()
