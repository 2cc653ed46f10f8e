"""Sending one workflow step to an agent, with a capability token minted for that step.

The token's audience is the agent, its scope the one action and its subject, its
lifetime short; for a sensitive action it is also bound to the argument hash and the
approval, and single-use.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from broker import subjects as subj
from broker.connection import BrokerClient
from protocol.actions import REPLY, Completed, Failed, Refused
from security.encoding import args_sha256, canonical_json
from security.tokens import CapabilityClaims, TokenIssuer

STEP_TOKEN_LIFETIME_S = 60


class AgentCaller:
    def __init__(self, client: BrokerClient, issuer: TokenIssuer) -> None:
        self.client = client
        self.issuer = issuer

    def mint(self, agent: str, action: str, args: dict[str, Any], *,
             approval_id: str | None = None, jti: str | None = None,
             lifetime_s: int = STEP_TOKEN_LIFETIME_S) -> tuple[str, CapabilityClaims]:
        """A token for exactly this step; bound to ``args`` when ``approval_id`` is given.
        With ``jti`` (a step's idempotency key) the token is single-use: the agent runs
        the step once even if a restarted orchestrator sends it again."""
        return self.issuer.issue(
            audience=agent, actions=[action], subjects=[subj.command(agent, action)],
            lifetime_s=lifetime_s,
            args_sha256=args_sha256(args) if approval_id else None,
            approval_id=approval_id, single_use=approval_id is not None or jti is not None,
            jti=jti)

    async def call(self, agent: str, action: str, args: dict[str, Any], *,
                   token: str | None = None, approval_id: str | None = None,
                   jti: str | None = None, timeout: float = 10.0) -> Completed | Refused | Failed:
        """Run ``action`` on ``agent``; ``token`` overrides the one minted for the step."""
        if token is None:
            token, _ = self.mint(agent, action, args, approval_id=approval_id, jti=jti)
        reply = await self.client.request(subj.command(agent, action), canonical_json(args),
                                          token=token, timeout=timeout)
        if reply.sender != agent:
            return Refused(code="wrong_responder", reason=f"answered by {reply.sender}")
        try:
            return REPLY.validate_json(reply.data)
        except ValidationError:
            return Failed(code="bad_reply", reason=f"{agent} answered with something that is "
                          "not an action reply")
