"""The demo a new user runs with no API key: `mas up` starts the broker, the
orchestrator and the agents; `mas run message-bob` waits for the human; `mas approvals
approve` lets it through; the message arrives once."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tests.conftest import REPO
from tests.loopback import Webhook
from tests.test_cli import MAS, assign_free_ports, env, mas, read_until


def test_mas_run_completes_a_workflow_with_one_approval(tmp_path: Path, webhook: Webhook) -> None:
    root = tmp_path / "demo"
    root.mkdir()
    shutil.copy(REPO / "policy.yaml", root / "policy.yaml")
    shutil.copytree(REPO / "workflows", root / "workflows")
    assert mas(root, "init").returncode == 0
    assign_free_ports(root)
    extra = {"MAS_NOTIFY_CONTACTS": json.dumps({"bob": {"kind": "webhook",
                                                        "url": f"{webhook.url}/bob"}}),
             "MAS_NOTIFY_WEBHOOK_URL": f"{webhook.url}/owner", "MAS_PLANNER": "offline"}
    up = subprocess.Popen([*MAS, "up"], cwd=root, env={**env(), **extra},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True)
    lines: list[str] = []
    try:
        assert read_until(up, lines, "started orchestrator", 30), lines
        deadline = time.monotonic() + 30
        while True:  # until the orchestrator answers and notify has registered
            started = mas(root, "run", "message-bob", "--json", "--wait", "2")
            registered = started.returncode == 0 and \
                json.loads(started.stdout)["workflows"][0]["status"] != "rejected"
            if registered or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert started.returncode == 0, started.stderr
        [wf] = json.loads(started.stdout)["workflows"]
        assert wf["status"] == "waiting_approval", wf
        assert webhook.posts == []

        pending = json.loads(mas(root, "approvals", "list", "--json").stdout)
        [approval] = pending
        assert approval["args"]["to"] == "bob"
        shown = mas(root, "approvals", "show", approval["id"])
        assert "Running late" in shown.stdout
        approved = mas(root, "approvals", "approve", approval["id"], "--reason", "fine")
        assert approved.returncode == 0, approved.stderr

        for _ in range(100):
            shown = json.loads(mas(root, "workflow", "show", wf["id"], "--json").stdout)
            if shown["workflows"][0]["status"] in ("completed", "failed"):
                break
            time.sleep(0.2)
        assert shown["workflows"][0]["status"] == "completed", shown
        assert len(webhook.posts) == 1
        assert "Running about 15 minutes late" in json.dumps(webhook.posts[0][1])
        again = mas(root, "approvals", "approve", approval["id"])
        assert again.returncode == 1
        assert "not_pending" in again.stderr
        verified = mas(root, "audit", "verify", "--json")
        assert verified.returncode == 0, (verified.stdout, verified.stderr)
        tail = mas(root, "audit", "tail", "--json", "-n", "200")
        kinds = {json.loads(line)["kind"] for line in tail.stdout.splitlines() if line.strip()}
        assert {"approval_requested", "approval_decided", "token_issued", "command"} <= kinds

        def tokens() -> list[dict[str, object]]:
            listed = mas(root, "tokens", "list", "--all", "--json")
            assert listed.returncode == 0, listed.stderr
            return [t for t in json.loads(listed.stdout) if t["action"] == "send_message"]

        [token] = tokens()
        assert token["approval_id"] == approval["id"]
        assert token["single_use"] is True
        assert token["state"] in ("live", "expired")
        assert mas(root, "tokens", "revoke", "notify", "--agent").returncode == 0
        assert [t["state"] for t in tokens()] == ["revoked"]
        assert mas(root, "tokens", "revoke", "notify", "--agent", "--lift").returncode == 0
        assert [t["state"] for t in tokens()] != ["revoked"]
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout=40)
        except subprocess.TimeoutExpired:
            up.kill()
        out, err = up.communicate(timeout=10)
    assert up.returncode == 0, (out, err)
    logs = root / "data" / "logs"
    assert {p.name for p in logs.iterdir()} >= {"orchestrator.log", "notify.log"}
    assert '"action": "send_message"' in (logs / "notify.log").read_text()
