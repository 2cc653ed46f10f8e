"""The operator dashboard against a real stack: broker (mutual TLS), orchestrator with the
offline planner, a real notify agent, and the dashboard on a free loopback port. HTTP
tests go through httpx2 like a browser would (cookies, forms, headers); one test drives
Debian's Chromium through Playwright and watches an approval appear and go live."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx2
import pytest

from agents.runtime.service import AgentService
from broker import subjects as subj
from broker.connection import BrokerClient
from broker.secrets import load_identity, load_trust
from control.process_backend import ProcessBackend
from control.service import ControlService
from dashboard.login import ensure_secret, secret_path
from dashboard.server import DashboardServer
from orchestrator.planners.offline import OfflinePlanner
from orchestrator.service import Orchestrator
from orchestrator.workflows import Workflow
from protocol.approvals import Approval
from protocol.explain import Explanation
from protocol.registry import Heartbeat
from protocol.tokens import TokenRequest, TokenRequestReply
from security.decisions import verify_decision
from tests.conftest import ConnectAs, RunningBroker, free_port, wait_for_violation
from tests.test_cli import env as cli_env
from tests.test_cli import read_until
from tests.test_runtime import Seen, make_agent

pytestmark = pytest.mark.broker
T = TypeVar("T")
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
WORKFLOWS = {
    "message-bob": """
name: message-bob
description: Tell Bob about dinner (waits for approval).
triggers: [{manual: true}]
steps:
  - {id: send, agent: notify, action: send_message, args: {to: bob, text: dinner at 8}}
""",
    "note-owner": """
name: note-owner
description: Leave the owner a note.
triggers: [{manual: true}]
steps:
  - {id: note, agent: notify, action: notify_owner, args: {text: hello}}
""",
}
# a stand-in agent process for control to supervise: says hello, then idles
IDLER = [sys.executable, "-u", "-c",
         "import os, time; print('hello from', os.getpid()); time.sleep(600)"]
CSRF_FIELD = re.compile(r'name="csrf" value="([^"]+)"')
CSRF_META = re.compile(r'name="csrf-token" content="([^"]+)"')


@dataclass
class Stack:
    broker: RunningBroker
    orch: Orchestrator
    agent: AgentService
    seen: Seen
    dashboard: DashboardServer
    secret: str

    @property
    def url(self) -> str:
        return self.dashboard.url.rstrip("/")

    async def workflow(self, workflow_id: str) -> Workflow:
        wf = await self.orch.engine.load(workflow_id)
        assert wf is not None
        return wf

    async def approval(self, approval_id: str) -> Approval:
        return await self.orch.approvals.get(approval_id)


@pytest.fixture
async def stack(fresh_broker: RunningBroker, connect_fresh: ConnectAs, tmp_path: Path
                ) -> AsyncIterator[Stack]:
    flows = tmp_path / "workflows"
    flows.mkdir()
    for name, text in WORKFLOWS.items():
        (flows / f"{name}.yaml").write_text(text)
    policy = fresh_broker.project.policy()
    orch = Orchestrator(policy, load_identity(fresh_broker.secrets, "orchestrator"),
                        fresh_broker.url, planner=OfflinePlanner(flows))
    await orch.start()
    seen = Seen()
    agent = AgentService(make_agent("notify", seen), load_identity(fresh_broker.secrets, "notify"),
                         fresh_broker.url, heartbeat_s=1.0)
    await agent.start()
    server = DashboardServer(
        fresh_broker.project, fresh_broker.url, port=0,
        monitor=fresh_broker.server.monitor_url(policy.broker.monitor), interval_s=0.3,
        failed_login_delay_s=0.3)
    await server.start()
    secret = ensure_secret(fresh_broker.project.secrets).value
    for _ in range(200):  # until notify's actions are in the orchestrator's catalog
        if orch.registry.catalog().get("notify", "send_message") is not None:
            break
        await asyncio.sleep(0.05)
    yield Stack(fresh_broker, orch, agent, seen, server, secret)
    seen.gate.set()
    await server.stop()
    await agent.stop()
    await orch.stop()


def state_of(control: ProcessBackend, agent: str) -> str:
    return str(control.children[agent].state)


@pytest.fixture
async def control(stack: Stack, tmp_path: Path) -> AsyncIterator[ProcessBackend]:
    """The control service in local mode, supervising a stand-in ``health`` process."""
    backend = ProcessBackend({"health": IDLER}, env=dict(os.environ), cwd=tmp_path,
                             logs_dir=tmp_path / "logs", stop_timeout_s=5)
    service = ControlService(stack.broker.project.policy(),
                             load_identity(stack.broker.secrets, "control"), stack.broker.url,
                             backend)
    await service.start()
    await backend.start_all()
    try:
        yield backend
    finally:
        await service.stop()
        await backend.close()


async def agent_state(http: httpx2.AsyncClient, name: str) -> str:
    snap = (await http.get("/api/snapshot")).json()
    [agent] = [a for a in snap["agents"] if a["name"] == name]
    return f"{agent['state']} via {agent['source']}"


async def login(http: httpx2.AsyncClient, secret: str) -> str:
    """Log in like the form does; returns the session's CSRF token from the page."""
    form = await http.get("/login")
    token = CSRF_FIELD.search(form.text)
    assert token, form.text
    answer = await http.post("/login", data={"csrf": token[1], "secret": secret})
    assert answer.status_code == 303, answer.text
    page = await http.get("/")
    assert page.status_code == 200
    found = CSRF_META.search(page.text)
    assert found
    return found[1]


def client(stack: Stack) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(base_url=stack.url, follow_redirects=False, timeout=30,
                              trust_env=False)


async def wait_for(what: str, check: Callable[[], Awaitable[T]], timeout: float = 20.0) -> T:
    """Poll the async ``check`` until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} not seen within {timeout}s")
        await asyncio.sleep(0.1)


async def pending_in_snapshot(http: httpx2.AsyncClient) -> list[dict[str, Any]]:
    snap = (await http.get("/api/snapshot")).json()
    approvals: list[dict[str, Any]] = snap["approvals"]
    return approvals


async def start_message_bob(http: httpx2.AsyncClient, csrf: str) -> dict[str, object]:
    answer = await http.post("/api/workflows/run", json={"request": "message-bob"},
                             headers={"X-CSRF-Token": csrf})
    assert answer.status_code == 200, answer.text
    wf: dict[str, object] = answer.json()
    assert wf["status"] in ("running", "waiting_approval"), wf
    return wf


# --- login, sessions, CSRF ---------------------------------------------------------------

async def test_login_secret_file_is_private_and_never_replaced(stack: Stack) -> None:
    path = secret_path(stack.broker.project.secrets)
    assert path.stat().st_mode & 0o777 == 0o600
    again = ensure_secret(stack.broker.project.secrets)
    assert (again.value, again.created) == (stack.secret, False)


async def test_without_a_session_every_page_and_api_call_is_refused(stack: Stack) -> None:
    async with client(stack) as http:
        page = await http.get("/")
        assert page.status_code == 303
        assert page.headers["location"] == "/login"
        for path in ("/api/snapshot", "/api/events", "/api/agents/notify/logs"):
            assert (await http.get(path)).status_code == 401, path
        for path in ("/api/approvals/abcdefgh12/approve", "/api/revoke", "/api/workflows/run",
                     "/api/agents/notify/stop", "/logout"):
            assert (await http.post(path, json={})).status_code == 401, path
        http.cookies.set("mas_session", "not-a-session")
        assert (await http.get("/api/snapshot")).status_code == 401


async def test_a_wrong_secret_gets_401_and_no_session(stack: Stack) -> None:
    async with client(stack) as http:
        form = await http.get("/login")
        token = CSRF_FIELD.search(form.text)
        assert token
        wrong = await http.post("/login", data={"csrf": token[1], "secret": stack.secret + "x"})
        assert wrong.status_code == 401
        assert "Wrong secret" in wrong.text
        assert "mas_session" not in wrong.headers.get("set-cookie", "")
        assert (await http.get("/api/snapshot")).status_code == 401
        # the login form's own token is checked too
        no_token = await http.post("/login", data={"secret": stack.secret})
        assert no_token.status_code == 403


async def test_session_cookie_is_httponly_and_samesite_strict(stack: Stack) -> None:
    async with client(stack) as http:
        form = await http.get("/login")
        token = CSRF_FIELD.search(form.text)
        assert token
        answer = await http.post("/login", data={"csrf": token[1], "secret": stack.secret})
        assert answer.status_code == 303
        [cookie] = [c for c in answer.headers.get_list("set-cookie")
                    if c.startswith("mas_session=")]
        flags = [part.strip().lower() for part in cookie.split(";")]
        assert "httponly" in flags
        assert "samesite=strict" in flags
        assert "path=/" in flags
        assert "secure" not in flags  # plain http on loopback: a Secure cookie would not return
        page = await http.get("/")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert page.headers["x-frame-options"] == "DENY"
        for asset in ("/static/app.js", "/static/app.css"):
            assert (await http.get(asset)).status_code == 200
        assert "http" not in re.sub(r'"/[^"]*"', "", page.text.split("<body>")[0]).replace(
            "http-equiv", "")  # no asset from anywhere else


async def test_a_request_for_another_host_name_is_refused(stack: Stack) -> None:
    async with client(stack) as http:
        rebound = await http.get("/login", headers={"Host": "attacker.example"})
        assert rebound.status_code == 400


async def test_without_the_csrf_token_nothing_changes(stack: Stack) -> None:
    async with client(stack) as http:
        csrf = await login(http, stack.secret)
        wf = await start_message_bob(http, csrf)
        [approval] = await wait_for("pending approval", lambda: pending_in_snapshot(http))
        url = f"/api/approvals/{approval['id']}/approve"
        missing = await http.post(url, json={"reason": "forged"})
        assert missing.status_code == 403
        assert "missing CSRF" in missing.json()["error"]
        wrong = await http.post(url, json={"reason": "forged"},
                                headers={"X-CSRF-Token": csrf[:-2] + "xx"})
        assert wrong.status_code == 403
        assert "wrong CSRF" in wrong.json()["error"]
        cross = await http.post(url, json={"reason": "forged"},
                                headers={"X-CSRF-Token": csrf, "Origin": "http://evil.example"})
        assert cross.status_code == 403
        as_form = await http.post(url, data={"csrf": "nope"})
        assert as_form.status_code == 403
        kill = await http.post("/api/revoke", json={"kind": "agent", "target": "notify"})
        assert kill.status_code == 403
        await asyncio.sleep(1.0)  # give a wrongly accepted decision time to land
        assert (await stack.approval(str(approval["id"]))).status == "pending"
        assert (await stack.workflow(str(wf["id"]))).status == "waiting_approval"
        assert stack.seen.calls == []
        assert stack.orch.revocations.revocations.entries() == []


# --- approvals through the dashboard ----------------------------------------------------

async def test_approve_signs_with_the_operator_key_and_the_step_runs(stack: Stack) -> None:
    async with client(stack) as http:
        csrf = await login(http, stack.secret)
        wf = await start_message_bob(http, csrf)
        [shown] = await wait_for("pending approval", lambda: pending_in_snapshot(http))
        assert shown["args"] == {"to": "bob", "text": "dinner at 8"}
        assert shown["explanation"]["summary"]
        answer = await http.post(f"/api/approvals/{shown['id']}/approve",
                                 json={"reason": "fine by me"}, headers={"X-CSRF-Token": csrf})
        assert answer.status_code == 200, answer.text
        assert answer.json()["status"] == "approved"

        async def completed() -> bool:
            return (await stack.workflow(str(wf["id"]))).status == "completed"

        await wait_for("workflow completed", completed)
        assert stack.seen.calls == [("send_message", "dinner at 8")]
        stored = await stack.approval(str(shown["id"]))
        assert stored.decision is not None
        assert stored.decision.decision == "approve"
        assert stored.decision.by == "operator"
        assert stored.decision.reason == "fine by me"
        assert stored.decision.args_sha256 == stored.args_sha256
        operator = load_identity(stack.broker.secrets, "operator").signing_key
        assert stored.decision.kid == operator.kid
        verify_decision(stored.decision, load_trust(stack.broker.secrets).approver_ring())
        again = await http.post(f"/api/approvals/{shown['id']}/approve", json={},
                                headers={"X-CSRF-Token": csrf})
        assert again.status_code == 409  # single use: no second decision


async def test_deny_records_the_reason_and_the_step_never_runs(stack: Stack) -> None:
    async with client(stack) as http:
        csrf = await login(http, stack.secret)
        wf = await start_message_bob(http, csrf)
        [shown] = await wait_for("pending approval", lambda: pending_in_snapshot(http))
        answer = await http.post(f"/api/approvals/{shown['id']}/deny",
                                 json={"reason": "not tonight"}, headers={"X-CSRF-Token": csrf})
        assert answer.status_code == 200, answer.text
        assert answer.json()["status"] == "denied"

        async def failed() -> Workflow | None:
            done = await stack.workflow(str(wf["id"]))
            return done if done.status == "failed" else None

        done = await wait_for("workflow failed", failed)
        assert done is not None
        assert done.steps["send"].code == "approval_denied"
        assert "not tonight" in done.steps["send"].reason
        stored = await stack.approval(str(shown["id"]))
        assert stored.status == "denied"
        assert stored.decision is not None
        assert stored.decision.reason == "not tonight"
        assert stack.seen.calls == []


# --- other controls and the live feed -------------------------------------------------------

async def test_kill_switch_from_the_dashboard_refuses_the_agents_next_command(
        stack: Stack) -> None:
    async with client(stack) as http:
        csrf = await login(http, stack.secret)
        kill = await http.post("/api/revoke", headers={"X-CSRF-Token": csrf},
                               json={"kind": "agent", "target": "notify", "reason": "test"})
        assert kill.status_code == 200, kill.text
        assert kill.json()["detail"] == "revoked agent notify"
        await asyncio.sleep(0.5)  # the broadcast reaches the agent (it also checks the snapshot)
        run = await http.post("/api/workflows/run", json={"request": "note-owner"},
                              headers={"X-CSRF-Token": csrf})
        assert run.status_code == 200, run.text

        async def finished() -> Workflow | None:
            wf = await stack.workflow(run.json()["id"])
            return wf if wf.finished else None

        wf = await wait_for("workflow finished", finished)
        assert wf is not None
        assert wf.status == "failed"
        assert wf.steps["note"].status == "refused", wf.steps["note"]
        assert stack.seen.calls == []
        bad = await http.post("/api/revoke", headers={"X-CSRF-Token": csrf},
                              json={"kind": "agent", "target": "no such"})
        assert bad.status_code == 400
        assert "target" in bad.json()["error"]


async def test_the_live_feed_shows_agents_throughput_audit_and_alerts(
        stack: Stack, connect_fresh: ConnectAs) -> None:
    anomaly: BrokerClient = await connect_fresh("anomaly")
    alert = {"kind": "refusal_burst", "severity": "high", "identity": "notify", "ts": 1.0,
             "record_ids": [3],
             "explanation": {"summary": "notify was refused 9 times in a minute",
                             "reason": "more than the usual", "data": {"refusals": 9},
                             "confidence": 0.8}}
    async with client(stack) as http:
        await login(http, stack.secret)

        async def full() -> dict[str, Any] | None:
            await anomaly.publish("mas.alert.refusal_burst", json.dumps(alert).encode())
            snap: dict[str, Any] = (await http.get("/api/snapshot")).json()
            agents = {a["name"]: a for a in snap["agents"]}
            ready = (agents["notify"]["state"] == "running" and len(snap["rates"]) >= 2
                     and snap["audit"] and snap["alerts"])
            return snap if ready else None

        snap = await wait_for("a full snapshot", full)
        assert snap is not None
        agents = {a["name"]: a for a in snap["agents"]}
        assert set(agents) == set(stack.broker.project.policy().agents)
        assert agents["notify"]["version"] == "9.9.9"
        assert agents["health"]["state"] == "unknown"  # never sent a heartbeat
        assert snap["rates"][-1]["connections"] >= 3  # orchestrator, notify, dashboard
        kinds = {r["kind"] for r in snap["audit"]}
        assert "registration" in kinds
        assert all("sig" not in r for r in snap["audit"])
        shown = snap["alerts"][0]
        assert (shown["sender"], shown["severity"]) == ("anomaly", "high")
        assert shown["summary"] == "notify was refused 9 times in a minute"
        assert snap["control"] is False  # no control service in this stack

        # traffic moves the rates: messages nobody subscribes to still count as "in"
        operator = await connect_fresh("operator")
        baseline = max(r["in_msgs"] for r in snap["rates"])

        async def busy() -> bool:
            for _ in range(2000):
                await operator.nc.publish("mas.admin.noise", b"x" * 100)
            await operator.nc.flush()
            rates = (await http.get("/api/snapshot")).json()["rates"]
            return any(r["in_msgs"] > baseline + 500 for r in rates[-3:])

        await wait_for("the message rate going up", busy)

        async with http.stream("GET", "/api/events") as events:
            assert events.headers["content-type"].startswith("text/event-stream")
            lines = events.aiter_lines()
            async for line in lines:
                if line.startswith("data: "):
                    assert "agents" in json.loads(line[6:])
                    break


async def test_stop_start_and_logs_go_through_control(
        stack: Stack, control: ProcessBackend) -> None:
    async with client(stack) as http:
        csrf = await login(http, stack.secret)

        async def health_is(state: str) -> bool:
            return await agent_state(http, "health") == f"{state} via control"

        await wait_for("health running", lambda: health_is("running"))
        refused = await http.post("/api/agents/health/stop")
        assert refused.status_code == 403
        await asyncio.sleep(0.5)
        assert state_of(control, "health") == "running"

        stopped = await http.post("/api/agents/health/stop", headers={"X-CSRF-Token": csrf})
        assert stopped.status_code == 200, stopped.text
        assert stopped.json()["state"] == "stopped"
        assert state_of(control, "health") == "stopped"
        await wait_for("health stopped", lambda: health_is("stopped"))
        started = await http.post("/api/agents/health/start", headers={"X-CSRF-Token": csrf})
        assert started.json()["state"] == "running"
        await wait_for("health running again", lambda: health_is("running"))

        async def hello() -> bool:
            logs = await http.get("/api/agents/health/logs")
            assert logs.status_code == 200, logs.text
            return any("hello from" in line for line in logs.json()["lines"])

        await wait_for("health's log", hello)
        unknown = await http.post("/api/agents/nobody/stop", headers={"X-CSRF-Token": csrf})
        assert unknown.status_code == 409
        assert "not an agent" in unknown.json()["error"]
        bad = await http.post("/api/agents/health/explode", headers={"X-CSRF-Token": csrf})
        assert bad.status_code == 404


async def test_after_logout_the_session_and_its_token_are_dead(stack: Stack) -> None:
    async with client(stack) as http:
        csrf = await login(http, stack.secret)
        session = http.cookies.get("mas_session")
        out = await http.post("/logout", data={"csrf": csrf})
        assert out.status_code == 303
        assert out.headers["location"] == "/login"
        http.cookies.set("mas_session", session or "")
        assert (await http.get("/api/snapshot")).status_code == 401
        again = await http.post("/api/revoke", headers={"X-CSRF-Token": csrf},
                                json={"kind": "agent", "target": "notify"})
        assert again.status_code == 401
        assert stack.orch.revocations.revocations.entries() == []


async def test_an_agent_cannot_speak_for_another_in_its_heartbeat(
        stack: Stack, connect_fresh: ConnectAs) -> None:
    notify = await connect_fresh("notify")

    def beat(agent: str, version: str) -> Heartbeat:
        return Heartbeat(agent=agent, instance="x", version=version, kind="stateless",
                         ts=time.time(), uptime_s=1.0)

    await notify.publish("mas.heartbeat.notify", beat("health", "6.6.6"))  # on its own subject
    await notify.publish("mas.heartbeat.health", beat("health", "6.6.6"))  # broker refuses
    await wait_for_violation(notify, "publish", "mas.heartbeat.health")
    await notify.publish("mas.heartbeat.notify", beat("notify", "7.7.7"))  # after both, in order
    async with client(stack) as http:
        await login(http, stack.secret)

        async def agents() -> dict[str, dict[str, Any]] | None:
            snap = (await http.get("/api/snapshot")).json()
            found = {a["name"]: a for a in snap["agents"]}
            return found if found["notify"]["version"] == "7.7.7" else None

        seen = await wait_for("notify's own heartbeat", agents)
        assert seen is not None
        assert seen["health"]["state"] == "unknown"
        assert seen["health"]["version"] == ""


# --- the command ------------------------------------------------------------------------------

# `mas dashboard` until mas/cli.py registers it; the same typer app either way
DASHBOARD_CMD = [sys.executable, "-c",
                 "import sys; from mas.dashboard_cli import dashboard_app; dashboard_app()"]


def test_dashboard_url_prints_the_address_and_the_login_secret(fresh_broker: RunningBroker
                                                                ) -> None:
    root = fresh_broker.project.root
    shown = subprocess.run([*DASHBOARD_CMD, "--url", "--root", str(root), "--port", "9123"],
                           env=cli_env(), capture_output=True, text=True, timeout=60,
                           check=False)
    assert shown.returncode == 0, shown.stderr
    secret = ensure_secret(fresh_broker.project.secrets)
    assert shown.stdout.splitlines()[:2] == ["http://127.0.0.1:9123/",
                                             f"login secret: {secret.value}"]
    assert not secret.created


async def test_dashboard_run_serves_until_interrupted(fresh_broker: RunningBroker) -> None:
    port = free_port()
    proc = subprocess.Popen(  # noqa: ASYNC220 (reads happen in a thread)
        [*DASHBOARD_CMD, "run", "--root", str(fresh_broker.project.root), "--port", str(port),
         "--monitor", "http://127.0.0.1:9"],
        env={**cli_env(), "MAS_BROKER_URL": fresh_broker.url}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        ready = await asyncio.to_thread(read_until, proc, lines, "dashboard at", 60)
        assert ready, (lines, proc.poll())
        async with httpx2.AsyncClient(trust_env=False) as http:
            page = await http.get(f"http://127.0.0.1:{port}/login")
            assert page.status_code == 200
            assert "Login secret" in page.text
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.to_thread(proc.communicate, timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "dashboard stopped" in out
    secret = ensure_secret(fresh_broker.project.secrets).value
    assert secret not in out + err + "".join(lines)  # the secret never reaches the output


# --- a real browser -------------------------------------------------------------------------

def _browser_or_skip() -> None:
    problem = None
    if shutil.which("chromium") is None and not CHROMIUM.exists():
        problem = "Debian's chromium is not installed (apt-get install -y chromium)"
    else:
        try:
            import playwright.async_api  # noqa: F401
        except ImportError:
            problem = "the playwright package is not installed (pip install playwright)"
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(f"browser test cannot run in CI: {problem}")
        pytest.skip(problem)


@contextlib.asynccontextmanager
async def logged_in_page(stack: Stack) -> AsyncIterator[Any]:
    """A Chromium page logged in to the dashboard through its login form."""
    _browser_or_skip()
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1440, "height": 900})
            await page.goto(f"{stack.url}/")
            assert page.url.endswith("/login")
            await page.fill("#secret", stack.secret)
            await page.click("#login")
            await page.wait_for_url(f"{stack.url}/")
            await page.wait_for_selector("#live.on", timeout=20_000)
            yield page
        finally:
            await browser.close()


async def screenshots(tmp_path: Path) -> Path:
    """Where screenshots go: $MAS_SCREENSHOTS, else the test's own folder."""
    shots = Path(os.environ.get("MAS_SCREENSHOTS", tmp_path / "screenshots"))
    await asyncio.to_thread(shots.mkdir, parents=True, exist_ok=True)
    return shots


async def test_in_chromium_an_approval_appears_live_and_approving_completes_it(
        stack: Stack, tmp_path: Path) -> None:
    shots = await screenshots(tmp_path)
    async with logged_in_page(stack) as page:
        await page.wait_for_selector('#agents tr[data-agent="notify"] .state.running',
                                     timeout=20_000)
        await page.evaluate("window.__sameDocument = true")
        assert await page.locator(".approval").count() == 0

        planner = stack.orch.planner
        assert planner is not None
        plan = await planner.plan("message-bob", stack.orch.registry.catalog())
        wf = await stack.orch.engine.submit("message-bob", plan)
        stack.orch.engine.start(wf.id)
        card = page.locator(".approval")
        await card.wait_for(timeout=20_000)  # arrived over SSE, no reload
        assert "send_message" in await card.inner_text()
        assert '"dinner at 8"' in await card.locator("pre.args").inner_text()
        await page.screenshot(path=str(shots / "approval-pending.png"), full_page=True)

        await card.locator('input[data-role="reason"]').fill("ok from the browser")
        await card.locator("button.approve").click()
        await card.wait_for(state="detached", timeout=20_000)
        await page.wait_for_selector(f'#workflows tr[data-id="{wf.id}"] .state.completed',
                                     timeout=20_000)
        assert await page.evaluate("window.__sameDocument === true")  # never reloaded

        # an agent's own words are shown as text, never run as markup
        hostile = '<img src=x onerror="window.__pwned=1">Bob <b>must</b> know'
        request = TokenRequest(agent="notify", action="send_message",
                               args={"to": "bob", "text": "<script>window.__pwned=2</script>"},
                               explanation=Explanation(summary=hostile, reason=hostile,
                                                       confidence=0.4))
        reply = await stack.agent.client.request(subj.TOKEN_REQUEST, request, timeout=10)
        assert TokenRequestReply.model_validate_json(reply.data).status == "pending"
        card = page.locator(".approval")
        await card.wait_for(timeout=20_000)
        assert hostile in await card.locator(".summary").inner_text()
        assert await card.locator("img").count() == 0
        assert await page.evaluate("window.__pwned === undefined")
        await page.screenshot(path=str(shots / "hostile-approval.png"), full_page=True)
        await card.locator("button.deny").click()
        await card.wait_for(state="detached", timeout=20_000)
        await page.locator(f'#workflows tr[data-id="{wf.id}"] a').click()
        rows = page.locator("#audit tbody tr")
        assert await rows.count() >= 3  # planned, approval asked and decided, step, finish
        for text in await rows.all_inner_texts():
            assert wf.id in text
        await page.screenshot(path=str(shots / "approved.png"), full_page=True)
    assert stack.seen.calls == [("send_message", "dinner at 8")]
    stored = await stack.approval((await stack.workflow(wf.id)).steps["send"].approval_id or "")
    assert stored.decision is not None
    assert stored.decision.reason == "ok from the browser"
    print(f"screenshots in {shots}")


async def test_in_chromium_stop_start_and_logs_of_an_agent(
        stack: Stack, control: ProcessBackend, tmp_path: Path) -> None:
    shots = await screenshots(tmp_path)
    async with logged_in_page(stack) as page:
        row = page.locator('#agents tr[data-agent="health"]')
        await row.locator(".state.running").wait_for(timeout=20_000)
        await row.get_by_role("button", name="stop", exact=True).click()
        await page.locator('#agents tr[data-agent="health"] .state.stopped').wait_for(
            timeout=20_000)
        assert state_of(control, "health") == "stopped"
        await page.screenshot(path=str(shots / "agent-stopped.png"))
        await page.locator('#agents tr[data-agent="health"]').get_by_role(
            "button", name="start", exact=True).click()
        await page.locator('#agents tr[data-agent="health"] .state.running').wait_for(
            timeout=20_000)
        await page.locator('#agents tr[data-agent="health"]').get_by_role(
            "button", name="logs", exact=True).click()
        await page.locator("#logs", has_text="hello from").wait_for(timeout=20_000)
        await page.screenshot(path=str(shots / "agents-logs.png"), full_page=True)
    assert state_of(control, "health") == "running"
