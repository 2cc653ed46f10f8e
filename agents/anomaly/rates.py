"""Detectors that compare a rate in a sliding window with its baseline: the share of
failed commands, and the number of sensitive-action requests.

The baseline is everything that has left the window, blended with a prior (a rate and
how many observations it is worth) so that the first hours after a start do not look
like a spike against an empty history.
"""

from __future__ import annotations

from collections import Counter

from agents.anomaly.alerts import AlertKind, AnomalyAlert, clip, ids
from agents.anomaly.settings import AnomalySettings
from agents.anomaly.windows import Cooldown, Seen, Window
from protocol.audit import AuditRecord
from protocol.explain import Explanation

SENSITIVE_KINDS = frozenset({"token_request", "approval_requested"})
GLOBAL = "*"


def _top(counts: dict[str, int], default: str) -> str:
    return max(counts, key=lambda k: counts[k]) if counts else default


class ErrorSpike:
    """Share of ``error`` outcomes among command results (refusals are the burst
    detector's): alert when the window's rate is both ``error_factor`` times the baseline
    and ``error_min_increase`` above it, over enough samples and errors."""

    kind: AlertKind = "error_spike"

    def __init__(self, settings: AnomalySettings) -> None:
        self.s = settings
        self.window = Window(settings.error_window_s)
        self.cooldown = Cooldown(settings.error_window_s)
        self.base_total = 0
        self.base_errors = 0

    def baseline(self) -> float:
        weight = self.s.error_prior_weight
        total = self.base_total + weight
        if total == 0:
            return self.s.error_prior_rate
        return (self.base_errors + self.s.error_prior_rate * weight) / total

    def feed(self, record: AuditRecord) -> list[AnomalyAlert]:
        if record.kind != "command" or record.outcome not in ("ok", "error"):
            return []
        for gone in self.window.evict(record.ts):
            self.base_total += 1
            self.base_errors += bool(gone.label)
        failed = record.outcome == "error"
        self.window.add(Seen(record.ts, record.seq, record.identity,
                             (record.code or "error") if failed else ""))
        if not failed:
            return []
        errors = [s for s in self.window if s.label]
        total, base = len(self.window), self.baseline()
        rate = len(errors) / total
        if (total < self.s.error_min_samples or len(errors) < self.s.error_min_errors
                or rate < self.s.error_factor * base or rate - base < self.s.error_min_increase
                or not self.cooldown.take(GLOBAL, record.ts)):
            return []
        by_identity = dict(Counter(s.identity for s in errors).most_common(20))
        by_code = dict(Counter(s.label for s in errors).most_common(20))
        minutes = self.s.error_window_s / 60
        return [AnomalyAlert(
            kind=self.kind, severity="high" if rate >= 0.5 else "medium",
            identity=_top(by_identity, GLOBAL), ts=record.ts,
            record_ids=ids([s.seq for s in errors]),
            explanation=Explanation(
                summary=(f"command error rate {rate:.0%} over {minutes:g} min "
                         f"(baseline {base:.1%}), mostly {clip(_top(by_identity, GLOBAL))}"),
                reason=(f"{len(errors)} of the last {total} command results within "
                        f"{minutes:g} min failed, against a baseline of {base:.1%} over "
                        f"{self.base_total} earlier results. A sudden rise in failures can "
                        "mean an outage, a bad deployment, or someone feeding an agent "
                        "input it was not built for."),
                data={"window_errors": len(errors), "window_total": total,
                      "window_rate": round(rate, 4), "baseline_rate": round(base, 4),
                      "baseline_total": self.base_total,
                      "window_s": self.s.error_window_s, "by_identity": by_identity,
                      "by_code": by_code},
                confidence=round(min(0.95, 0.5 + 0.5 * (rate - base)), 2)),
        )]


class SensitiveRise:
    """Distinct sensitive-action requests in the window (a ``token_request`` and the
    ``approval_requested`` of the same trace count once) against the hourly baseline."""

    kind: AlertKind = "sensitive_rise"

    def __init__(self, settings: AnomalySettings) -> None:
        self.s = settings
        self.window = Window(settings.sensitive_window_s)
        self.cooldown = Cooldown(settings.sensitive_window_s)
        self.first_ts: float | None = None
        self.base_requests = 0

    def baseline_per_hour(self, now: float) -> float:
        start = self.first_ts if self.first_ts is not None else now
        hours = max(0.0, now - self.s.sensitive_window_s - start) / 3600
        pseudo = self.s.sensitive_prior_per_hour * self.s.sensitive_prior_hours
        denominator = hours + self.s.sensitive_prior_hours
        return (self.base_requests + pseudo) / denominator if denominator else 0.0

    def feed(self, record: AuditRecord) -> list[AnomalyAlert]:
        if self.first_ts is None:
            self.first_ts = record.ts  # the baseline runs from the first record of any kind
        if record.kind not in SENSITIVE_KINDS:
            return []
        gone = self.window.evict(record.ts)
        key = record.trace_id or record.workflow_id or f"seq:{record.seq}"
        self.window.add(Seen(record.ts, record.seq, record.identity, key))
        staying = {s.label for s in self.window}
        self.base_requests += len({s.label for s in gone} - staying)
        count = len(staying)
        per_hour = self.baseline_per_hour(record.ts)
        expected = per_hour * self.s.sensitive_window_s / 3600
        if (count < self.s.sensitive_min_count or count < self.s.sensitive_factor * expected
                or not self.cooldown.take(GLOBAL, record.ts)):
            return []
        requesters = Counter(s.identity for s in self.window)
        asked = [r for r in requesters if r not in ("orchestrator", "operator")]
        who = max(asked, key=lambda r: requesters[r]) if asked else _top(dict(requesters), GLOBAL)
        hours = self.s.sensitive_window_s / 3600
        return [AnomalyAlert(
            kind=self.kind, severity="high", identity=who, ts=record.ts,
            record_ids=ids(self.window.seqs()),
            explanation=Explanation(
                summary=(f"{count} sensitive-action requests in {hours:g} h "
                         f"(baseline {per_hour:.1f}/h), mostly {clip(who)}"),
                reason=(f"{count} distinct requests for tokens or approvals of sensitive "
                        f"actions within {hours:g} h, where {expected:.1f} would be usual and "
                        f"{self.s.sensitive_min_count} is the floor. A sudden rise can be an "
                        "agent trying to wear the owner down with approval prompts."),
                data={"count": count, "window_s": self.s.sensitive_window_s,
                      "baseline_per_hour": round(per_hour, 3),
                      "expected_in_window": round(expected, 3),
                      "baseline_requests": self.base_requests,
                      "by_identity": dict(requesters.most_common(20)),
                      "records": len(self.window)},
                confidence=round(min(0.95, 0.6 + 0.05 * (count - self.s.sensitive_min_count)),
                                 2)),
        )]
