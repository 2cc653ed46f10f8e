"""Single-use tokens: remember each consumed ``jti`` until its token expires.

In memory the ledger is bounded by time (an entry goes an hour after use or at the
token's expiry, whichever is later) and by a hard cap that fails closed: when full of unexpired
entries it refuses new single-use tokens rather than forgetting used ones. With a KV
bucket (stateful agents) the claim is an atomic create, so it holds across replicas of
the agent and across restarts, and each record carries a per-message TTL (nats-server
2.11+, ``allow_msg_ttl``, which nats-py sets on every bucket it creates): the server
removes it once the token it records can no longer pass verification (its expiry plus the
verifier's leeway and a margin for clock skew, and never before ``retain_s``), so the
bucket does not grow with every token ever used and a replay is refused either way.
"""

from __future__ import annotations

import time

import nats.js.errors
from nats.js.kv import KeyValue

from security.tokens import DEFAULT_LEEWAY_S

PREFIX = "used-jti."
# Workflow steps reuse their jti when a token is re-minted after a restart, so an entry
# is kept past its token's expiry: long enough for any resume.
RETAIN_S = 3600
# Past a token's expiry a verifier still accepts it for its leeway; clocks of replicas on
# other machines may run behind by this much more.
SKEW_S = 60


def record_ttl(exp: int, now: float, retain_s: int = RETAIN_S) -> int:
    """How long a used jti must be remembered: until no verifier accepts its token."""
    return max(int(exp - now) + 1 + DEFAULT_LEEWAY_S + SKEW_S, retain_s)


class SingleUseLedger:
    def __init__(self, kv: KeyValue | None = None, *, capacity: int = 100_000,
                 retain_s: int = RETAIN_S) -> None:
        self.kv = kv
        self.capacity = capacity
        self.retain_s = retain_s
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
        keep_until = int(now) + record_ttl(exp, now, self.retain_s)
        if self.kv is not None:
            try:
                await self.kv.create(PREFIX + jti, str(exp).encode(),
                                     msg_ttl=record_ttl(exp, now, self.retain_s))
            except nats.js.errors.KeyWrongLastSequenceError:
                self._used[jti] = keep_until
                return False
        self._used[jti] = keep_until
        return True
