"""The anomaly agent: every audit record the orchestrator appends goes through the
detectors; each alert is published on ``mas.alert.<kind>`` and kept for
``recent_alerts``. The runtime hands it the records from its durable consumer on the
audit stream (``agents/runtime/audit_feed.py``), so what was appended while it was down
is examined when it is back. State is in memory: after a restart the baselines are
learned again."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agents.anomaly.alerts import AlertKind, AnomalyAlert
from agents.anomaly.settings import AnomalySettings
from agents.anomaly.watcher import Watcher
from agents.runtime import Agent, Context, Event
from protocol.audit import AuditRecord

agent = Agent(
    "anomaly", version="1.0.0", kind="reactive",
    description="Watches the audit stream and raises alerts on suspicious patterns.",
)


class _Current:
    """The one watcher of this process, made on first use from ``MAS_ANOMALY_*`` (and,
    in tests, the context's settings, which take precedence)."""

    watcher: Watcher | None = None

    @classmethod
    def get(cls, ctx: Context) -> Watcher:
        if cls.watcher is None:
            cls.watcher = Watcher(AnomalySettings(**ctx.settings))  # type: ignore[arg-type]
        return cls.watcher


def reset() -> None:
    """Forget everything learned (tests start each scenario from scratch)."""
    _Current.watcher = None


@agent.on_event("mas.audit.>")
async def watch(event: Event, ctx: Context) -> None:
    try:
        record = AuditRecord.model_validate_json(event.data)
    except ValidationError as exc:
        ctx.log.warning("anomaly.bad_record", subject=event.subject, errors=exc.error_count())
        return
    for alert in _Current.get(ctx).feed(record):
        ctx.log.info("anomaly.alert", kind=alert.kind, severity=alert.severity,
                     records=len(alert.record_ids))
        await ctx.alert(alert.kind, alert)


class RecentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: Annotated[int, Field(ge=1, le=200)] = 20
    kind: AlertKind | None = None


class RecentOut(BaseModel):
    alerts: list[AnomalyAlert]  # newest first
    raised: dict[str, int]  # per kind since start
    records_seen: int
    learning: bool  # still learning which identities are normal


@agent.action(description="Alerts raised recently.")
async def recent_alerts(args: RecentIn, ctx: Context) -> RecentOut:
    watcher = _Current.get(ctx)
    matching = [a for a in reversed(watcher.recent) if args.kind in (None, a.kind)]
    return RecentOut(alerts=matching[: args.limit], raised=dict(watcher.raised),
                     records_seen=watcher.records_seen, learning=watcher.learning)
