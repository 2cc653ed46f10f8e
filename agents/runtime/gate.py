"""The checks a command passes before its handler runs.

The envelope (sender signature, timestamp, nonce) is verified by the broker client
before this module sees the message. Here: the sender must be the orchestrator, the
payload must be a JSON object, and the capability token must verify for this agent,
this action and this subject, not be revoked, and for a sensitive action be bound to
exactly these arguments, carry an approval and be used once only. Any failure is a
``Refusal`` with a code; the handler never sees the message.
"""

from __future__ import annotations

import json
from typing import Any

from agents.runtime.ledger import SingleUseLedger
from security.encoding import CanonicalizationError, args_sha256
from security.errors import TokenError
from security.tokens import CapabilityClaims, RevocationCheck, TokenVerifier

COMMANDER = "orchestrator"
MAX_ARGS_BYTES = 256 * 1024


class Refusal(Exception):
    def __init__(self, code: str, reason: str, *, jti: str | None = None) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.jti = jti  # the token a replay refusal is about


def parse_args(data: bytes) -> dict[str, Any]:
    if len(data) > MAX_ARGS_BYTES:
        raise Refusal("invalid_input", f"arguments larger than {MAX_ARGS_BYTES} bytes")
    try:
        args = json.loads(data or b"{}")
    except (ValueError, RecursionError) as exc:
        raise Refusal("invalid_input", "arguments are not JSON") from exc
    if not isinstance(args, dict):
        raise Refusal("invalid_input", "arguments must be a JSON object")
    return args


class CommandGate:
    def __init__(self, agent: str, verifier: TokenVerifier, revocations: RevocationCheck,
                 ledger: SingleUseLedger) -> None:
        self.agent = agent
        self.verifier = verifier
        self.revocations = revocations
        self.ledger = ledger

    async def admit(self, *, sender: str, subject: str, action: str, sensitive: bool,
                    token: str | None, args: dict[str, Any]) -> CapabilityClaims:
        if sender != COMMANDER:
            raise Refusal("not_commander", f"commands come from the {COMMANDER}, not {sender}")
        if token is None:
            raise Refusal("token_missing", "a command needs a capability token")
        try:
            digest = args_sha256(args) if sensitive else None
        except CanonicalizationError as exc:
            raise Refusal("invalid_input", f"arguments cannot be canonicalised: {exc}") from exc
        try:
            claims = self.verifier.verify(token, audience=self.agent, action=action,
                                          subject=subject, args_sha256=digest,
                                          revocations=self.revocations)
        except TokenError as exc:
            raise Refusal(exc.code, str(exc)) from exc
        if sensitive and (not claims.single_use or not claims.approval_id):
            raise Refusal("approval_required",
                          f"{action} is sensitive: it needs a single-use approved token")
        if claims.single_use and not await self.ledger.consume(claims.jti, claims.exp):
            raise Refusal("token_replayed", f"single-use token {claims.jti} was used before",
                          jti=claims.jti)
        return claims
