"""Approval decisions: the operator's signed yes or no to one sensitive action.

A decision names the approval and the hash of the exact arguments it approves, so it
cannot be moved to another request or other arguments. The signed bytes are a domain
tag and the RFC 8785 canonical JSON of every field but ``sig``; only keys in the
install's approver ring (the operator's) verify. Neither an agent nor the planner holds
such a key.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from security.encoding import b64url_decode, b64url_encode, canonical_json
from security.errors import DecisionError
from security.keys import KeyRing, SigningKey

DOMAIN = b"mas-approval-decision/1\n"


class ApprovalDecision(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    approval_id: Annotated[str, Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")]
    args_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    decision: Literal["approve", "deny"]
    reason: Annotated[str, Field(max_length=500)] = ""
    by: Annotated[str, Field(max_length=64)]
    decided_at: int
    kid: Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]
    sig: Annotated[str, Field(max_length=128)] = ""

    def signing_bytes(self) -> bytes:
        return DOMAIN + canonical_json(self.model_dump(mode="json", exclude={"sig"}))


def sign_decision(key: SigningKey, *, approval_id: str, args_sha256: str,
                  decision: Literal["approve", "deny"], reason: str, by: str,
                  now: int | None = None) -> ApprovalDecision:
    unsigned = ApprovalDecision(
        approval_id=approval_id, args_sha256=args_sha256, decision=decision, reason=reason,
        by=by, decided_at=int(time.time()) if now is None else now, kid=key.kid)
    return unsigned.model_copy(update={"sig": b64url_encode(key.sign(unsigned.signing_bytes()))})


def verify_decision(decision: ApprovalDecision, approvers: KeyRing) -> ApprovalDecision:
    key = approvers.get(decision.kid)
    if key is None:
        raise DecisionError(f"key {decision.kid} is not an approver's key")
    try:
        signature = b64url_decode(decision.sig)
    except ValueError as exc:
        raise DecisionError("decision signature is not base64url") from exc
    if not key.verify(decision.signing_bytes(), signature):
        raise DecisionError("decision signature does not verify")
    return decision
