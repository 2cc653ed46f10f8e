"""Revocation through the KV bucket on a real broker: the orchestrator revokes, an agent's
watcher sees it, and the agent's token check refuses on the next message."""

from __future__ import annotations

import asyncio
import time

import pytest

from broker.revocations import RevocationStore, RevocationWatcher
from security.errors import TokenRevoked
from security.revocation import Revocation
from security.tokens import TokenIssuer, TokenVerifier
from tests.conftest import ConnectAs


async def _until_revoked(check, timeout: float = 1.0) -> float:  # type: ignore[no-untyped-def]
    """Seconds until ``check()`` raises TokenRevoked; fails the test after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            check()
        except TokenRevoked:
            return time.monotonic() - start
        await asyncio.sleep(0.01)
    raise AssertionError(f"token still accepted {timeout}s after revocation")


async def test_revocations_reach_agents_within_a_second(connect_as: ConnectAs) -> None:
    orch, agent = await connect_as("orchestrator"), await connect_as("health")
    store = await RevocationStore.open(orch)
    watcher = RevocationWatcher(agent)
    await watcher.start()
    issuer = TokenIssuer("orchestrator", orch.material.signing_key)
    verifier = TokenVerifier(agent.material.trust.issuer_ring(), issuer="orchestrator")
    token_a, claims_a = issuer.issue(audience="health", actions=["daily_summary"])
    token_b, _ = issuer.issue(audience="health", actions=["daily_summary"])

    def check(token: str) -> object:
        return verifier.verify(token, audience="health", action="daily_summary",
                               revocations=watcher.revocations)

    check(token_a)
    check(token_b)
    now = int(time.time())
    await store.revoke(Revocation(kind="jti", target=claims_a.jti, revoked_at=now,
                                  expires_at=claims_a.exp, reason="test", by="operator"))
    assert await _until_revoked(lambda: check(token_a)) < 1.0
    check(token_b)

    await store.revoke(Revocation(kind="agent", target="health", revoked_at=now + 1,
                                  reason="kill switch", by="operator"))
    assert await _until_revoked(lambda: check(token_b)) < 1.0
    await store.lift("agent", "health")
    await store.lift("jti", claims_a.jti)
    deadline = time.monotonic() + 1
    while time.monotonic() < deadline and len(watcher.revocations):  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    check(token_b)
    await watcher.stop()


async def test_malformed_entry_is_skipped_not_fatal(connect_as: ConnectAs) -> None:
    orch, agent = await connect_as("orchestrator"), await connect_as("aggregator")
    store = await RevocationStore.open(orch)
    watcher = RevocationWatcher(agent)
    await watcher.start()
    await store.kv.put("jti.garbage", b"{not json")
    await store.revoke(Revocation(kind="jti", target="after_garbage", revoked_at=1))
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        if any(e.target == "after_garbage" for e in watcher.revocations.entries()):
            break
        await asyncio.sleep(0.01)
    else:
        pytest.fail("watcher stopped after a malformed entry")
    await store.kv.delete("jti.garbage")
    await store.lift("jti", "after_garbage")
    await watcher.stop()
