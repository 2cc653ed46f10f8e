"""All detectors over one audit stream, with the recent alerts kept for ``recent_alerts``.

Pure: records in, alerts out. The agent feeds it live records; the tests feed it
recorded or generated streams directly.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable

from agents.anomaly.alerts import AnomalyAlert
from agents.anomaly.detectors import Detector, NewIdentity, QuietHoursTokens, RefusalBurst
from agents.anomaly.rates import ErrorSpike, SensitiveRise
from agents.anomaly.settings import AnomalySettings
from protocol.audit import AuditRecord

DEDUP_SEQS = 4096


class Watcher:
    def __init__(self, settings: AnomalySettings | None = None) -> None:
        self.settings = settings or AnomalySettings()
        self.identities = NewIdentity(self.settings)
        self.detectors: list[Detector] = [
            RefusalBurst(self.settings), QuietHoursTokens(self.settings), self.identities,
            ErrorSpike(self.settings), SensitiveRise(self.settings),
        ]
        self.recent: deque[AnomalyAlert] = deque(maxlen=self.settings.recent_max)
        self.raised: Counter[str] = Counter()
        self.records_seen = 0
        self.duplicates = 0
        self._seqs: deque[int] = deque(maxlen=DEDUP_SEQS)
        self._seq_set: set[int] = set()

    @property
    def learning(self) -> bool:
        return self.identities.learning

    def feed(self, record: AuditRecord) -> list[AnomalyAlert]:
        """The alerts ``record`` triggers. A record seen again (same ``seq`` among the
        last few thousand) is ignored, so a redelivery cannot double-count."""
        if record.seq in self._seq_set:
            self.duplicates += 1
            return []
        if len(self._seqs) == self._seqs.maxlen:
            self._seq_set.discard(self._seqs[0])
        self._seqs.append(record.seq)
        self._seq_set.add(record.seq)
        self.records_seen += 1
        alerts = [alert for detector in self.detectors for alert in detector.feed(record)]
        self.recent.extend(alerts)
        self.raised.update(a.kind for a in alerts)
        return alerts

    def feed_all(self, records: Iterable[AuditRecord]) -> list[AnomalyAlert]:
        return [alert for record in records for alert in self.feed(record)]
