"""Broker-side refusals into the audit log: nats-server's own log is the witness.

nats-server publishes no event for permission violations (ENVIRONMENT.md), and a client
can hide the ones reported to it, so the orchestrator tails the server's log file
(``$MAS_NATS_LOG``) and appends a record for every line like::

    [..] [ERR] 127.0.0.1:48846 - cid:12 - "v2.16.0:python3:notify" - "AGENT_NOTIFY/nkey:UC4..."
        - Publish Violation - Subject "mas.agent.home.x"
    [..] [ERR] 127.0.0.1:48850 - cid:13 - authentication error - Nkey "UBEE..."

The identity is the one the server authenticated: the nkey, mapped through this
install's ``secrets/nats/identities.conf`` when the orchestrator can read it, else the
agent named by the account (one account per agent). The client-chosen connection name
is kept only as detail: anyone can claim any name. Failed logins name the nkey that was
tried; an unknown one is recorded as ``unknown``.

A rogue client can make the server log violations as fast as it can send, and the
audit stream refuses writes when full, so each identity gets at most ``BURST`` records
per ``WINDOW_S``; what is over is counted and recorded as one ``suppressed`` record when
the window ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from broker.accounts import PLATFORM
from broker.secrets import IdentityMaterial
from orchestrator.audit import AuditLog

log = structlog.get_logger("mas.audit")
NATS_LOG_ENV = "MAS_NATS_LOG"
POLL_S = 0.2
BURST = 20
WINDOW_S = 60.0
MAX_LINE = 4096

_PREFIX = r"\[\d+\] (?P<time>\S+ \S+) \[(?:ERR|WRN|INF)\] (?P<addr>\S+) - cid:(?P<cid>\d+)"
_VIOLATION = re.compile(
    _PREFIX + r' - "(?P<client>[^"]*)" - "(?P<account>[^"/]+)/nkey:(?P<nkey>U[A-Z2-7]+)"'
    r' - (?P<op>Publish|Subscription) Violation - Subject "(?P<subject>[^"]*)"')
_AUTH = re.compile(
    _PREFIX + r' - (?:authentication error|Authorization Violation)'
    r'(?: - (?:Nkey|User) "(?P<nkey>[^"]*)")?')
_IDENTITY_LINE = re.compile(r'^NKEY_(?P<name>[A-Z0-9_]+):\s*"(?P<key>U[A-Z2-7]+)"')


@dataclass(frozen=True)
class BrokerEvent:
    kind: str  # "violation" or "auth_failure"
    operation: str  # publish, subscribe, login
    subject: str
    nkey: str
    account: str
    client: str
    address: str
    server_time: str


def parse_line(line: str) -> BrokerEvent | None:
    """The refusal a nats-server log line reports, or None for any other line."""
    match = _VIOLATION.search(line)
    if match:
        op = "publish" if match["op"] == "Publish" else "subscribe"
        return BrokerEvent("violation", op, match["subject"], match["nkey"], match["account"],
                           match["client"], match["addr"], match["time"])
    match = _AUTH.search(line)
    if match:
        return BrokerEvent("auth_failure", "login", "", match["nkey"] or "", "", "",
                           match["addr"], match["time"])
    return None


def load_nkeys(path: Path) -> dict[str, str]:
    """nkey public key -> identity, from ``identities.conf`` ({} if unreadable)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return {}
    found = {}
    for line in text.splitlines():
        match = _IDENTITY_LINE.match(line.strip())
        if match:
            found[match["key"]] = match["name"].lower()
    return found


def identity_of(event: BrokerEvent, nkeys: dict[str, str]) -> str:
    if event.nkey in nkeys:
        return nkeys[event.nkey]
    prefix = "AGENT_"
    if event.account.startswith(prefix):
        return event.account[len(prefix):].lower()
    return "platform" if event.account == PLATFORM else "unknown"


class BrokerLogWatcher:
    """Follows the server log from its current end and audits each refusal it reports.
    A log that shrinks (rotated or truncated) is followed from its start again."""

    def __init__(self, audit: AuditLog, path: Path, nkeys: dict[str, str]) -> None:
        self.audit = audit
        self.path = path
        self.nkeys = nkeys
        self.position = 0
        self._task: asyncio.Task[None] | None = None
        self._window: dict[str, tuple[float, int, int]] = {}  # identity: (start, kept, over)

    @classmethod
    async def start(cls, audit: AuditLog, material: IdentityMaterial,
                    path: Path | None = None) -> BrokerLogWatcher | None:
        """Watch ``path`` or ``$MAS_NATS_LOG``; None (and a warning) when neither is set."""
        if path is None:
            value = os.environ.get(NATS_LOG_ENV, "").strip()
            if not value:
                log.warning("audit.broker_log_unset", hint=f"set {NATS_LOG_ENV} to the "
                            "nats-server log file to audit permission violations")
                return None
            path = Path(value)
        nkeys = load_nkeys(material.ca_cert.parent / "nats" / "identities.conf")
        watcher = cls(audit, path, nkeys)
        with contextlib.suppress(OSError):
            watcher.position = path.stat().st_size
        watcher._task = asyncio.create_task(watcher._follow())
        return watcher

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def _read_new(self) -> list[str]:
        try:
            size = self.path.stat().st_size
        except OSError:
            return []
        if size < self.position:
            self.position = 0
        if size == self.position:
            return []
        with self.path.open("rb") as f:
            f.seek(self.position)
            chunk = f.read(size - self.position)
        complete = chunk.rfind(b"\n") + 1
        self.position += complete
        return [line.decode("utf-8", "replace")[:MAX_LINE]
                for line in chunk[:complete].splitlines()]

    async def _close_windows(self, now: float) -> None:
        """End the windows older than WINDOW_S, recording what each suppressed."""
        for identity, (start, _, over) in list(self._window.items()):
            if now - start < WINDOW_S:
                continue
            del self._window[identity]
            if over:
                await self.audit.record("violation", identity, "suppressed", "refused",
                                        code="rate_limited",
                                        detail={"suppressed": over, "window_s": WINDOW_S})

    def _admit(self, identity: str, now: float) -> bool:
        """Whether this identity's next refusal gets a record of its own."""
        start, kept, over = self._window.get(identity, (now, 0, 0))
        admitted = kept < BURST
        self._window[identity] = (start, kept + admitted, over + (not admitted))
        return admitted

    async def poll(self) -> int:
        """Audit the refusals logged since the last poll; returns how many were seen."""
        count = 0
        await self._close_windows(time.monotonic())
        for line in await asyncio.to_thread(self._read_new):
            event = parse_line(line)
            if event is None:
                continue
            count += 1
            identity = identity_of(event, self.nkeys)
            if not self._admit(identity, time.monotonic()):
                continue
            await self.audit.record(
                "violation" if event.kind == "violation" else "auth_failure",
                identity, event.operation, "refused",
                code=f"{event.operation}_refused",
                detail={"subject": event.subject, "nkey": event.nkey,
                        "account": event.account, "client_name": event.client[:128],
                        "address": event.address, "server_time": event.server_time,
                        "source": "nats-server log"})
        return count

    async def _follow(self) -> None:
        while True:
            try:
                await self.poll()
            except Exception as exc:
                log.warning("audit.broker_log_failed", error=type(exc).__name__)
            await asyncio.sleep(POLL_S)

