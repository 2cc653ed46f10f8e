"""Local mode: the orchestrator and control as child processes of `mas up`; control
runs the agents (`mas agent run NAME`) as its own children.

Each runs the same command its container runs, with its output in
data/logs/<name>.log. A child that exits is restarted a few times with a growing pause,
like compose's `restart: on-failure:5`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from broker.policy import Policy
from mas.project import Project

MAX_RESTARTS = 5


@dataclass
class LocalService:
    name: str
    command: list[str]
    env: dict[str, str]
    log_path: Path
    cwd: Path
    restarts: int = 0
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)
    _next_start: float = 0.0

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(self.command, env=self.env, cwd=self.cwd,
                                        stdout=self._log, stderr=subprocess.STDOUT)

    def check(self) -> None:
        """Restart the child if it died (bounded); called from `mas up`'s loop."""
        if self.process is None or self.process.poll() is None:
            return
        if self.restarts >= MAX_RESTARTS:
            return
        now = time.monotonic()
        if not self._next_start:
            self._next_start = now + 2 ** self.restarts
            return
        if now >= self._next_start:
            self.restarts += 1
            self._next_start = 0.0
            self.start()

    def stop(self, timeout: float = 20.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()


def _mas() -> str:
    return str(Path(sys.executable).with_name("mas"))


def agents_with_code(project: Project, policy: Policy) -> list[str]:
    import agents

    folders = [Path(p) for p in agents.__path__] + [project.root / "agents"]
    return [name for name in sorted(policy.agents)
            if any((folder / name / "agent.py").is_file() for folder in folders)]


def start_services(project: Project, url: str, policy: Policy) -> list[LocalService]:
    env = {**os.environ, "MAS_ROOT": str(project.root), "MAS_BROKER_URL": url}
    logs = project.data_dir / "logs"
    # the orchestrator audits the broker's refusals from its log, and keeps the audit
    # checkpoints in a file outside the stream (the CLI's default place for them)
    orchestrator_env = {**env, "MAS_NATS_LOG": str(logs / "nats-server.log"),
                        "MAS_AUDIT_CHECKPOINTS": str(project.data_dir / "audit" /
                                                     "checkpoints.jsonl")}
    services = [LocalService("orchestrator", [_mas(), "orchestrator", "run"], orchestrator_env,
                             logs / "orchestrator.log", project.root)]
    # control starts and supervises the agents, so `mas agent stop|start|restart` and
    # `mas status` work the same here as with containers
    services.append(LocalService("control", [_mas(), "control", "run", "--processes"], env,
                                 logs / "control.log", project.root))
    services.append(LocalService("dashboard", [_mas(), "dashboard", "run"], env,
                                 logs / "dashboard.log", project.root))
    for service in services:
        service.start()
    return services
