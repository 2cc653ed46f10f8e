"""The audit stream, for agents granted ``read_streams: [audit]`` (the anomaly agent).

``MAS_AUDIT`` lives in the PLATFORM account and only the orchestrator writes it. The
orchestrator also makes, at every start, one durable pull consumer on it named after each
such agent (``orchestrator.audit.reader_config``): explicit acks, bounded redeliveries
and pull requests. The agent's account imports exactly two subjects of it from PLATFORM,
the consumer's fetch subject (under ``subjects.AUDIT_API``) and its acks
(``broker/accounts.py``), so here the agent only binds and pulls: it can neither make,
change nor delete a consumer, nor reach any other JetStream API of the platform.

Replicas share the consumer, so each record is handled by one of them, once; it comes
again (up to ``AUDIT_MAX_DELIVER`` times in all) only when a handler fails or a replica
dies before acknowledging it. Records appended while the agent is down wait in the stream
and are handled when it is back. Until the orchestrator has made the consumer, fetches
fail and are retried every second.

The checks are those of ``feed.EventFeed``: the envelope signed by the orchestrator (the
one sender ``senders`` allows on ``mas.audit.*``), signed when the stream stored it, no
nonce under two sequences. Unlike an event, a record may be of any age: the stream keeps
every record, and an agent down for a week still reads that week.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from agents.runtime.context import Context
from agents.runtime.declare import EventDef
from agents.runtime.feed import EventFeed, FeedSettings
from broker import subjects as subj
from broker.connection import BrokerClient

ANY_AGE_MS = 100 * 365 * 24 * 3600 * 1000


class AuditFeed(EventFeed):
    max_age_ms = ANY_AGE_MS

    def __init__(self, client: BrokerClient, agent: str, events: list[EventDef],
                 context: Context, settings: FeedSettings | None = None) -> None:
        # the consumer, made by the orchestrator, gives up after AUDIT_MAX_DELIVER attempts
        settings = replace(settings or FeedSettings(), max_deliver=subj.AUDIT_MAX_DELIVER)
        super().__init__(client, agent, events, context, settings)
        self.stream = subj.AUDIT_STREAM
        self.subjects = [subj.AUDIT_FEED]

    async def _bind(self) -> Any:
        js = self.client.nc.jetstream(prefix=subj.AUDIT_API, timeout=5)
        return await js.pull_subscribe_bind(durable=self.agent, stream=self.stream)
