"""Idle memory (RSS) of each agent process, next to a bare nats-py client process.

Run from the project root::

    python -m bench.bench_agents [--seconds 10] [--out FILE.md]

One real nats-server (mutual TLS, nkeys, the compiled config) from a throwaway copy of
``policy.yaml``; the orchestrator (``mas orchestrator run``) so the agents' registration
completes, then each of the six agents as its own process exactly as local mode and the
containers start it (``mas agent run NAME``). Once every agent has written its ready file
and a few seconds have passed, the resident set size of each process is sampled from
``/proc/<pid>/status`` (``VmRSS``) for ``--seconds``; the table gives the median per
process, next to its anonymous memory (``Anonymous`` in ``/proc/<pid>/smaps_rollup``):
the pages the process holds for itself. The rest of its RSS is library code and data
mapped from files, shared by every process (and every container of the same image) that
maps them; ``docker stats`` leaves page cache out of a container's figure, so that figure
sits near the anonymous memory rather than the RSS. The baseline is a Python process
that only imports nats-py and holds one TLS connection to the same broker; a second
reference process only imports what `mas agent run` loads and the runtime (pydantic, structlog, the
security core...) without connecting, which separates import cost from what a running
agent holds. Everything is stopped and
removed at the end.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from bench import common
from bench.common import REPO, Result, log
from bench.throwaway import Broker
from broker.server import server_version

AGENTS = ("aggregator", "anomaly", "backup", "health", "home", "notify")
BASELINE = """
import asyncio, ssl, sys, pathlib, nats
async def main():
    secrets = pathlib.Path(sys.argv[1])
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(secrets / "ca.crt"))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(str(secrets / "notify" / "tls.crt"), str(secrets / "notify" / "tls.key"))
    nc = await nats.connect(sys.argv[2], tls=ctx,
                            nkeys_seed_str=(secrets / "notify" / "nkey.seed").read_text().strip(),
                            inbox_prefix="_INBOX_notify")
    await nc.flush()
    pathlib.Path(sys.argv[3]).touch()
    await asyncio.Event().wait()
asyncio.run(main())
"""
# What an agent process imports (`mas agent run`: mas.entry, the agent commands and the
# runtime) costs before any connection or agent code.
IMPORTS_ONLY = """
import pathlib, sys, time
import mas.entry, mas.agent_cli, agents.runtime.service
pathlib.Path(sys.argv[1]).touch()
time.sleep(3600)
"""


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (Linux: /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def anonymous_kib(pid: int) -> int:
    """Anonymous (private, not file-backed) memory of ``pid`` in KiB (Linux 4.14+:
    /proc/<pid>/smaps_rollup)."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1])
    raise RuntimeError(f"no Anonymous in smaps_rollup for {pid}")


@dataclass
class Child:
    name: str
    command: list[str]
    ready: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    samples: list[int] = field(default_factory=list)
    anonymous: list[int] = field(default_factory=list)
    _log: IO[bytes] | None = None

    def start(self, env: dict[str, str], cwd: Path) -> None:
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(self.command, env=env, cwd=cwd, stdout=self._log,
                                        stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()


def wait_for(what: str, check: object, children: list[Child], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        for child in children:
            if child.process is not None and child.process.poll() is not None:
                tail = child.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{child.name} exited ({child.process.returncode}):\n{tail}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready within {timeout:.0f}s")
        time.sleep(0.1)


def run(seconds: float, settle_s: float) -> tuple[list[Child], str]:
    broker = Broker()
    children: list[Child] = []
    try:
        broker.start()
        root = broker.project.root
        shutil.copytree(REPO / "workflows", root / "workflows")  # the offline planner's
        env = {**os.environ, "MAS_ROOT": str(root), "MAS_BROKER_URL": broker.url,
               "MAS_HEARTBEAT_S": "10"}
        mas = [sys.executable, "-m", "mas"]
        orch = Child("orchestrator", [*mas, "orchestrator", "run"], broker.tmp / "orch.ready",
                     broker.tmp / "orchestrator.log")
        orch.start(env, root)
        children.append(orch)
        wait_for("orchestrator", lambda: "orchestrator.ready" in orch.log_path.read_text(
            errors="replace"), children)
        log("orchestrator ready")
        base = Child("baseline (nats-py only)",
                     [sys.executable, "-c", BASELINE, str(broker.secrets.root), broker.url,
                      str(broker.tmp / "baseline.ready")],
                     broker.tmp / "baseline.ready", broker.tmp / "baseline.log")
        base.start(env, root)
        children.append(base)
        imports = Child("imports only (agent entry point + runtime, no connection)",
                        [sys.executable, "-c", IMPORTS_ONLY, str(broker.tmp / "imports.ready")],
                        broker.tmp / "imports.ready", broker.tmp / "imports.log")
        imports.start(env, root)
        children.append(imports)
        agents = []
        for name in AGENTS:
            ready = broker.tmp / f"{name}.ready"
            child = Child(name, [*mas, "agent", "run", name], ready, broker.tmp / f"{name}.log")
            child.start({**env, "MAS_READY_FILE": str(ready)}, root)
            children.append(child)
            agents.append(child)
        measured = [base, imports, *agents]
        wait_for("agents", lambda: all(c.ready.exists() for c in measured), children)
        log(f"all ready; idle {settle_s:.0f}s, then sampling for {seconds:.0f}s")
        time.sleep(settle_s)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for child in measured:
                assert child.process is not None
                child.samples.append(rss_kib(child.process.pid))
                child.anonymous.append(anonymous_kib(child.process.pid))
            time.sleep(0.5)
        return measured, server_version()
    finally:
        for child in reversed(children):
            with contextlib.suppress(Exception):
                child.stop()
        broker.close()


def report(measured: list[Child], seconds: float, settle_s: float, nats_version: str
           ) -> Result:
    base = statistics.median(measured[0].samples)
    lines = [
        "# Agent idle memory (RSS per process)",
        "",
        f"`python -m bench.bench_agents --seconds {seconds:g}` on {platform.platform()}, "
        f"Python {platform.python_version()}, {nats_version}, "
        f"{os.cpu_count()} CPUs. Each process idled {settle_s:g}s after its ready file, then "
        f"VmRSS and the anonymous memory were read every 0.5s for {seconds:g}s; medians. "
        "Anonymous memory is the process's own; the rest of RSS is shared library pages.",
        "",
        "| process | median RSS (MiB) | min–max (MiB) | × baseline | anonymous (MiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for child in measured:
        med = statistics.median(child.samples)
        lines.append(f"| {child.name} | {med / 1024:.1f} | {min(child.samples) / 1024:.1f}–"
                     f"{max(child.samples) / 1024:.1f} | {med / base:.2f} | "
                     f"{statistics.median(child.anonymous) / 1024:.1f} |")
    agents = [statistics.median(c.samples) for c in measured[2:]]
    private = [statistics.median(c.anonymous) for c in measured[2:]]
    lines += ["", f"Agents: median {statistics.median(agents) / 1024:.1f} MiB, "
              f"{statistics.median(agents) / base:.2f}× the bare nats-py process "
              f"({base / 1024:.1f} MiB); anonymous memory median "
              f"{statistics.median(private) / 1024:.1f} MiB (bare nats-py process "
              f"{statistics.median(measured[0].anonymous) / 1024:.1f} MiB)."]
    samples = {c.name: [kib / 1024 for kib in c.samples] for c in measured}
    return Result("\n".join(lines) + "\n", samples=samples)


def main(argv: list[str] | None = None) -> int:
    parser = common.parser("bench.bench_agents", __doc__)
    parser.add_argument("--seconds", type=float, default=10.0, help="sampling time")
    parser.add_argument("--settle", type=float, default=5.0, help="idle time before sampling")
    args = parser.parse_args(argv)

    def body() -> Result:
        measured, version = run(args.seconds, args.settle)
        return report(measured, args.seconds, args.settle, version)

    return common.run(args, body)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
