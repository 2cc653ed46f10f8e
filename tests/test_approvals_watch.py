"""`mas approvals watch` as the operator runs it: the real console script against a real
broker and orchestrator; a fake `osascript` first on PATH stands in for macOS's dialog,
and a loopback server speaking ntfy's publish API for the push."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import ClassVar

import pytest

from mas.approvals_watch import APPLESCRIPT, DIALOG_TITLE
from orchestrator.plan import Step
from protocol import admin
from protocol.explain import Explanation
from security.decisions import verify_decision
from security.encoding import args_sha256
from tests.conftest import ConnectAs, eventually, free_port
from tests.loopback import serve_http
from tests.platform import Platform
from tests.test_cli import MAS, env, mas, one_line_error
from tests.test_orchestrator import MESSAGE, SEND

pytestmark = pytest.mark.broker
FORGED = "  mas approvals approve ap-forged0000 --reason ok"
HOSTILE = ('Bob" & do shell script "touch /tmp/mas-pwned" & "\\ \\" end run\n'
           f"\x1b[2J\u202eevil\n{FORGED}")


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: str


class FakeNtfy(BaseHTTPRequestHandler):
    """ntfy's publish endpoint: ``POST /<topic>`` with the message as the body; answers
    the stored message as JSON, or ntfy's error shape when ``status`` is not 200."""

    received: ClassVar[list[Received]] = []
    status: ClassVar[int] = 200

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length).decode()
        FakeNtfy.received.append(Received(self.path, dict(self.headers.items()), body))
        if FakeNtfy.status == 200:
            answer = {"id": "hwQ2YpKdmg", "time": 1, "event": "message",
                      "topic": self.path.strip("/"), "message": body}
        else:
            answer = {"code": 50001, "http": FakeNtfy.status, "error": "internal server error"}
        data = json.dumps(answer).encode()
        self.send_response(FakeNtfy.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        return


@pytest.fixture
def ntfy() -> Iterator[str]:
    FakeNtfy.received, FakeNtfy.status = [], 200
    with serve_http(FakeNtfy) as url:
        yield url


@pytest.fixture
def fake_osascript(tmp_path: Path) -> Path:
    """A directory with an executable `osascript` that records its argv (one JSON line
    per call) and answers what $FAKE_OSASCRIPT_ANSWER says, like the real one prints the
    script's result."""
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    script = bindir / "osascript"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "with open(os.environ['FAKE_OSASCRIPT_LOG'], 'a', encoding='utf-8') as f:\n"
        "    f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "sys.stdout.write(os.environ['FAKE_OSASCRIPT_ANSWER'] + '\\n')\n")
    script.chmod(0o755)
    return bindir


@dataclass
class Watch:
    """A running `mas approvals watch`; its output lines are collected as they come."""

    proc: asyncio.subprocess.Process
    out: list[str] = field(default_factory=list)
    err: list[str] = field(default_factory=list)
    readers: list[asyncio.Task[None]] = field(default_factory=list)

    async def _read(self, stream: asyncio.StreamReader | None, into: list[str]) -> None:
        assert stream is not None
        while line := await stream.readline():
            into.append(line.decode())

    def start_reading(self) -> None:
        self.readers = [asyncio.create_task(self._read(self.proc.stdout, self.out)),
                        asyncio.create_task(self._read(self.proc.stderr, self.err))]

    async def wait(self, timeout: float = 60) -> int:
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.gather(*self.readers)
        return code

    async def until(self, predicate: Callable[[], bool], what: str) -> None:
        await eventually(lambda: predicate() or self.proc.returncode is not None,
                         timeout=60, what=what)
        assert predicate(), (what, self.out, self.err)

    def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGINT)


async def start_watch(platform: Platform, *args: str, extra_env: dict[str, str] | None = None
                      ) -> Watch:
    environment = {k: v for k, v in env().items() if not k.startswith("MAS_NTFY_")}
    environment["MAS_BROKER_URL"] = platform.broker.url
    environment.update(extra_env or {})
    proc = await asyncio.create_subprocess_exec(
        *MAS, "approvals", "watch", "--root", str(platform.broker.project.root), *args,
        env=environment, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    watch = Watch(proc)
    watch.start_reading()
    return watch


async def watch_once(platform: Platform, *args: str,
                     extra_env: dict[str, str] | None = None) -> Watch:
    watch = await start_watch(platform, "--once", *args, extra_env=extra_env)
    code = await watch.wait()
    assert code == 0, (watch.out, watch.err)
    assert "Traceback" not in "".join(watch.err)
    return watch


def dialog_env(bindir: Path, log: Path, answer: str) -> dict[str, str]:
    return {"PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
            "FAKE_OSASCRIPT_LOG": str(log), "FAKE_OSASCRIPT_ANSWER": answer}


def calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]


SCRIPT_ARGS = [arg for line in APPLESCRIPT for arg in ("-e", line)]


async def test_terminal_mode_prints_the_approval_with_its_exact_arguments(
        platform: Platform, ntfy: str) -> None:
    await platform.run_plan(SEND)
    approval = await platform.pending()
    watch = await watch_once(platform, "--dialog", "none")
    text = "".join(watch.out)
    assert approval.id in text
    assert "notify.send_message" in text
    assert "Tell Bob about dinner" in text
    assert json.dumps(MESSAGE, indent=2, sort_keys=True) in text
    assert f"mas approvals approve {approval.id} --reason" in text
    assert f"mas approvals deny {approval.id} --reason" in text
    assert (await platform.orch.approvals.get(approval.id)).status == "pending"
    assert FakeNtfy.received == []  # MAS_NTFY_URL unset: no push


async def test_approve_in_the_dialog_signs_the_decision_and_the_step_runs(
        platform: Platform, fake_osascript: Path, tmp_path: Path) -> None:
    wf = await platform.run_plan(SEND)
    approval = await platform.pending()
    log = tmp_path / "osascript.log"
    watch = await watch_once(platform, "--dialog", "osascript",
                             extra_env=dialog_env(fake_osascript, log, "Approve\nlooks fine"))
    [argv] = calls(log)
    assert argv[:len(SCRIPT_ARGS)] == SCRIPT_ARGS
    title, message, seconds = argv[len(SCRIPT_ARGS) + 1:]
    assert argv[len(SCRIPT_ARGS)] == "--"
    assert title == DIALOG_TITLE
    assert "Tell Bob about dinner" in message
    assert json.dumps(MESSAGE, indent=2, sort_keys=True) in message
    assert 0 < int(seconds) <= approval.expires_at - approval.created_at
    assert f"{approval.id}: approved" in "".join(watch.out)

    await eventually(lambda: platform.seen.calls != [], timeout=10, what="step ran")
    assert platform.seen.calls == [("send_message", "dinner at 8")]
    decided = await platform.orch.approvals.get(approval.id)
    assert decided.status in ("approved", "used")
    assert decided.decision is not None
    ring = platform.orch.material.trust.approver_ring()
    verify_decision(decided.decision, ring)  # raises unless the operator's key signed it
    assert (decided.decision.decision, decided.decision.reason) == ("approve", "looks fine")
    assert decided.decision.args_sha256 == args_sha256(MESSAGE)
    await eventually(lambda: not platform.orch.engine._tasks, timeout=10, what="engine idle")
    assert (await platform.workflow(wf.id)).status == "completed"


async def test_deny_in_the_dialog_fails_the_step_with_the_reason(
        platform: Platform, fake_osascript: Path, tmp_path: Path) -> None:
    wf = await platform.run_plan(SEND)
    approval = await platform.pending()
    log = tmp_path / "osascript.log"
    await watch_once(platform, "--dialog", "osascript",
                     extra_env=dialog_env(fake_osascript, log, "Deny\nnot tonight"))
    assert len(calls(log)) == 1
    decided = await platform.orch.approvals.get(approval.id)
    assert decided.status == "denied"
    assert decided.decision is not None
    assert decided.decision.reason == "not tonight"
    await eventually(lambda: not platform.orch.engine._tasks, timeout=10, what="engine idle")
    done = await platform.workflow(wf.id)
    assert done.status == "failed"
    assert done.steps["s1"].code == "approval_denied"
    assert platform.seen.calls == []


async def test_a_dialog_that_gives_up_leaves_the_approval_pending(
        platform: Platform, fake_osascript: Path, tmp_path: Path) -> None:
    await platform.run_plan(SEND)
    approval = await platform.pending()
    log = tmp_path / "osascript.log"
    watch = await watch_once(platform, "--dialog", "osascript",
                             extra_env=dialog_env(fake_osascript, log, "gave up"))
    assert "no answer in the dialog" in "".join(watch.out)
    assert (await platform.orch.approvals.get(approval.id)).status == "pending"


async def test_hostile_text_reaches_osascript_only_as_data(
        platform: Platform, fake_osascript: Path, tmp_path: Path) -> None:
    args = {"to": "bob", "text": HOSTILE}
    step = Step(id="s1", agent="notify", action="send_message", args=args,
                explanation=Explanation(summary=HOSTILE, reason=HOSTILE, confidence=0.5))
    await platform.run_plan(step)
    approval = await platform.pending()
    on_terminal = "".join((await watch_once(platform, "--dialog", "none")).out)
    assert 'Bob" & do shell script "touch /tmp/mas-pwned"' in on_terminal
    assert "\x1b" not in on_terminal
    assert "\u202e" not in on_terminal
    # agent text cannot forge a line of its own, such as a fake "approve" command
    assert FORGED not in on_terminal.splitlines()
    assert f"  mas approvals approve {approval.id} --reason \"...\"" in on_terminal.splitlines()

    log = tmp_path / "osascript.log"
    watch = await watch_once(platform, "--dialog", "osascript",
                             extra_env=dialog_env(fake_osascript, log, "Deny\n"))
    [argv] = calls(log)
    # the script is the constant, whatever the agent wrote; its text is in argv only
    assert argv[:len(SCRIPT_ARGS)] == SCRIPT_ARGS
    data = argv[len(SCRIPT_ARGS):]
    assert data[0] == "--"
    assert 'do shell script "touch /tmp/mas-pwned"' in data[2]
    assert 'Bob" & do shell script' in data[2]
    assert not any("do shell script" in a for a in argv[:len(SCRIPT_ARGS)])
    # escape sequences and bidi overrides are shown, not obeyed, in the dialog and terminal
    assert "\x1b" not in data[2]
    assert "\u202e" not in data[2]
    assert "\\u001b[2J\\u202eevil" in data[2]
    printed = "".join(watch.out)
    assert "\x1b" not in printed
    assert "\u202e" not in printed
    assert "\\u001b" in printed
    decided = await platform.orch.approvals.get(approval.id)
    assert decided.status == "denied"
    assert decided.decision is not None
    assert decided.decision.reason == "decided in the macOS dialog"
    assert not os.path.exists("/tmp/mas-pwned")  # noqa: ASYNC240


async def count_polls(connect: ConnectAs) -> list[int]:
    """How many times anyone listed approvals: a second, non-queue subscription of the
    orchestrator's identity sees a copy of every request on the admin subject."""
    polls = [0]

    async def seen(_msg: object) -> None:
        polls[0] += 1

    orch = await connect("orchestrator")
    await orch.nc.subscribe(admin.APPROVALS_LIST, cb=seen)
    await orch.sync()
    return polls


async def test_ntfy_gets_one_push_per_new_approval_with_the_documented_headers(
        platform: Platform, ntfy: str, connect_fresh: ConnectAs) -> None:
    polls = await count_polls(connect_fresh)
    watch = await start_watch(platform, "--dialog", "none", "--interval", "0.2",
                              extra_env={"MAS_NTFY_URL": f"{ntfy}/mas-approvals",
                                         "MAS_NTFY_TOKEN": "tk_fake_for_tests"})
    try:
        await watch.until(lambda: any("watching approvals" in ln for ln in watch.out),
                          "watcher started")
        await platform.run_plan(SEND)
        await eventually(lambda: len(FakeNtfy.received) >= 1, timeout=60, what="first push")
        after_first = polls[0]
        await eventually(lambda: polls[0] >= after_first + 5, timeout=60, what="5 more polls")
        assert len(FakeNtfy.received) == 1
        second = Step(id="s1", agent="notify", action="send_message",
                      args={"to": "bob", "text": "second"},
                      explanation=Explanation(summary="Second note to Bob", confidence=0.8))
        await platform.run_plan(second)
        await eventually(lambda: len(FakeNtfy.received) >= 2, timeout=60, what="second push")
        await watch.until(lambda: "Second note to Bob" in "".join(watch.out), "second printed")
    finally:
        watch.stop()
    assert await watch.wait() == 0, watch.err
    assert "stopped watching" in "".join(watch.out)
    assert "Traceback" not in "".join(watch.err)

    approvals = (await platform.orch.approvals.find("pending"))
    assert len(FakeNtfy.received) == 2  # polled many times, pushed once per approval
    for push, approval in zip(FakeNtfy.received, approvals, strict=True):
        assert push.path == "/mas-approvals"
        assert push.headers["Title"] == "Approval needed: notify.send_message"
        assert push.headers["Priority"] == "high"
        assert push.headers["Tags"] == "lock"
        assert push.headers["Authorization"] == "Bearer tk_fake_for_tests"
        assert approval.id in push.body
        assert approval.explanation.summary in push.body
        assert "expires" in push.body
        assert "dinner at 8" not in push.body  # no arguments
        assert '"text"' not in push.body


@pytest.mark.parametrize("failure", ["http-500", "unreachable"])
async def test_a_failing_ntfy_server_costs_one_warning_and_the_watcher_goes_on(
        platform: Platform, ntfy: str, failure: str) -> None:
    FakeNtfy.status = 500
    url = f"{ntfy}/mas-approvals" if failure == "http-500" else \
        f"http://127.0.0.1:{free_port()}/mas-approvals"
    watch = await start_watch(platform, "--dialog", "none", "--interval", "0.2",
                              extra_env={"MAS_NTFY_URL": url})

    def warnings() -> list[str]:
        return [ln for ln in watch.err if "ntfy push" in ln]

    try:
        await platform.run_plan(SEND)
        await watch.until(lambda: len(warnings()) == 1, "first warning")
        second = Step(id="s1", agent="notify", action="send_message",
                      args={"to": "bob", "text": "again"},
                      explanation=Explanation(summary="Another one", confidence=0.8))
        await platform.run_plan(second)
        await watch.until(lambda: "Another one" in "".join(watch.out), "second announced")
        await watch.until(lambda: len(warnings()) == 2, "second warning")
    finally:
        watch.stop()
    assert await watch.wait() == 0, watch.err
    first = warnings()[0]
    assert first.startswith("mas: ntfy push for ")
    assert ("HTTP 500" if failure == "http-500" else "cannot reach the ntfy server") in first
    assert "mas-approvals" not in "".join(watch.err)  # the topic is a secret: never shown
    if failure == "http-500":
        assert len(FakeNtfy.received) == 2  # one try per approval, no retry storm
    else:
        assert FakeNtfy.received == []


@pytest.mark.parametrize(("args", "extra", "expected"), [
    (["--ntfy", "ftp://ntfy.invalid/topic"], {}, "--ntfy must be an ntfy topic URL"),
    (["--ntfy", "https://ntfy.invalid/"], {}, "--ntfy must be an ntfy topic URL"),
    ([], {"MAS_NTFY_URL": "not a url"}, "MAS_NTFY_URL must be an ntfy topic URL"),
    (["--dialog", "popup"], {}, "--dialog 'popup': use auto, osascript or none"),
    (["--dialog", "osascript"], {"PATH": "EMPTY"}, "osascript is not on PATH"),
])
def test_bad_options_get_one_line(tmp_path: Path, args: list[str], extra: dict[str, str],
                                  expected: str) -> None:
    (tmp_path / "policy.yaml").write_text((Path(__file__).parent.parent / "policy.yaml")
                                          .read_text())
    empty = tmp_path / "empty"
    empty.mkdir()
    extra = {k: (str(empty) if v == "EMPTY" else v) for k, v in extra.items()}
    line = one_line_error(mas(tmp_path, "approvals", "watch", "--once", *args,
                              extra_env=extra))
    assert expected in line
