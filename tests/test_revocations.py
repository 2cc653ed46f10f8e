"""Revocation on a real broker: the orchestrator revokes, every agent's follower learns
it from a signed broadcast (or its start-up snapshot), and the agent's token check
refuses on the next message. Nobody but the orchestrator can revoke or lift."""

from __future__ import annotations

import asyncio
import time

import pytest

from broker import subjects as subj
from broker.connection import SignedMessage
from broker.revocations import RevocationAuthority, RevocationFollower
from security.errors import TokenRevoked
from security.revocation import Revocation
from security.tokens import CapabilityClaims, TokenIssuer, TokenVerifier
from tests.conftest import ConnectAs, eventually, settle, wait_for_violation


def _revoked(verifier: TokenVerifier, follower: RevocationFollower, token: str) -> bool:
    try:
        verifier.verify(token, audience="health", action="daily_summary",
                        revocations=follower.revocations)
    except TokenRevoked:
        return True
    return False


def _jti(claims: CapabilityClaims, reason: str = "test") -> Revocation:
    return Revocation(kind="jti", target=claims.jti, revoked_at=int(time.time()),
                      expires_at=claims.exp, reason=reason, by="operator")


async def test_revocation_reaches_the_agent_within_a_second(connect_as: ConnectAs) -> None:
    orch, agent = await connect_as("orchestrator"), await connect_as("health")
    authority = await RevocationAuthority.start(orch)
    follower = RevocationFollower(agent)
    await follower.start()
    issuer = TokenIssuer("orchestrator", orch.material.signing_key)
    verifier = TokenVerifier(agent.material.trust.issuer_ring(), issuer="orchestrator")
    token_a, claims_a = issuer.issue(audience="health", actions=["daily_summary"])
    token_b, _ = issuer.issue(audience="health", actions=["daily_summary"])
    assert not _revoked(verifier, follower, token_a)

    await authority.revoke(_jti(claims_a))
    assert await eventually(lambda: _revoked(verifier, follower, token_a)) < 1.0
    assert not _revoked(verifier, follower, token_b)

    await authority.revoke(Revocation(kind="agent", target="health",
                                      revoked_at=int(time.time()) + 1, reason="kill switch"))
    assert await eventually(lambda: _revoked(verifier, follower, token_b)) < 1.0

    await authority.lift("agent", "health")
    await authority.lift("jti", claims_a.jti)
    await eventually(lambda: not _revoked(verifier, follower, token_b)
                 and not _revoked(verifier, follower, token_a))


async def test_an_agent_starting_later_gets_the_snapshot(connect_as: ConnectAs) -> None:
    orch = await connect_as("orchestrator")
    authority = await RevocationAuthority.start(orch)
    issuer = TokenIssuer("orchestrator", orch.material.signing_key)
    token, claims = issuer.issue(audience="health", actions=["daily_summary"])
    await authority.revoke(_jti(claims, "before the agent started"))
    agent = await connect_as("health")
    follower = RevocationFollower(agent)
    await follower.start()
    verifier = TokenVerifier(agent.material.trust.issuer_ring(), issuer="orchestrator")
    assert _revoked(verifier, follower, token)
    await authority.lift("jti", claims.jti)


async def test_the_store_survives_an_orchestrator_restart(connect_as: ConnectAs) -> None:
    first = await connect_as("orchestrator")
    authority = await RevocationAuthority.start(first)
    entry = Revocation(kind="jti", target="survivor123", revoked_at=1, reason="restart")
    await authority.revoke(entry)
    await first.close()
    again = await RevocationAuthority.start(await connect_as("orchestrator"))
    assert entry in again.revocations.entries()
    await again.lift("jti", "survivor123")


@pytest.mark.attack("forge, replay or extend tokens",
                    threat="an agent lifts a revocation to bring its tokens back")
@pytest.mark.parametrize("rogue_name", ["notify", "anomaly"])
async def test_no_agent_can_revoke_or_lift(connect_as: ConnectAs, rogue_name: str) -> None:
    orch = await connect_as("orchestrator")
    authority = await RevocationAuthority.start(orch)
    await authority.revoke(Revocation(kind="agent", target="home", revoked_at=2**31))
    victim = await connect_as("home")
    follower = RevocationFollower(victim)
    await follower.start()
    rogue = await connect_as(rogue_name)
    lift = b'{"op": "lift", "kind": "agent", "target": "home"}'
    await rogue.publish(subj.revocation("agent", "home"), lift)
    await wait_for_violation(rogue, "publish", subj.revocation("agent", "home"))
    await rogue.nc.publish(f"$KV.{subj.REVOCATIONS_BUCKET}.agent.home", b"")
    await wait_for_violation(rogue, "publish", f"$KV.{subj.REVOCATIONS_BUCKET}.agent.home")
    await settle(rogue, victim)
    assert [e.target for e in follower.revocations.entries()] == ["home"]
    await authority.lift("agent", "home")


async def test_a_change_signed_by_anyone_but_the_orchestrator_is_ignored(
    connect_as: ConnectAs,
) -> None:
    """Even if a lift reached the follower, a non-orchestrator signature is refused."""
    agent = await connect_as("health")
    follower = RevocationFollower(agent)
    orch = await connect_as("orchestrator")
    await RevocationAuthority.start(orch)
    await follower.start()
    follower.revocations.apply(Revocation(kind="agent", target="health", revoked_at=2**31))
    await follower._on_change(SignedMessage(  # drive the handler as a verified message would
        subject="mas.revocation.agent.health", sender="health", token=None, trace_id=None,
        reply=None, nonce="n" * 22,
        data=b'{"op": "lift", "kind": "agent", "target": "health"}'))
    assert len(follower.revocations) == 1


async def test_expired_jti_entries_are_forgotten(connect_as: ConnectAs) -> None:
    """A revoked token that has expired anyway need not be remembered (bounded memory)."""
    orch, agent = await connect_as("orchestrator"), await connect_as("backup")
    authority = await RevocationAuthority.start(orch)
    follower = RevocationFollower(agent)
    await follower.start()
    now = int(time.time())
    await authority.revoke(Revocation(kind="jti", target="long_gone_1", revoked_at=now - 100,
                                      expires_at=now - 50))
    await authority.revoke(Revocation(kind="jti", target="still_live1", revoked_at=now,
                                      expires_at=now + 600))
    await eventually(lambda: any(e.target == "still_live1" for e in follower.revocations.entries()))
    assert [e.target for e in follower.revocations.entries()] == ["still_live1"]
    await authority.lift("jti", "long_gone_1")
    await authority.lift("jti", "still_live1")


async def test_an_agent_started_before_the_orchestrator_waits_for_it(
    connect_as: ConnectAs,
) -> None:
    """Agents may come up first (compose starts them in parallel): the follower retries
    the snapshot until the orchestrator answers instead of failing."""
    agent = await connect_as("notify")
    follower = RevocationFollower(agent)
    starting = asyncio.create_task(follower.start())
    await asyncio.sleep(0.3)
    assert not starting.done()
    await RevocationAuthority.start(await connect_as("orchestrator"))
    await asyncio.wait_for(starting, 10)
