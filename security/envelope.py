"""Signed message envelopes.

Every message carries headers naming its sender and a signature over
``subject, sha256(payload), timestamp, nonce, sha256(token)``. The receiver refuses
bad signatures, timestamps outside the freshness window and nonces it has seen.

The replay cache is bounded: when it is full, the oldest nonce is evicted and the
oldest acceptable timestamp moves up past it (a "watermark"), so an evicted nonce
can never be replayed; under extreme load the effective window shrinks instead of
memory growing or replays getting through.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from security.encoding import b64url_decode, b64url_encode
from security.errors import (
    EnvelopeBadSignature,
    EnvelopeMalformed,
    EnvelopeReplayed,
    EnvelopeStale,
    EnvelopeUnknownSender,
)
from security.keys import KeyRing, SigningKey

DOMAIN = b"mas-envelope/1"
H_SENDER = "Mas-Sender"
H_KID = "Mas-Kid"
H_TS = "Mas-Ts"
H_NONCE = "Mas-Nonce"
H_SIG = "Mas-Sig"
H_TOKEN = "Mas-Token"  # noqa: S105 (a header name, not a secret)
DEFAULT_WINDOW_MS = 30_000
MAX_FUTURE_MS = 2_000
DEFAULT_CACHE_SIZE = 100_000
_EMPTY_SHA256_HEX = hashlib.sha256(b"").hexdigest().encode("ascii")
SENDER_PATTERN = r"^[a-z][a-z0-9_]{0,31}$"
KID_PATTERN = r"^[0-9a-f]{16}$"
TS_PATTERN = r"^(0|[1-9][0-9]{0,14})$"
NONCE_PATTERN = r"^[A-Za-z0-9_\-]{16,32}$"
SIG_LENGTH = 86
MAX_TOKEN_LENGTH = 4096


class EnvelopeHeaders(BaseModel):
    """The envelope as it travels in message headers."""

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    sender: Annotated[str, Field(alias=H_SENDER, pattern=SENDER_PATTERN)]
    kid: Annotated[str, Field(alias=H_KID, pattern=KID_PATTERN)]
    ts: Annotated[str, Field(alias=H_TS, pattern=TS_PATTERN)]
    nonce: Annotated[str, Field(alias=H_NONCE, pattern=NONCE_PATTERN)]
    sig: Annotated[str, Field(alias=H_SIG, min_length=SIG_LENGTH, max_length=SIG_LENGTH)]
    token: Annotated[str | None, Field(alias=H_TOKEN, min_length=1,
                                       max_length=MAX_TOKEN_LENGTH)] = None

    def to_headers(self) -> dict[str, str]:
        return self.model_dump(by_alias=True, exclude_none=True)


_FIELD_NAMES = frozenset(EnvelopeHeaders.model_fields)
_SENDER = re.compile(SENDER_PATTERN).fullmatch
_KID = re.compile(KID_PATTERN).fullmatch
_TS = re.compile(TS_PATTERN).fullmatch
_NONCE = re.compile(NONCE_PATTERN).fullmatch


Fields = tuple[str, str, str, str, str, str | None]  # sender, kid, ts, nonce, sig, token


def read_headers(headers: Mapping[str, str] | None) -> Fields:
    """The envelope in ``headers``, validated exactly as ``EnvelopeHeaders`` does.

    The common case (every value a plain string under its header name, nothing under a
    field name) is checked here with the model's own patterns, without building a model
    per message (signature and token in ASCII, as every signer makes them); anything else
    goes through pydantic, which also words the refusal.
    Raises ``ValidationError``."""
    if headers and _FIELD_NAMES.isdisjoint(headers):
        sender, kid = headers.get(H_SENDER), headers.get(H_KID)
        ts, nonce = headers.get(H_TS), headers.get(H_NONCE)
        sig, token = headers.get(H_SIG), headers.get(H_TOKEN)
        if (type(sender) is str and _SENDER(sender)
                and type(kid) is str and _KID(kid)
                and type(ts) is str and _TS(ts)
                and type(nonce) is str and _NONCE(nonce)
                and type(sig) is str and len(sig) == SIG_LENGTH and sig.isascii()
                and ((token is None and H_TOKEN not in headers)
                     or (type(token) is str and 1 <= len(token) <= MAX_TOKEN_LENGTH
                         and token.isascii()))):
            return sender, kid, ts, nonce, sig, token
    env = EnvelopeHeaders.model_validate(dict(headers or {}))
    return env.sender, env.kid, env.ts, env.nonce, env.sig, env.token


@dataclass(frozen=True, slots=True)
class VerifiedEnvelope:
    """What an envelope that verified says; made from already validated values, so a
    plain dataclass (one per message) rather than a model that would check them again."""

    sender: str
    ts_ms: int
    nonce: str
    token: str | None


def signing_bytes(
    subject: str, payload: bytes, ts_ms: int, nonce: str, token: str | None
) -> bytes:
    token_hash = (hashlib.sha256(token.encode()).hexdigest().encode("ascii") if token
                  else _EMPTY_SHA256_HEX)
    return b"\n".join(
        (
            DOMAIN,
            subject.encode("utf-8"),
            hashlib.sha256(payload).hexdigest().encode("ascii"),
            str(ts_ms).encode("ascii"),
            nonce.encode("ascii"),
            token_hash,
        )
    )


class EnvelopeSigner:
    def __init__(self, identity: str, key: SigningKey) -> None:
        self.identity = identity
        self.key = key

    def seal(
        self, subject: str, payload: bytes, *, token: str | None = None, ts_ms: int | None = None
    ) -> dict[str, str]:
        ts = int(time.time() * 1000) if ts_ms is None else ts_ms
        nonce = b64url_encode(os.urandom(16))
        sig = self.key.sign(signing_bytes(subject, payload, ts, nonce, token))
        headers = {
            H_SENDER: self.identity,
            H_KID: self.key.kid,
            H_TS: str(ts),
            H_NONCE: nonce,
            H_SIG: b64url_encode(sig),
        }
        if token is not None:
            headers[H_TOKEN] = token
        return headers


class _SenderNonces:
    __slots__ = ("seen", "watermark_ms")

    def __init__(self) -> None:
        self.seen: OrderedDict[str, int] = OrderedDict()
        self.watermark_ms = 0


class NonceCache:
    """Seen nonces within the freshness window, bounded per sender (see module docstring).

    Each sender has its own cache and watermark, so one identity flooding valid
    messages can shrink only its own window, never lock out the operator or the
    orchestrator. Every forgotten nonce (evicted or aged out) raises the watermark past
    its timestamp, so even a clock stepping back cannot make a seen nonce new again.
    """

    def __init__(self, max_entries: int = DEFAULT_CACHE_SIZE, max_senders: int = 4096) -> None:
        self.max_entries = max_entries
        self.max_senders = max_senders
        self._senders: dict[str, _SenderNonces] = {}

    def check_and_add(self, sender: str, nonce: str, ts_ms: int, oldest_ok_ms: int) -> None:
        """Record a nonce or raise if it was seen. ``oldest_ok_ms``: the window's lower edge."""
        state = self._senders.get(sender)
        if state is None:
            if len(self._senders) >= self.max_senders:
                raise EnvelopeStale("too many distinct senders to track; refusing")
            state = self._senders[sender] = _SenderNonces()
        seen = state.seen
        while seen and next(iter(seen.values())) < oldest_ok_ms:
            _, aged_ts = seen.popitem(last=False)
            state.watermark_ms = max(state.watermark_ms, aged_ts)
        if ts_ms <= state.watermark_ms:
            raise EnvelopeStale("timestamp is older than the replay cache can vouch for")
        if nonce in seen:
            raise EnvelopeReplayed(f"nonce from {sender} was already used")
        seen[nonce] = ts_ms
        if len(seen) > self.max_entries:
            _, evicted_ts = seen.popitem(last=False)
            state.watermark_ms = max(state.watermark_ms, evicted_ts)

    def watermark(self, sender: str) -> int:
        state = self._senders.get(sender)
        return state.watermark_ms if state else 0

    def __len__(self) -> int:
        return sum(len(s.seen) for s in self._senders.values())


class EnvelopeVerifier:
    """Checks envelopes from known senders. ``senders`` maps identity to its trusted keys."""

    def __init__(
        self,
        senders: Mapping[str, KeyRing],
        *,
        window_ms: int = DEFAULT_WINDOW_MS,
        nonces: NonceCache | None = None,
    ) -> None:
        self.senders = senders
        self.window_ms = window_ms
        self.nonces = nonces if nonces is not None else NonceCache()

    def open(
        self, subject: str, payload: bytes, headers: Mapping[str, str] | None
    ) -> VerifiedEnvelope:
        try:
            sender, kid, ts_text, nonce, sig_text, token = read_headers(headers)
        except ValidationError as exc:
            missing = sorted({str(e["loc"][0]) for e in exc.errors()})
            raise EnvelopeMalformed(f"envelope headers missing or invalid: {missing}") from exc
        ring = self.senders.get(sender)
        if ring is None:
            raise EnvelopeUnknownSender(f"sender {sender!r} is not known")
        key = ring.get(kid)
        if key is None:
            raise EnvelopeUnknownSender(f"key {kid} is not trusted for {sender!r}")
        try:
            sig = b64url_decode(sig_text)
        except ValueError as exc:
            raise EnvelopeMalformed("signature is not base64url") from exc
        ts = int(ts_text)
        if not key.verify(signing_bytes(subject, payload, ts, nonce, token), sig):
            raise EnvelopeBadSignature(f"signature from {sender!r} does not match")
        now = int(time.time() * 1000)
        if now - ts > self.window_ms or ts - now > MAX_FUTURE_MS:
            raise EnvelopeStale(f"timestamp {ts} is {now - ts} ms from now")
        self.nonces.check_and_add(sender, nonce, ts, now - self.window_ms)
        return VerifiedEnvelope(sender=sender, ts_ms=ts, nonce=nonce, token=token)
