"""The revocation set: tokens revoked by ``jti`` and agents cut off by a kill switch.

Pure data; the broker layer keeps it in a KV bucket (one key per entry) and feeds
changes in with ``apply``. An agent revocation (the kill switch) refuses every token
for that agent, those already out and those minted after it, until it is lifted:
otherwise the orchestrator's next fresh token would walk straight past it.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from security.tokens import CapabilityClaims

KeyPart = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")]


class Revocation(BaseModel):
    """One entry; serialised as the KV value under ``key``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["jti", "agent"]
    target: KeyPart
    revoked_at: int
    expires_at: int | None = None
    reason: Annotated[str, Field(max_length=500)] = ""
    by: Annotated[str, Field(max_length=64)] = ""

    @property
    def key(self) -> str:
        return f"{self.kind}.{self.target}"


class RevocationSet:
    def __init__(self) -> None:
        self._jtis: dict[str, Revocation] = {}
        self._agents: dict[str, Revocation] = {}

    def apply(self, entry: Revocation) -> None:
        (self._jtis if entry.kind == "jti" else self._agents)[entry.target] = entry

    def lift(self, kind: Literal["jti", "agent"], target: str) -> None:
        (self._jtis if kind == "jti" else self._agents).pop(target, None)

    def is_revoked(self, claims: CapabilityClaims) -> bool:
        if claims.jti in self._jtis:
            return True
        return claims.aud in self._agents

    def prune(self, now: int) -> None:
        """Forget jti entries whose tokens have expired anyway (bounded memory)."""
        for jti in [j for j, e in self._jtis.items() if e.expires_at and e.expires_at < now]:
            del self._jtis[jti]

    def entries(self) -> list[Revocation]:
        return [*self._jtis.values(), *self._agents.values()]

    def __len__(self) -> int:
        return len(self._jtis) + len(self._agents)
