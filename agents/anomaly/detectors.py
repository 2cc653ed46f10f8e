"""Detectors that look at one identity at a time: refusal bursts, token requests at
quiet hours, identities never seen before.

Each is a small pure class: ``feed(record)`` returns the alerts that record triggers
(usually none). Time is the records' own ``ts``, so replays are deterministic.
"""

from __future__ import annotations

from datetime import datetime, time
from typing import Protocol

from agents.anomaly.alerts import AlertKind, AnomalyAlert, clip, ids
from agents.anomaly.settings import PLATFORM_IDENTITIES, AnomalySettings
from agents.anomaly.windows import Cooldown, Seen, Window
from protocol.audit import AuditRecord
from protocol.explain import Explanation

BROKER_REFUSALS = frozenset({"violation", "auth_failure"})
MAX_IDENTITIES = 10_000


class Detector(Protocol):
    kind: AlertKind

    def feed(self, record: AuditRecord) -> list[AnomalyAlert]: ...


def is_refusal(record: AuditRecord) -> bool:
    """The broker or the runtime said no: a violation, a failed login, a refused command,
    a token request the orchestrator denied."""
    return (record.kind in BROKER_REFUSALS or record.outcome == "refused"
            or (record.kind == "token_request" and record.outcome == "denied"))


class RefusalBurst:
    kind: AlertKind = "refusal_burst"

    def __init__(self, settings: AnomalySettings) -> None:
        self.window_s = settings.burst_window_s
        self.threshold = settings.burst_threshold
        self.cooldown = Cooldown(self.window_s)
        self._windows: dict[str, Window] = {}

    def feed(self, record: AuditRecord) -> list[AnomalyAlert]:
        if not is_refusal(record):
            return []
        who = record.identity
        if who not in self._windows and len(self._windows) >= MAX_IDENTITIES:
            self._forget_quiet(record.ts)
        window = self._windows.setdefault(who, Window(self.window_s))
        cause = f"{record.kind}:{record.code or record.outcome}"
        window.add(Seen(record.ts, record.seq, who, cause))
        window.evict(record.ts)
        if len(window) < self.threshold or not self.cooldown.take(who, record.ts):
            return []
        count = len(window)
        causes = window.count_by("label")
        broker_said = any(c.split(":")[0] in BROKER_REFUSALS for c in causes)
        return [AnomalyAlert(
            kind=self.kind, identity=who, ts=record.ts, record_ids=ids(window.seqs()),
            severity="high" if broker_said or count >= 2 * self.threshold else "medium",
            explanation=Explanation(
                summary=f"{clip(who)}: {count} refusals or violations in {self.window_s:g} s",
                reason=(f"{count} refused requests, broker violations or failed logins by "
                        f"{clip(who)} within {self.window_s:g} s reach the threshold of "
                        f"{self.threshold}. A working identity is rarely refused; a burst "
                        "suggests probing, a stolen credential or a broken deployment."),
                data={"count": count, "threshold": self.threshold,
                      "window_s": self.window_s, "by_cause": dict(causes)},
                confidence=round(min(0.95, 0.6 + 0.05 * (count - self.threshold)), 2)),
        )]

    def _forget_quiet(self, now: float) -> None:
        for who in list(self._windows):
            self._windows[who].evict(now)
            if not len(self._windows[who]):
                del self._windows[who]


def in_quiet_hours(local: time, start: time, end: time) -> bool:
    """``[start, end)``, wrapping past midnight when ``end <= start``; empty if equal."""
    if start == end:
        return False
    if start < end:
        return start <= local < end
    return local >= start or local < end


class QuietHoursTokens:
    kind: AlertKind = "quiet_hours_token"

    def __init__(self, settings: AnomalySettings) -> None:
        self.zone = settings.zone
        self.timezone = settings.timezone
        self.start, self.end = settings.quiet_start, settings.quiet_end
        self.cooldown = Cooldown(settings.quiet_cooldown_s)

    def feed(self, record: AuditRecord) -> list[AnomalyAlert]:
        if record.kind != "token_request":
            return []
        local = datetime.fromtimestamp(record.ts, self.zone)
        if not in_quiet_hours(local.time(), self.start, self.end):
            return []
        if not self.cooldown.take(record.identity, record.ts):
            return []
        at = local.strftime("%H:%M")
        hours = f"{self.start:%H:%M}-{self.end:%H:%M} {self.timezone}"
        who = clip(record.identity)
        return [AnomalyAlert(
            kind=self.kind, severity="medium", identity=record.identity, ts=record.ts,
            record_ids=[record.seq],
            explanation=Explanation(
                summary=f"{who} asked for a token at {at}, inside quiet hours ({hours})",
                reason=(f"Sensitive actions need the owner, who is normally asleep during "
                        f"{hours}; a token request by {who} at {at} local time is unusual. "
                        "Further requests by it are folded into this alert for "
                        f"{self.cooldown.window_s:g} s."),
                data={"local_time": local.strftime("%Y-%m-%d %H:%M:%S"),
                      "timezone": self.timezone, "quiet_start": f"{self.start:%H:%M}",
                      "quiet_end": f"{self.end:%H:%M}", "action": record.action,
                      "outcome": record.outcome},
                confidence=0.7),
        )]


class NewIdentity:
    """With a configured identity list, anything outside it (alerted once per cooldown
    while it keeps appearing). Without one, the identities of the first ``learning_s``
    seconds of records are the baseline and each later newcomer is alerted once."""

    kind: AlertKind = "new_identity"

    def __init__(self, settings: AnomalySettings) -> None:
        self.listed = settings.known
        self.learning_s = settings.learning_s
        self.seen: set[str] = set(PLATFORM_IDENTITIES | self.listed)
        self.learn_until: float | None = None
        self.last_ts: float | None = None
        self.cooldown = Cooldown(settings.identity_cooldown_s)

    @property
    def learning(self) -> bool:
        if self.listed:
            return False
        return self.learn_until is None or self.last_ts is None or self.last_ts < self.learn_until

    def feed(self, record: AuditRecord) -> list[AnomalyAlert]:
        self.last_ts = record.ts
        if self.learn_until is None:
            self.learn_until = record.ts + self.learning_s
        who = record.identity
        if not who or who in self.seen:
            return []
        known = len(self.seen)
        if not self.listed:
            if known < MAX_IDENTITIES:
                self.seen.add(who)  # learned: alerted this once, known from now on
            if record.ts < self.learn_until:
                return []
        if not self.cooldown.take(who, record.ts):
            return []
        return [self._alert(record, known)]

    def _alert(self, record: AuditRecord, known: int) -> AnomalyAlert:
        who = clip(record.identity)
        if self.listed:
            mode = "list"
            reason = (f"{who} is not one of the {len(self.listed)} identities this install "
                      "knows (MAS_ANOMALY_KNOWN_IDENTITIES) nor a platform identity.")
        else:
            mode = "learned"
            reason = (f"{who} appeared in none of the records of the first "
                      f"{self.learning_s:g} s (the learning period) nor since.")
        loud = bool(self.listed) or record.kind in BROKER_REFUSALS
        return AnomalyAlert(
            kind=self.kind, severity="high" if loud else "medium", identity=record.identity,
            ts=record.ts, record_ids=[record.seq],
            explanation=Explanation(
                summary=f"identity {who} never seen before ({record.kind}, {record.outcome})",
                reason=reason + " A new identity may be a new agent someone forgot to "
                                "announce, or a credential that should not exist.",
                data={"mode": mode, "known_count": known,
                      "first_kind": record.kind, "first_action": record.action,
                      "first_outcome": record.outcome},
                confidence=0.9 if mode == "list" else 0.6),
        )
