"""OpenTelemetry across NATS on a real broker: one workflow over three agents is one trace
with the right parent/child links and the same trace id in every audit record; OTLP
export reaches a loopback OTLP/HTTP receiver that parses the protobuf; and a health
workflow leaves no health values in spans or logs unless the operator asks for bodies."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import zlib
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, ClassVar

import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from pydantic import BaseModel
from structlog.testing import capture_logs

from agents.health.agent import agent as health_agent
from agents.health.export_gen import STEPS, WATCH, record, small_export
from agents.runtime import Agent, Context
from agents.runtime.service import AgentService
from broker import subjects as subj
from broker.connection import BrokerClient
from broker.secrets import load_identity
from orchestrator.plan import Catalog, Plan, Step
from orchestrator.service import Orchestrator, WorkflowList
from protocol import admin
from protocol.audit import AuditRecord
from tests.conftest import REPO, ConnectAs, RunningBroker, eventually
from tests.loopback import serve_http

pytestmark = pytest.mark.broker
EXPORTER = InMemorySpanExporter()
STEP_COUNT = 4817  # a figure only the health export holds
DAY = "2024-05-14"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Every span of this process, kept in memory (the global provider is set once)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    if not getattr(provider, "_mas_test_exporter", False):
        provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
        provider._mas_test_exporter = True  # type: ignore[attr-defined]
    EXPORTER.clear()
    yield EXPORTER
    EXPORTER.clear()


class Nothing(BaseModel):
    pass


class Done(BaseModel):
    by: str


def simple_agent(name: str, action: str) -> Agent:
    agent = Agent(name, version="1.0.0", kind="stateless")

    async def handler(args: Nothing, ctx: Context) -> Done:
        return Done(by=name)

    handler.__name__ = action
    agent.action(description=f"{name} test action")(handler)
    return agent


@dataclass
class FixedPlanner:
    """Stands in for the LLM: always proposes the same plan (checked by the registry)."""

    steps: Sequence[Step]
    name: str = "fixed"
    follows_up: bool = False

    async def plan(self, request: str, catalog: Catalog, *,
                   untrusted: Sequence[str] = ()) -> Plan:
        return Plan(summary=request, planner=self.name, steps=list(self.steps))


@dataclass
class Rig:
    broker: RunningBroker
    orch: Orchestrator
    operator: BrokerClient
    agents: list[AgentService]

    async def run(self, request: str) -> WorkflowList:
        reply = await self.operator.request(
            admin.WORKFLOWS_RUN, admin.WorkflowRunRequest(request=request, wait_s=30),
            timeout=40)
        return WorkflowList.model_validate_json(reply.data)

    async def audit(self) -> list[AuditRecord]:
        js = self.operator.nc.jetstream()
        last = (await js.stream_info(subj.AUDIT_STREAM)).state.last_seq
        return [AuditRecord.model_validate_json((await js.get_msg(subj.AUDIT_STREAM, seq=s)).data)
                for s in range(1, last + 1)]


async def start_rig(broker: RunningBroker, connect: ConnectAs, steps: list[Step],
                    services: list[AgentService]) -> Rig:
    orch = Orchestrator(broker.project.policy(), load_identity(broker.secrets, "orchestrator"),
                        broker.url, planner=FixedPlanner(steps))
    await orch.start()
    for service in services:
        await service.start()
    wanted = {(s.agent, s.action) for s in steps}
    await eventually(lambda: wanted <= {(a.agent, a.action) for a in orch.registry.catalog()},
                     timeout=10, what="agents registered")
    return Rig(broker, orch, await connect("operator"), services)


@pytest.fixture
async def three(fresh_broker: RunningBroker, connect_fresh: ConnectAs,
                spans: InMemorySpanExporter) -> AsyncIterator[Rig]:
    steps = [Step(id="a", agent="health", action="daily_summary"),
             Step(id="b", agent="backup", action="check_backups"),
             Step(id="c", agent="notify", action="notify_owner", after=["a", "b"])]
    services = [AgentService(simple_agent(s.agent, s.action),
                             load_identity(fresh_broker.secrets, s.agent), fresh_broker.url)
                for s in steps]
    rig = await start_rig(fresh_broker, connect_fresh, steps, services)
    yield rig
    for service in rig.agents:
        await service.stop()
    await rig.orch.stop()


def one(found: list[ReadableSpan], what: str) -> ReadableSpan:
    assert len(found) == 1, f"{what}: {len(found)} spans ({[s.name for s in found]})"
    return found[0]


def find(spans: Sequence[ReadableSpan], name: str, client: str) -> ReadableSpan:
    return one([s for s in spans if s.name == name
                and (s.attributes or {}).get("messaging.client.id") == client],
               f"{name} by {client}")


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent else None


async def test_a_workflow_over_three_agents_is_one_trace(three: Rig,
                                                         spans: InMemorySpanExporter) -> None:
    [wf] = (await three.run("morning check")).workflows
    assert wf.status == "completed", wf
    finished = spans.get_finished_spans()
    root = find(finished, "request mas.admin.workflows.run", "operator")
    trace_id = root.context.trace_id
    assert root.kind == SpanKind.PRODUCER
    assert root.parent is None
    mine = [s for s in finished if s.context.trace_id == trace_id]
    process = find(mine, "process mas.admin.workflows.run", "orchestrator")
    assert process.kind == SpanKind.CONSUMER
    assert parent_of(process) == root.context.span_id
    for agent, action in [("health", "daily_summary"), ("backup", "check_backups"),
                          ("notify", "notify_owner")]:
        subject = f"mas.agent.{agent}.{action}"
        request = find(mine, f"request {subject}", "orchestrator")
        handled = find(mine, f"process {subject}", agent)
        reply = find(mine, "publish (reply)", agent)
        received = one([s for s in mine if s.name == "receive (reply)"
                        and parent_of(s) == request.context.span_id], f"reply from {agent}")
        assert (request.kind, handled.kind, reply.kind, received.kind) == (
            SpanKind.PRODUCER, SpanKind.CONSUMER, SpanKind.PRODUCER, SpanKind.CONSUMER)
        assert parent_of(request) == process.context.span_id
        assert parent_of(handled) == request.context.span_id
        assert parent_of(reply) == handled.context.span_id
        assert [link.context.span_id for link in received.links] == [reply.context.span_id]
        attrs = dict(handled.attributes or {})
        assert attrs["messaging.system"] == "nats"
        assert attrs["messaging.destination.name"] == subject
        assert attrs["messaging.operation.type"] == "process"
        assert attrs["mas.sender"] == "orchestrator"
        assert dict(request.attributes or {})["messaging.operation.type"] == "send"
        assert dict(received.attributes or {})["messaging.operation.type"] == "receive"
    answer = find(mine, "receive (reply)", "operator")
    assert parent_of(answer) == root.context.span_id
    # every span of the trace hangs off the operator's request
    by_id = {s.context.span_id: s for s in mine}
    for span in mine:
        node = span
        while node.parent is not None:
            node = by_id[node.parent.span_id]
        assert node is root, span.name
    records = [r for r in await three.audit() if r.workflow_id == wf.id]
    assert len(records) >= 8  # plan, 3 x (pending + result), finish
    hex_trace = trace.format_trace_id(trace_id)
    assert {r.trace_id for r in records} == {hex_trace}
    span_ids = {trace.format_span_id(s.context.span_id) for s in mine}
    assert all(r.span_id in span_ids for r in records), [r.span_id for r in records]


class OtlpReceiver(BaseHTTPRequestHandler):
    """A loopback OTLP/HTTP collector: parses each protobuf export request."""

    received: ClassVar[list[ExportTraceServiceRequest]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        elif self.headers.get("Content-Encoding") == "deflate":
            body = zlib.decompress(body)
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        if self.path == "/v1/traces":
            type(self).received.append(request)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()
        self.wfile.write(b"")

    def log_message(self, format: str, *args: Any) -> None:
        pass


PUBLISHER = """
import asyncio, sys
from broker import connection
from broker.secrets import SecretsLayout, load_identity
async def main():
    client = await connection.connect(load_identity(SecretsLayout(__import__('pathlib')
        .Path(sys.argv[1])), "health"), sys.argv[2], max_reconnect_attempts=0)
    await client.publish("mas.event.health.break_due", b'{"steps": 4817}')
    await client.sync()
    await client.close()
asyncio.run(main())
"""


def test_otlp_export_reaches_a_loopback_collector(fresh_broker: RunningBroker) -> None:
    """The real exporter, configured only by OTEL_* variables, in a process of its own."""
    OtlpReceiver.received = []
    with serve_http(OtlpReceiver) as url:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env |= {"OTEL_EXPORTER_OTLP_ENDPOINT": url, "OTEL_SERVICE_NAME": "mas-health-test",
                "PYTHONPATH": str(REPO)}
        done = subprocess.run([sys.executable, "-c", PUBLISHER, str(fresh_broker.secrets.root),
                               fresh_broker.url], env=env, cwd=REPO, capture_output=True,
                              text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
    spans = [(resource, span) for request in OtlpReceiver.received
             for resource in request.resource_spans
             for scope in resource.scope_spans for span in scope.spans]
    [(resource, span)] = [(r, s) for r, s in spans
                          if s.name == "publish mas.event.health.break_due"]
    service = {a.key: a.value.string_value for a in resource.resource.attributes}
    assert service["service.name"] == "mas-health-test"
    attrs = {a.key: a.value for a in span.attributes}
    assert attrs["messaging.system"].string_value == "nats"
    assert attrs["messaging.destination.name"].string_value == "mas.event.health.break_due"
    assert attrs["messaging.operation.type"].string_value == "send"
    assert attrs["messaging.message.body.size"].int_value == len(b'{"steps": 4817}')
    assert "mas.message.body" not in attrs
    assert span.kind == span.SPAN_KIND_PRODUCER
    assert len(span.trace_id) == 16


def test_no_exporter_is_installed_without_an_endpoint() -> None:
    from broker.tracing import export_wanted

    assert export_wanted({}) is None
    assert export_wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}) == "otlp"
    assert export_wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
                          "OTEL_TRACES_EXPORTER": "none"}) is None
    assert export_wanted({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318",
                          "OTEL_SDK_DISABLED": "true"}) is None


def _mentions(text: str, value: int) -> bool:
    return re.search(rf"(?<![0-9A-Za-z]){value}(?![0-9A-Za-z])", text) is not None


def _span_text(spans: Sequence[ReadableSpan]) -> str:
    return json.dumps([{"name": s.name, "attributes": dict(s.attributes or {}),
                        "events": [dict(e.attributes or {}) for e in s.events],
                        "status": s.status.description} for s in spans], default=str)


@pytest.mark.parametrize("bodies", ["", "health"])
async def test_a_health_workflow_leaves_no_health_values_in_spans_or_logs(
        fresh_broker: RunningBroker, connect_fresh: ConnectAs, spans: InMemorySpanExporter,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bodies: str) -> None:
    monkeypatch.setenv("MAS_TRACE_BODIES", bodies)
    small_export(tmp_path / "export.xml", f"{DAY} 21:00:00 -0400", [
        record(STEPS, WATCH, unit="count", start=f"{DAY} 11:55:00 -0400",
               end=f"{DAY} 12:00:00 -0400", value=STEP_COUNT)])
    steps = [Step(id="s", agent="health", action="daily_summary", args={"day": DAY})]
    service = AgentService(health_agent, load_identity(fresh_broker.secrets, "health"),
                           fresh_broker.url, settings={"export_dir": str(tmp_path)})
    with capture_logs() as logs:
        rig = await start_rig(fresh_broker, connect_fresh, steps, [service])
        try:
            [wf] = (await rig.run("how did I do today")).workflows
        finally:
            await service.stop()
            await rig.orch.stop()
    assert wf.status == "completed", wf
    assert wf.steps["s"].output is not None
    assert wf.steps["s"].output["steps"] == STEP_COUNT  # the value really went through
    text = _span_text(spans.get_finished_spans())
    assert "process mas.agent.health.daily_summary" in text
    if bodies:  # the operator asked for health's bodies: the same check finds the value
        assert _mentions(text, STEP_COUNT)
        return
    assert not _mentions(text, STEP_COUNT), "a health value reached a span"
    assert '"steps"' not in text
    assert logs, "nothing was logged: the log check would prove nothing"
    assert not _mentions(json.dumps(logs, default=str), STEP_COUNT), "a health value was logged"
