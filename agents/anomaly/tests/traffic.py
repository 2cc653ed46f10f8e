"""A recorded-looking audit stream: one day of normal platform traffic, attacks to
inject into it, and JSONL save/load so a stream captured from a real install replays
through the same tests.

The day follows the workflows the platform runs: agents register at start-up, health
checks activity every half hour while the owner is up, backups are checked four times
a day, a morning briefing fans out to several agents, home is read often and asked to
change something a few times a day (token request, approval, decision), and now and
then a command fails or is refused. Records are chained (``prev_hash``) and numbered
(``seq``) the way the orchestrator's audit writer does.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from dataclasses import dataclass, field
from datetime import date, datetime, time
from pathlib import Path
from zoneinfo import ZoneInfo

from pydantic import JsonValue

from protocol.audit import AuditKind, AuditRecord, Outcome
from security.encoding import canonical_json

DAY = date(2026, 11, 24)
AGENTS = ("health", "home", "notify", "backup", "aggregator", "anomaly")
GENESIS = "0" * 64


@dataclass
class Draft:
    """A record before the writer numbers and chains it; ``tag`` marks injected ones."""

    ts: float
    kind: AuditKind
    identity: str
    action: str = ""
    outcome: Outcome = "ok"
    code: str = ""
    trace_id: str | None = None
    workflow_id: str | None = None
    detail: dict[str, JsonValue] = field(default_factory=dict)
    tag: str = ""


@dataclass
class Stream:
    records: list[AuditRecord]
    tags: dict[str, list[int]]  # tag -> seqs of the records injected under it


def write(drafts: list[Draft]) -> Stream:
    """Number and chain the drafts in time order, as the audit writer would."""
    records: list[AuditRecord] = []
    tags: dict[str, list[int]] = {}
    prev = GENESIS
    for seq, d in enumerate(sorted(drafts, key=lambda d: d.ts), start=1):
        record = AuditRecord(
            seq=seq, ts=round(d.ts, 3), kind=d.kind, identity=d.identity, action=d.action,
            outcome=d.outcome, code=d.code, trace_id=d.trace_id, workflow_id=d.workflow_id,
            detail=d.detail, prev_hash=prev, kid="orch-test")
        prev = hashlib.sha256(canonical_json(record.model_dump(mode="json"))).hexdigest()
        records.append(record)
        if d.tag:
            tags.setdefault(d.tag, []).append(seq)
    return Stream(records, tags)


def save(records: list[AuditRecord], path: Path) -> None:
    path.write_text("".join(r.model_dump_json() + "\n" for r in records))


def load(path: Path) -> list[AuditRecord]:
    return [AuditRecord.model_validate_json(line)
            for line in path.read_text().splitlines() if line.strip()]


class Day:
    """Builds one day's drafts in a time zone, with a seeded generator."""

    def __init__(self, seed: int, day: date = DAY, tz: str = "UTC") -> None:
        self.rng = random.Random(seed)
        self.start = datetime.combine(day, time(0), ZoneInfo(tz)).timestamp()
        self.drafts: list[Draft] = []

    def at(self, hour: float) -> float:
        """Seconds since the epoch for ``hour`` (e.g. 7.25 is 07:15) local time."""
        return self.start + hour * 3600

    def trace(self) -> str:
        return f"{self.rng.getrandbits(128):032x}"

    def add(self, ts: float, kind: AuditKind, identity: str, *, action: str = "",
            outcome: Outcome = "ok", code: str = "", trace_id: str | None = None,
            workflow_id: str | None = None, detail: dict[str, JsonValue] | None = None,
            tag: str = "") -> None:
        self.drafts.append(Draft(ts, kind, identity, action, outcome, code, trace_id,
                                 workflow_id, detail or {}, tag))

    def step(self, ts: float, agent: str, action: str, *, outcome: Outcome | None = None,
             code: str = "", tag: str = "", trace: str | None = None) -> None:
        """One workflow step: a token for it, the command and its result."""
        if outcome is None:
            failed = self.rng.random() < 0.03
            outcome = "error" if failed else "ok"
            code = self.rng.choice(["handler_error", "invalid_input"]) if failed else ""
        trace = trace or self.trace()
        wf = f"wf-{trace[:12]}"
        self.add(ts, "token_issued", "orchestrator", action=f"{agent}.{action}", trace_id=trace,
                 workflow_id=wf, detail={"audience": agent}, tag=tag)
        self.add(ts + 0.01 + self.rng.random() * 0.3, "command", agent, action=action,
                 outcome=outcome, code=code, trace_id=trace, workflow_id=wf, tag=tag)

    def sensitive(self, ts: float, agent: str, action: str, *, decide: bool = True,
                  tag: str = "") -> None:
        """An agent asks for a sensitive action; the owner decides; if approved it runs."""
        trace = self.trace()
        wf = f"wf-{trace[:12]}"
        self.add(ts, "token_request", agent, action=action, outcome="pending", trace_id=trace,
                 workflow_id=wf, tag=tag)
        self.add(ts + 0.05, "approval_requested", "orchestrator", action=f"{agent}.{action}",
                 outcome="pending", trace_id=trace, workflow_id=wf, tag=tag)
        if not decide:
            return
        later = ts + self.rng.uniform(20, 900)
        approved = self.rng.random() < 0.9
        self.add(later, "approval_decided", "operator", action=f"{agent}.{action}",
                 outcome="approved" if approved else "denied", trace_id=trace, workflow_id=wf)
        if approved:
            self.step(later + 0.2, agent, action, outcome="ok", trace=trace)

    def jitter(self, minutes: float) -> float:
        return self.rng.uniform(-minutes, minutes) * 60


def normal_day(seed: int, day: date = DAY, tz: str = "UTC") -> list[Draft]:
    d = Day(seed, day, tz)
    rng = d.rng
    boot = d.at(0) + rng.uniform(1, 30)
    d.add(boot, "system", "orchestrator", action="start", outcome="info")
    d.add(boot + 0.5, "system", "control", action="start", outcome="info")
    for i, agent in enumerate(AGENTS):
        d.add(boot + 2 + i * rng.uniform(0.2, 1.5), "registration", agent, action="register")
    for hour in (0.5, 6.5, 12.5, 18.5):
        d.step(d.at(hour) + d.jitter(3), "backup", "check_backups")
    half_hours = [7 + h / 2 for h in range(31)]
    for hour in half_hours:
        ts = d.at(hour) + d.jitter(2)
        d.step(ts, "health", "check_activity")
        if rng.random() < 0.3:
            d.step(ts + rng.uniform(1, 5), "notify", "notify_owner")
    briefing = d.at(7.5) + d.jitter(10)
    for i, (agent, action) in enumerate([
        ("health", "daily_summary"), ("backup", "check_backups"), ("home", "list_states"),
        ("home", "get_state"), ("home", "get_state"), ("home", "get_state"),
        ("aggregator", "daily_digest"), ("anomaly", "recent_alerts"),
        ("home", "get_state"), ("notify", "notify_owner"),
    ]):
        d.step(briefing + i * rng.uniform(0.5, 3), agent, action)
    d.step(d.at(21.5) + d.jitter(5), "health", "daily_summary")
    for _ in range(rng.randint(8, 30)):
        d.step(d.at(rng.uniform(7, 23.5)), "home", rng.choice(["list_states", "get_state"]))
    for _ in range(rng.randint(0, 3)):
        d.step(d.at(rng.uniform(9, 21)), "anomaly", "recent_alerts")
    for hour in _spread(rng, rng.randint(1, 4), 8, 22, gap_h=0.75):
        d.sensitive(d.at(hour), "home", "call_service")
    if rng.random() < 0.3:
        d.sensitive(d.at(rng.uniform(9, 21)), "notify", "send_message")
    for _ in range(rng.randint(0, 2)):  # a token that expired in a slow workflow
        ts = d.at(rng.uniform(7, 23))
        d.step(ts, rng.choice(AGENTS[:4]), "check", outcome="refused", code="token_expired")
    if rng.random() < 0.1:  # an agent restarting with a stale certificate, once
        d.add(d.at(rng.uniform(1, 23)), "auth_failure", rng.choice(AGENTS), outcome="refused",
              code="authorization_violation")
    return d.drafts


def _spread(rng: random.Random, n: int, lo: float, hi: float, gap_h: float) -> list[float]:
    """``n`` random hours in [lo, hi) at least ``gap_h`` apart."""
    while True:
        hours = sorted(rng.uniform(lo, hi) for _ in range(n))
        if all(b - a >= gap_h for a, b in itertools.pairwise(hours)):
            return hours


# Attacks: each returns the drafts to inject, tagged with its alert kind.

def refusal_burst(seed: int, day: date = DAY, tz: str = "UTC", *, identity: str = "home",
                  at: float = 10.2, count: int = 8) -> list[Draft]:
    """A compromised agent probes subjects it may not use and replays stale tokens."""
    d = Day(seed, day, tz)
    for i in range(count):
        ts = d.at(at) + i * 4
        if i % 2:
            d.add(ts, "command", identity, action="call_service", outcome="refused",
                  code="token_wrong_audience", tag="refusal_burst")
        else:
            d.add(ts, "violation", identity, outcome="refused", code="publish_violation",
                  detail={"operation": "publish", "subject": "mas.agent.notify.send_message"},
                  tag="refusal_burst")
    return d.drafts


def quiet_hours_token(seed: int, day: date = DAY, tz: str = "UTC", *,
                      identity: str = "notify", at: float = 3.3) -> list[Draft]:
    """A message to someone else requested at 03:18, while the owner sleeps."""
    d = Day(seed, day, tz)
    d.sensitive(d.at(at), identity, "send_message", decide=False, tag="quiet_hours_token")
    return d.drafts


def new_identity(seed: int, day: date = DAY, tz: str = "UTC", *,
                 identity: str = "printer", at: float = 14.1) -> list[Draft]:
    """A credential nobody used before tries to log in, twice."""
    d = Day(seed, day, tz)
    for i in range(2):
        d.add(d.at(at) + i * 30, "auth_failure", identity, outcome="refused",
              code="authorization_violation", tag="new_identity")
    return d.drafts


def error_spike(seed: int, day: date = DAY, tz: str = "UTC", *, identity: str = "home",
                at: float = 15.0) -> list[Draft]:
    """Someone feeds an agent input it chokes on: 8 of 12 commands in 4 minutes fail."""
    d = Day(seed, day, tz)
    fails = [True, False, True, True, False, True, True, False, True, False, True, True]
    for i, failed in enumerate(fails):
        d.step(d.at(at) + i * 20, identity, "get_state", outcome="error" if failed else "ok",
               code="handler_error" if failed else "", tag="error_spike")
    return d.drafts


def sensitive_rise(seed: int, day: date = DAY, tz: str = "UTC", *, identity: str = "home",
                   at: float = 16.0, count: int = 9) -> list[Draft]:
    """An agent floods the owner with approval prompts: 9 in 45 minutes."""
    d = Day(seed, day, tz)
    for i in range(count):
        d.sensitive(d.at(at) + i * 300, identity, "call_service", decide=False,
                    tag="sensitive_rise")
    return d.drafts


ATTACKS = {
    "refusal_burst": refusal_burst,
    "quiet_hours_token": quiet_hours_token,
    "new_identity": new_identity,
    "error_spike": error_spike,
    "sensitive_rise": sensitive_rise,
}
