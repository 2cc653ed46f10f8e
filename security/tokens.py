"""Capability tokens: short-lived, audience-bound, scope-bound Ed25519 grants.

Wire form is JWS compact serialisation (RFC 7515) with ``alg: EdDSA``: the signed bytes
are ``b64url(header) "." b64url(payload)`` where header and payload are RFC 8785
canonical JSON. The verifier checks, in order: shape, key id, signature, claims schema,
time window and lifetime cap, audience, scope, argument hash, revocation. Each failure
has its own exception class (see ``security.errors``).
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from typing import Annotated, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from security.encoding import b64url_decode, b64url_encode, canonical_json
from security.errors import (
    TokenArgsMismatch,
    TokenBadSignature,
    TokenExpired,
    TokenLifetimeTooLong,
    TokenMalformed,
    TokenNotYetValid,
    TokenOutOfScope,
    TokenRevoked,
    TokenUnknownKey,
    TokenWrongAudience,
)
from security.keys import KeyRing, SigningKey

TOKEN_TYPE: Literal["mas.capability"] = "mas.capability"  # noqa: S105
TOKEN_VERSION: Literal[1] = 1
JWS_TYP = "mas-cap+jws"
MAX_TOKEN_BYTES = 4096
DEFAULT_LIFETIME_S = 60
MAX_LIFETIME_S = 900
DEFAULT_LEEWAY_S = 5
_MAX_HEADERS = 16  # parsed token headers a verifier remembers (one per issuer key in use)

Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")]
Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class CapabilityClaims(BaseModel):
    """What a token grants. Frozen and strict: unknown claims are a malformed token."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    typ: Literal["mas.capability"]
    ver: Literal[1]
    iss: Name
    kid: Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]
    sub: Name
    aud: Name
    iat: int
    nbf: int
    exp: int
    jti: Annotated[str, Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")]
    actions: Annotated[tuple[Name, ...], Field(min_length=1, max_length=32)]
    subjects: Annotated[tuple[Annotated[str, Field(max_length=256)], ...], Field(max_length=32)]
    args_sha256: Sha256Hex | None = None
    approval_id: Annotated[str, Field(max_length=64)] | None = None
    single_use: bool = False


class _Header(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    alg: Literal["EdDSA"]
    kid: Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]
    typ: Literal["mas-cap+jws"]


class RevocationCheck(Protocol):
    """Anything that can say whether a token's claims were revoked."""

    def is_revoked(self, claims: CapabilityClaims) -> bool: ...


def _now() -> int:
    return int(time.time())


class TokenIssuer:
    """Mints tokens with the orchestrator's current signing key."""

    def __init__(self, issuer: str, key: SigningKey, *, max_lifetime_s: int = MAX_LIFETIME_S):
        self.issuer = issuer
        self.key = key
        self.max_lifetime_s = max_lifetime_s
        self._header = b64url_encode(
            canonical_json({"alg": "EdDSA", "kid": key.kid, "typ": JWS_TYP})
        )

    def issue(
        self,
        *,
        audience: str,
        actions: Sequence[str],
        subjects: Sequence[str] = (),
        lifetime_s: int = DEFAULT_LIFETIME_S,
        args_sha256: str | None = None,
        approval_id: str | None = None,
        single_use: bool = False,
        jti: str | None = None,
        now: int | None = None,
    ) -> tuple[str, CapabilityClaims]:
        """``jti``: a caller-chosen id (e.g. a workflow step's idempotency key), so a token
        re-minted for the same step is recognised as the same single-use grant."""
        if not 0 < lifetime_s <= self.max_lifetime_s:
            raise ValueError(f"lifetime must be 1..{self.max_lifetime_s} s, got {lifetime_s}")
        issued = _now() if now is None else now
        claims = CapabilityClaims(
            typ=TOKEN_TYPE,
            ver=TOKEN_VERSION,
            iss=self.issuer,
            kid=self.key.kid,
            sub=audience,
            aud=audience,
            iat=issued,
            nbf=issued,
            exp=issued + lifetime_s,
            jti=jti or uuid.uuid4().hex,
            actions=tuple(actions),
            subjects=tuple(subjects),
            args_sha256=args_sha256,
            approval_id=approval_id,
            single_use=single_use,
        )
        return self.sign(claims), claims

    def sign(self, claims: CapabilityClaims) -> str:
        """Sign arbitrary claims. Used by ``issue`` and by tests that need odd claims."""
        payload = b64url_encode(canonical_json(claims.model_dump(mode="json", exclude_none=True)))
        header = self._header
        if claims.kid != self.key.kid:
            header = b64url_encode(
                canonical_json({"alg": "EdDSA", "kid": claims.kid, "typ": JWS_TYP})
            )
        signing_input = f"{header}.{payload}".encode("ascii")
        return f"{header}.{payload}.{b64url_encode(self.key.sign(signing_input))}"


def _decode_segment(segment: str, what: str) -> bytes:
    try:
        return b64url_decode(segment)
    except ValueError as exc:
        raise TokenMalformed(f"{what} is not base64url") from exc


class TokenVerifier:
    """Verifies tokens against a ring of trusted issuer keys.

    With ``cache_size > 0`` the signature check (the expensive part) is remembered per
    token string; time, audience, scope, argument hash and revocation are checked on
    every call, and a cached token whose key has since been removed from the ring is
    refused.
    """

    def __init__(
        self,
        trusted: KeyRing,
        *,
        issuer: str,
        leeway_s: int = DEFAULT_LEEWAY_S,
        max_lifetime_s: int = MAX_LIFETIME_S,
        cache_size: int = 0,
    ) -> None:
        self.trusted = trusted
        self.issuer = issuer
        self.leeway_s = leeway_s
        self.max_lifetime_s = max_lifetime_s
        self._cache_size = cache_size
        self._cache: OrderedDict[str, CapabilityClaims] = OrderedDict()
        # A header segment names only alg, kid and typ: every token signed with one key has
        # the same one, so its (pure, deterministic) parse is remembered, a few at most.
        self._headers: dict[str, _Header] = {}

    def _header(self, segment: str) -> _Header:
        header = self._headers.get(segment)
        if header is None:
            try:
                header = _Header.model_validate_json(_decode_segment(segment, "header"))
            except ValidationError as exc:
                raise TokenMalformed("token header is not a mas capability header") from exc
            if len(self._headers) >= _MAX_HEADERS:
                self._headers.clear()
            self._headers[segment] = header
        return header

    def _verify_signature(self, token: str) -> CapabilityClaims:
        if not isinstance(token, str) or len(token) > MAX_TOKEN_BYTES or not token.isascii():
            raise TokenMalformed("token is not an ASCII string of at most 4096 characters")
        cached = self._cache.get(token) if self._cache_size else None
        if cached is not None:
            self._cache.move_to_end(token)
            if cached.kid not in self.trusted:
                raise TokenUnknownKey(f"key {cached.kid} is no longer trusted")
            return cached
        parts = token.split(".")
        if len(parts) != 3:
            raise TokenMalformed("token must have three dot-separated parts")
        header_b64, payload_b64, sig_b64 = parts
        header = self._header(header_b64)
        key = self.trusted.get(header.kid)
        if key is None:
            raise TokenUnknownKey(f"key {header.kid} is not trusted")
        try:
            signature = b64url_decode(sig_b64)
        except ValueError as exc:
            raise TokenMalformed("signature is not base64url") from exc
        if not key.verify(f"{header_b64}.{payload_b64}".encode("ascii"), signature):
            raise TokenBadSignature("signature does not match the token")
        try:
            claims = CapabilityClaims.model_validate_json(_decode_segment(payload_b64, "payload"))
        except ValidationError as exc:
            raise TokenMalformed("token claims do not match the capability schema") from exc
        if claims.kid != header.kid:
            raise TokenMalformed("claims kid differs from header kid")
        if self._cache_size:
            self._cache[token] = claims
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return claims

    def verify(
        self,
        token: str,
        *,
        audience: str,
        action: str,
        subject: str | None = None,
        args_sha256: str | None = None,
        revocations: RevocationCheck | None = None,
        now: int | None = None,
    ) -> CapabilityClaims:
        """Return the claims if ``token`` lets ``audience`` run ``action`` now, else raise.

        ``subject``: the subject the command arrived on; it must be in the token's scope
        (a token with no subjects allows none). ``args_sha256``: pass it for sensitive
        actions; the token must be bound to exactly these arguments.
        """
        claims = self._verify_signature(token)
        if claims.iss != self.issuer:
            raise TokenUnknownKey(f"issuer {claims.iss!r} is not trusted")
        t = _now() if now is None else now
        # The usable window runs from the earlier of iat and nbf to exp: cap all of it.
        if claims.exp <= claims.nbf:
            raise TokenMalformed("token expires before it becomes valid")
        window = claims.exp - min(claims.iat, claims.nbf)
        if window > self.max_lifetime_s:
            raise TokenLifetimeTooLong(
                f"token usable for {window}s, more than {self.max_lifetime_s}s"
            )
        if claims.iat > t + self.leeway_s:
            raise TokenNotYetValid(f"token issued in the future ({claims.iat}, now {t})")
        if t + self.leeway_s < claims.nbf:
            raise TokenNotYetValid(f"token valid from {claims.nbf}, now {t}")
        if t - self.leeway_s >= claims.exp:
            raise TokenExpired(f"token expired at {claims.exp}, now {t}")
        if claims.aud != audience:
            raise TokenWrongAudience(f"token is for {claims.aud!r}, not {audience!r}")
        if action not in claims.actions:
            raise TokenOutOfScope(f"action {action!r} is not in the token's scope")
        if subject is not None and subject not in claims.subjects:
            raise TokenOutOfScope(f"subject {subject!r} is not in the token's scope")
        # Fail closed both ways: a bound token needs the same arguments, and a caller that
        # asks for binding (a sensitive action) refuses a token that carries none.
        if (claims.args_sha256 is not None or args_sha256 is not None) and \
                claims.args_sha256 != args_sha256:
            raise TokenArgsMismatch("arguments differ from the ones the token was issued for")
        if revocations is not None and revocations.is_revoked(claims):
            raise TokenRevoked(f"token {claims.jti} was revoked")
        return claims
