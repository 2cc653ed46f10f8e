"""Single-use tokens: remember each consumed ``jti`` until its token expires.

In memory the ledger is bounded by time (an entry goes an hour after use or at the
token's expiry, whichever is later) and by a hard cap that fails closed: when full of unexpired
entries it refuses new single-use tokens rather than forgetting used ones. With a KV
bucket (stateful agents) the claim is an atomic create, so it holds across replicas of
the agent and across restarts.
"""

from __future__ import annotations

import time

import nats.js.errors
from nats.js.kv import KeyValue

PREFIX = "used-jti."
# Workflow steps reuse their jti when a token is re-minted after a restart, so an entry
# is kept past its token's expiry: long enough for any resume.
RETAIN_S = 3600


class SingleUseLedger:
    def __init__(self, kv: KeyValue | None = None, *, capacity: int = 100_000) -> None:
        self.kv = kv
        self.capacity = capacity
        self._used: dict[str, int] = {}

    def _prune(self, now: float) -> None:
        for jti in [j for j, exp in self._used.items() if exp < now]:
            del self._used[jti]

    async def consume(self, jti: str, exp: int) -> bool:
        """True the first time ``jti`` is presented, False on every later try."""
        now = time.time()
        if jti in self._used:
            return False
        if len(self._used) >= self.capacity:
            self._prune(now)
            if len(self._used) >= self.capacity:
                return False
        if self.kv is not None:
            try:
                await self.kv.create(PREFIX + jti, str(exp).encode())
            except nats.js.errors.KeyWrongLastSequenceError:
                self._used[jti] = max(exp, int(now) + RETAIN_S)
                return False
        self._used[jti] = max(exp, int(now) + RETAIN_S)
        return True
