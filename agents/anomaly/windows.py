"""Small building blocks the detectors share: a time window over records and a cooldown
that lets one alert per cause through per window."""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass

MAX_WINDOW_ITEMS = 10_000  # a flood cannot grow a window without bound


@dataclass(frozen=True)
class Seen:
    """What a detector keeps of one record: never its payload."""

    ts: float
    seq: int
    identity: str
    label: str = ""


class Window:
    """The records of the last ``span_s`` seconds (by the records' own clock)."""

    def __init__(self, span_s: float) -> None:
        self.span_s = span_s
        self._items: deque[Seen] = deque(maxlen=MAX_WINDOW_ITEMS)

    def add(self, item: Seen) -> None:
        self._items.append(item)

    def evict(self, now: float) -> list[Seen]:
        """Drop and return the items older than the window ending at ``now``."""
        gone: list[Seen] = []
        while self._items and self._items[0].ts <= now - self.span_s:
            gone.append(self._items.popleft())
        return gone

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Seen]:
        return iter(self._items)

    def seqs(self) -> list[int]:
        return [s.seq for s in self._items]

    def count_by(self, attr: str) -> dict[str, int]:
        return dict(Counter(str(getattr(s, attr)) for s in self._items).most_common(20))


class Cooldown:
    """Rate-limits alerts: one per key per ``window_s`` seconds of record time."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._last: dict[str, float] = {}

    def ready(self, key: str, ts: float) -> bool:
        last = self._last.get(key)
        return last is None or ts - last >= self.window_s

    def mark(self, key: str, ts: float) -> None:
        if len(self._last) > 4096:
            self._last = {k: t for k, t in self._last.items() if ts - t < self.window_s}
        self._last[key] = ts

    def take(self, key: str, ts: float) -> bool:
        """True (and start the cooldown) if an alert for ``key`` may go out now."""
        if not self.ready(key, ts):
            return False
        self.mark(key, ts)
        return True
