"""`mas tokens list`: the capability tokens the orchestrator issued recently, from the
audit log, and whether each is still live, expired or revoked.

The orchestrator keeps no table of live tokens (a token is self-contained and short-
lived); the audit log has a ``token_issued`` record for each, and the revocations
bucket holds what is revoked now. The operator reads both with read-only grants.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ValidationError

from protocol.audit import AuditRecord
from security.revocation import Revocation

TokenState = Literal["live", "expired", "revoked"]


class TokenRow(BaseModel):
    jti: str
    agent: str
    action: str
    issued_at: float
    expires_at: int
    single_use: bool
    approval_id: str | None
    workflow_id: str | None
    state: TokenState


class _Issued(BaseModel):
    jti: str
    exp: int
    single_use: bool = False
    approval_id: str | None = None


def token_rows(records: Iterable[AuditRecord], revocations: Iterable[Revocation], *,
               since: float, now: float | None = None) -> list[TokenRow]:
    """Tokens issued at or after ``since``, newest first, with their state at ``now``."""
    now = time.time() if now is None else now
    rows: list[TokenRow] = []
    revoked = {(r.kind, r.target) for r in revocations}
    for record in records:
        if record.kind == "token_issued" and record.ts >= since:
            try:
                issued = _Issued.model_validate(record.detail)
            except ValidationError:
                continue
            rows.append(TokenRow(jti=issued.jti, agent=record.identity, action=record.action,
                                 issued_at=record.ts, expires_at=issued.exp,
                                 single_use=issued.single_use,
                                 approval_id=issued.approval_id,
                                 workflow_id=record.workflow_id, state="live"))
    for row in rows:
        if ("jti", row.jti) in revoked or ("agent", row.agent) in revoked:
            row.state = "revoked"
        elif row.expires_at < now:
            row.state = "expired"
    return sorted(rows, key=lambda r: r.issued_at, reverse=True)
