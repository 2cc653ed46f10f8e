"""Capability tokens: every refusal raises its own, specific TokenError subclass.

Time is always passed explicitly (``now=``) so the tests never depend on the clock.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from security.encoding import args_sha256, b64url_decode, b64url_encode, canonical_json
from security.errors import (
    TokenArgsMismatch,
    TokenBadSignature,
    TokenError,
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
from security.revocation import Revocation, RevocationSet
from security.tokens import (
    DEFAULT_LEEWAY_S,
    JWS_TYP,
    MAX_LIFETIME_S,
    MAX_TOKEN_BYTES,
    CapabilityClaims,
    TokenIssuer,
    TokenVerifier,
)

T0 = 1_700_000_000
ISSUER = "orchestrator"
AGENT = "agent_a"
ACTION = "files.read"
SUBJECT = "/srv/data/report.txt"
B64URL_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

# Module-level keys/verifier so the hypothesis tests need no function-scoped fixtures.
TRUSTED_KEY = SigningKey(bytes(range(32)))
PROP_VERIFIER = TokenVerifier(KeyRing([TRUSTED_KEY.public]), issuer=ISSUER)
PROP_TOKEN, PROP_CLAIMS = TokenIssuer(ISSUER, TRUSTED_KEY).issue(
    audience=AGENT, actions=[ACTION], subjects=[SUBJECT], now=T0
)


@pytest.fixture
def key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def ring(key: SigningKey) -> KeyRing:
    return KeyRing([key.public])


@pytest.fixture
def issuer(key: SigningKey) -> TokenIssuer:
    return TokenIssuer(ISSUER, key)


@pytest.fixture
def verifier(ring: KeyRing) -> TokenVerifier:
    return TokenVerifier(ring, issuer=ISSUER)


def issue(issuer: TokenIssuer, **kw: Any) -> tuple[str, CapabilityClaims]:
    kw.setdefault("audience", AGENT)
    kw.setdefault("actions", [ACTION])
    kw.setdefault("subjects", [SUBJECT])
    kw.setdefault("now", T0)
    return issuer.issue(**kw)


def check(verifier: TokenVerifier, token: str, **kw: Any) -> CapabilityClaims:
    kw.setdefault("audience", AGENT)
    kw.setdefault("action", ACTION)
    kw.setdefault("subject", SUBJECT)
    kw.setdefault("now", T0)
    return verifier.verify(token, **kw)


def claims_for(key: SigningKey, **overrides: Any) -> CapabilityClaims:
    """Valid claims for ``key`` at T0 with a 60 s lifetime, with ``overrides`` applied."""
    fields: dict[str, Any] = {
        "typ": "mas.capability",
        "ver": 1,
        "iss": ISSUER,
        "kid": key.kid,
        "sub": AGENT,
        "aud": AGENT,
        "iat": T0,
        "nbf": T0,
        "exp": T0 + 60,
        "jti": "0123456789abcdef",
        "actions": (ACTION,),
        "subjects": (SUBJECT,),
    }
    fields.update(overrides)
    return CapabilityClaims(**fields)


def encode_claims(claims: CapabilityClaims) -> str:
    return b64url_encode(canonical_json(claims.model_dump(mode="json", exclude_none=True)))


def sign_raw(key: SigningKey, header: dict[str, Any], payload: dict[str, Any]) -> str:
    """Hand-built JWS: lets a test sign payloads that CapabilityClaims would not accept."""
    h = b64url_encode(canonical_json(header))
    p = b64url_encode(canonical_json(payload))
    sig = key.sign(f"{h}.{p}".encode("ascii"))
    return f"{h}.{p}.{b64url_encode(sig)}"


# --- the happy path ---------------------------------------------------------------------


def test_valid_token_round_trips_claims(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    token, issued = issue(issuer, actions=[ACTION, "files.list"])
    got = check(verifier, token, action="files.list")
    assert got == issued
    assert (got.aud, got.sub, got.iss) == (AGENT, AGENT, ISSUER)
    assert got.actions == (ACTION, "files.list")
    assert got.subjects == (SUBJECT,)
    assert got.jti == issued.jti
    assert len(got.jti) >= 8
    assert (got.iat, got.nbf, got.exp) == (T0, T0, T0 + 60)


# --- signature --------------------------------------------------------------------------


@pytest.mark.attack("forge, replay or extend tokens",
                    threat="a token forged under the orchestrator's key id")
def test_forged_token_reusing_trusted_kid_is_bad_signature(
    key: SigningKey, verifier: TokenVerifier
) -> None:
    attacker = SigningKey.generate()
    forged = TokenIssuer(ISSUER, attacker).sign(claims_for(key))  # claims.kid = trusted kid
    header = json.loads(b64url_decode(forged.split(".")[0]))
    assert header["kid"] == key.kid != attacker.kid
    with pytest.raises(TokenBadSignature):
        check(verifier, forged)


@pytest.mark.attack("forge, replay or extend tokens",
                    threat="a real token widened to more actions or another audience, keeping its"
                           " signature")
def test_tampered_claim_with_original_signature_is_bad_signature(
    issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    token, claims = issue(issuer)
    header, _, sig = token.split(".")
    widened = claims.model_copy(update={"actions": (ACTION, "files.delete")})
    tampered = f"{header}.{encode_claims(widened)}.{sig}"
    assert tampered != token
    with pytest.raises(TokenBadSignature):
        check(verifier, tampered, action="files.delete")
    retargeted = claims.model_copy(update={"aud": "agent_b", "sub": "agent_b"})
    with pytest.raises(TokenBadSignature):
        check(verifier, f"{header}.{encode_claims(retargeted)}.{sig}", audience="agent_b")


def test_flipped_signature_char(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    token, _ = issue(issuer)
    header, payload, sig = token.split(".")
    assert len(sig) == 86
    # The first character carries six full signature bits: any other base64url letter is
    # still canonical base64url, decodes to 64 different bytes, and fails Ed25519 verify.
    first = "B" if sig[0] == "A" else "A"
    with pytest.raises(TokenBadSignature):
        check(verifier, f"{header}.{payload}.{first}{sig[1:]}")
    # The last of 86 characters carries only 2 data bits; its 4 low bits must be zero.
    # "B" (value 1) sets a padding bit, so strict base64url decoding refuses it before any
    # signature check: that is TokenMalformed, not TokenBadSignature.
    assert sig[-1] in "AQgw"
    with pytest.raises(TokenMalformed):
        check(verifier, f"{header}.{payload}.{sig[:-1]}B")


# --- time -------------------------------------------------------------------------------


def test_expired_beyond_leeway(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    token, claims = issue(issuer, lifetime_s=60)
    assert verifier.leeway_s == DEFAULT_LEEWAY_S == 5
    with pytest.raises(TokenExpired):
        check(verifier, token, now=claims.exp + DEFAULT_LEEWAY_S)
    with pytest.raises(TokenExpired):
        check(verifier, token, now=claims.exp + 3600)


def test_expired_just_inside_leeway_is_accepted(
    issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    token, claims = issue(issuer, lifetime_s=60)
    assert check(verifier, token, now=claims.exp + DEFAULT_LEEWAY_S - 1) == claims
    strict = TokenVerifier(verifier.trusted, leeway_s=0, issuer=ISSUER)
    with pytest.raises(TokenExpired):
        check(strict, token, now=claims.exp)
    assert check(strict, token, now=claims.exp - 1) == claims


def test_not_yet_valid_beyond_leeway(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    token, claims = issue(issuer, now=T0 + 100)
    assert claims.nbf == T0 + 100
    with pytest.raises(TokenNotYetValid):
        check(verifier, token, now=T0)
    with pytest.raises(TokenNotYetValid):
        check(verifier, token, now=claims.nbf - DEFAULT_LEEWAY_S - 1)
    # Within the leeway a slightly-behind clock is tolerated.
    assert check(verifier, token, now=claims.nbf - DEFAULT_LEEWAY_S) == claims


def test_future_nbf_in_custom_claims_is_not_yet_valid(
    key: SigningKey, issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    token = issuer.sign(claims_for(key, iat=T0, nbf=T0 + 300, exp=T0 + 360))
    with pytest.raises(TokenNotYetValid):
        check(verifier, token, now=T0)
    assert check(verifier, token, now=T0 + 300).nbf == T0 + 300


# --- audience, key, scope ----------------------------------------------------------------


def test_wrong_audience(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    token, _ = issue(issuer, audience=AGENT)
    with pytest.raises(TokenWrongAudience):
        check(verifier, token, audience="agent_b")


def test_unknown_key_id(issuer: TokenIssuer) -> None:
    token, _ = issue(issuer)
    stranger = TokenVerifier(KeyRing([SigningKey.generate().public]), issuer=ISSUER)
    with pytest.raises(TokenUnknownKey):
        check(stranger, token)
    with pytest.raises(TokenUnknownKey):
        check(TokenVerifier(KeyRing(), issuer=ISSUER), token)


def test_untrusted_issuer_name_is_refused(key: SigningKey, ring: KeyRing) -> None:
    token, _ = issue(TokenIssuer("someone_else", key))
    with pytest.raises(TokenUnknownKey):
        check(TokenVerifier(ring, issuer=ISSUER), token)
    assert check(TokenVerifier(ring, issuer="someone_else"), token).iss == "someone_else"


def test_out_of_scope_action(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    token, _ = issue(issuer, actions=[ACTION])
    with pytest.raises(TokenOutOfScope):
        check(verifier, token, action="files.delete")


def test_out_of_scope_subject(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    token, _ = issue(issuer, subjects=[SUBJECT])
    with pytest.raises(TokenOutOfScope):
        check(verifier, token, subject="/etc/shadow")
    assert check(verifier, token, subject=SUBJECT).subjects == (SUBJECT,)


# --- revocation --------------------------------------------------------------------------


def test_revoked_by_jti(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    token, claims = issue(issuer)
    other, _ = issue(issuer)
    revs = RevocationSet()
    revs.apply(Revocation(kind="jti", target=claims.jti, revoked_at=T0))
    with pytest.raises(TokenRevoked):
        check(verifier, token, revocations=revs)
    assert check(verifier, other, revocations=revs).jti != claims.jti
    revs.lift("jti", claims.jti)
    assert check(verifier, token, revocations=revs) == claims


def test_revoked_by_agent_kill_switch(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    before, _ = issue(issuer, now=T0 - 10)
    at, _ = issue(issuer, now=T0)
    after, after_claims = issue(issuer, now=T0 + 1)
    other_agent, _ = issue(issuer, audience="agent_b", now=T0 - 10)
    revs = RevocationSet()
    revs.apply(Revocation(kind="agent", target=AGENT, revoked_at=T0))
    with pytest.raises(TokenRevoked):
        check(verifier, before, revocations=revs, now=T0)
    with pytest.raises(TokenRevoked):
        check(verifier, at, revocations=revs, now=T0)
    # Issued after the kill switch: refused too while it is in place...
    with pytest.raises(TokenRevoked):
        check(verifier, after, revocations=revs, now=T0 + 1)
    # ...and once it is lifted, the re-enabled agent's fresh tokens work.
    revs.lift("agent", AGENT)
    assert check(verifier, after, revocations=revs, now=T0 + 1) == after_claims
    # Another agent is not affected.
    assert check(verifier, other_agent, audience="agent_b", revocations=revs, now=T0).aud == (
        "agent_b"
    )


# --- argument binding --------------------------------------------------------------------


def test_args_hash_binding(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    args = {"path": SUBJECT, "mode": "r", "opts": {"z": 1, "a": [1, 2]}}
    h = args_sha256(args)
    token, claims = issue(issuer, args_sha256=h)
    assert claims.args_sha256 == h
    same_reordered = {"opts": {"a": [1, 2], "z": 1}, "mode": "r", "path": SUBJECT}
    assert check(verifier, token, args_sha256=args_sha256(same_reordered)) == claims
    with pytest.raises(TokenArgsMismatch):
        check(verifier, token, args_sha256=args_sha256({**args, "mode": "w"}))
    with pytest.raises(TokenArgsMismatch):
        check(verifier, token, args_sha256=None)


def test_args_hash_is_independent_of_key_order() -> None:
    a = {"b": 1, "a": {"y": [3, {"q": 1, "p": 2}], "x": None}}
    b = {"a": {"x": None, "y": [3, {"p": 2, "q": 1}]}, "b": 1}
    assert list(a) != list(b)
    assert args_sha256(a) == args_sha256(b)
    assert args_sha256(a) != args_sha256({**a, "b": 2})
    # Arrays are ordered: reordering list elements is a different request.
    assert args_sha256({"l": [1, 2]}) != args_sha256({"l": [2, 1]})


# --- lifetime cap -------------------------------------------------------------------------


@pytest.mark.attack("forge, replay or extend tokens",
                    threat="a token whose lifetime was extended past the cap")
def test_lifetime_above_verifier_cap_is_refused(
    key: SigningKey, issuer: TokenIssuer, ring: KeyRing
) -> None:
    verifier = TokenVerifier(ring, max_lifetime_s=MAX_LIFETIME_S, issuer=ISSUER)
    long_lived = issuer.sign(claims_for(key, exp=T0 + MAX_LIFETIME_S + 1))
    with pytest.raises(TokenLifetimeTooLong):
        check(verifier, long_lived)
    at_cap = issuer.sign(claims_for(key, exp=T0 + MAX_LIFETIME_S))
    assert check(verifier, at_cap).exp == T0 + MAX_LIFETIME_S
    # A stricter verifier refuses what the issuer's (larger) default allows.
    token, _ = issue(issuer, lifetime_s=300)
    with pytest.raises(TokenLifetimeTooLong):
        check(TokenVerifier(ring, max_lifetime_s=120, issuer=ISSUER), token)


def test_issuer_refuses_lifetime_above_max(key: SigningKey) -> None:
    issuer = TokenIssuer(ISSUER, key, max_lifetime_s=120)
    with pytest.raises(ValueError, match="lifetime"):
        issue(issuer, lifetime_s=121)
    with pytest.raises(ValueError, match="lifetime"):
        issue(issuer, lifetime_s=0)
    with pytest.raises(ValueError, match="lifetime"):
        issue(TokenIssuer(ISSUER, key), lifetime_s=MAX_LIFETIME_S + 1)
    assert issue(issuer, lifetime_s=120)[1].exp == T0 + 120


def test_lifetime_cap_measures_whole_validity_window(
    key: SigningKey, issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    """The cap must bound how long a token is usable (nbf..exp), not only exp - iat.

    A token with exp - iat = 60 but nbf ~ 3 h before iat is usable for ~3 h; a verifier
    with max_lifetime_s=900 should not accept it. (Needs the signing key, so this is
    defence in depth against a leaked or buggy issuer key.)
    """
    wide = issuer.sign(claims_for(key, iat=T0, nbf=T0 - 10_000, exp=T0 + 60))
    with pytest.raises(TokenLifetimeTooLong):
        check(verifier, wide, now=T0 - 9_000)
    future_iat = issuer.sign(claims_for(key, iat=T0 + 10_000, nbf=T0, exp=T0 + 10_060))
    with pytest.raises(TokenLifetimeTooLong):
        check(verifier, future_iat, now=T0 + 5_000)


def test_empty_validity_window_is_refused(
    key: SigningKey, issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    token = issuer.sign(claims_for(key, nbf=T0 + 60, exp=T0 + 60))
    with pytest.raises(TokenMalformed):
        check(verifier, token, now=T0 + 60)


# --- key rotation ------------------------------------------------------------------------


def test_key_rotation() -> None:
    old, new = SigningKey.generate(), SigningKey.generate()
    ring = KeyRing([old.public, new.public])
    verifier = TokenVerifier(ring, issuer=ISSUER)
    old_token, old_claims = issue(TokenIssuer(ISSUER, old))
    new_token, new_claims = issue(TokenIssuer(ISSUER, new))
    assert old_claims.kid == old.kid != new_claims.kid == new.kid
    assert check(verifier, old_token) == old_claims
    assert check(verifier, new_token) == new_claims
    ring.remove(old.kid)
    with pytest.raises(TokenUnknownKey):
        check(verifier, old_token)
    assert check(verifier, new_token) == new_claims


# --- verification cache ------------------------------------------------------------------


def test_cached_token_rechecks_claims_every_call(issuer: TokenIssuer, ring: KeyRing) -> None:
    verifier = TokenVerifier(ring, cache_size=8, issuer=ISSUER)
    token, claims = issue(issuer)
    assert check(verifier, token) == claims
    assert token in verifier._cache  # the signature result really is cached
    with pytest.raises(TokenExpired):
        check(verifier, token, now=claims.exp + 3600)
    with pytest.raises(TokenNotYetValid):
        check(verifier, token, now=T0 - 3600)
    with pytest.raises(TokenWrongAudience):
        check(verifier, token, audience="agent_b")
    with pytest.raises(TokenOutOfScope):
        check(verifier, token, action="files.delete")
    revs = RevocationSet()
    revs.apply(Revocation(kind="jti", target=claims.jti, revoked_at=T0))
    with pytest.raises(TokenRevoked):
        check(verifier, token, revocations=revs)
    # And it is still fine when everything matches.
    assert check(verifier, token) == claims


def test_cached_token_with_removed_kid_is_unknown_key(
    key: SigningKey, issuer: TokenIssuer, ring: KeyRing
) -> None:
    verifier = TokenVerifier(ring, cache_size=8, issuer=ISSUER)
    token, claims = issue(issuer)
    assert check(verifier, token) == claims
    assert token in verifier._cache
    ring.remove(key.kid)
    with pytest.raises(TokenUnknownKey):
        check(verifier, token)


def test_cache_is_bounded_and_never_caches_bad_signatures(
    key: SigningKey, issuer: TokenIssuer, ring: KeyRing
) -> None:
    verifier = TokenVerifier(ring, cache_size=2, issuer=ISSUER)
    tokens = [issue(issuer)[0] for _ in range(5)]
    for token in tokens:
        check(verifier, token)
    assert len(verifier._cache) == 2
    forged = TokenIssuer(ISSUER, SigningKey.generate()).sign(claims_for(key))
    for _ in range(2):
        with pytest.raises(TokenBadSignature):
            check(verifier, forged)
    assert forged not in verifier._cache


# --- encoding ----------------------------------------------------------------------------


def test_payload_is_exactly_canonical_json(issuer: TokenIssuer) -> None:
    token, claims = issue(issuer, args_sha256=args_sha256({"x": 1}), approval_id="appr-1")
    header_b64, payload_b64, _ = token.split(".")
    payload = b64url_decode(payload_b64)
    expected = canonical_json(claims.model_dump(mode="json", exclude_none=True))
    assert payload == expected
    assert json.loads(payload)["args_sha256"] == claims.args_sha256
    assert b" " not in payload  # canonical JSON has no insignificant whitespace
    keys = list(json.loads(payload))
    assert keys == sorted(keys)
    assert b64url_decode(header_b64) == canonical_json(
        {"alg": "EdDSA", "kid": claims.kid, "typ": JWS_TYP}
    )


def test_unknown_extra_claim_is_malformed(key: SigningKey, verifier: TokenVerifier) -> None:
    header = {"alg": "EdDSA", "kid": key.kid, "typ": JWS_TYP}
    payload = claims_for(key).model_dump(mode="json", exclude_none=True)
    # Control: the same hand-built signing path with a correct payload verifies.
    assert check(verifier, sign_raw(key, header, payload)).jti == payload["jti"]
    with pytest.raises(TokenMalformed):
        check(verifier, sign_raw(key, header, {**payload, "admin": True}))


def test_claims_kid_must_match_header_kid(key: SigningKey) -> None:
    other = SigningKey.generate()
    verifier = TokenVerifier(KeyRing([key.public, other.public]), issuer=ISSUER)
    header = {"alg": "EdDSA", "kid": key.kid, "typ": JWS_TYP}
    payload = claims_for(other).model_dump(mode="json", exclude_none=True)
    with pytest.raises(TokenMalformed):
        check(verifier, sign_raw(key, header, payload))


def test_oversized_token_is_malformed(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    token, _ = issue(issuer)
    header, payload, sig = token.split(".")
    padding = "A" * (MAX_TOKEN_BYTES + 1 - len(token))
    oversized = f"{header}.{payload}{padding}.{sig}"
    assert len(oversized) == MAX_TOKEN_BYTES + 1
    with pytest.raises(TokenMalformed):
        check(verifier, oversized)


@pytest.mark.parametrize(
    "shape",
    ["", "abc", "a.b", "a.b.c.d", "{t}.", "{t}.x", ".{t}", "{h}.{p}", "{h}..{p}.{s}", "..."],
)
def test_wrong_number_of_dots_is_malformed(
    issuer: TokenIssuer, verifier: TokenVerifier, shape: str
) -> None:
    token, _ = issue(issuer)
    h, p, s = token.split(".")
    bad = shape.format(t=token, h=h, p=p, s=s)
    assert bad.count(".") != 2 or bad == "..."
    with pytest.raises(TokenMalformed):
        check(verifier, bad)


def test_non_ascii_payload_segment_is_malformed(
    issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    """Regression: a non-ASCII char in the payload segment must be a TokenError.

    Anyone can copy a real token's (public) header, so this is reachable unauthenticated.
    """
    token, _ = issue(issuer)
    h, p, s = token.split(".")
    with pytest.raises(TokenMalformed):
        check(verifier, f"{h}.{p[:5]}é{p[5:]}.{s}")


# --- property tests ----------------------------------------------------------------------


def assert_refused_cleanly(token: str) -> CapabilityClaims | None:
    """verify() may accept or raise a TokenError; anything else is a bug."""
    try:
        return PROP_VERIFIER.verify(token, audience=AGENT, action=ACTION, subject=SUBJECT, now=T0)
    except TokenError:
        return None


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_arbitrary_text_only_raises_token_errors(text: str) -> None:
    assert assert_refused_cleanly(text) is None


b64ish = st.text(alphabet=B64URL_ALPHABET + "=+/ .\x00é", max_size=120)
segment = st.one_of(b64ish, st.sampled_from(PROP_TOKEN.split(".")))


@settings(max_examples=300, deadline=None)
@given(segment, segment, segment)
def test_arbitrary_three_part_tokens_only_raise_token_errors(a: str, b: str, c: str) -> None:
    token = f"{a}.{b}.{c}"
    claims = assert_refused_cleanly(token)
    assert claims is None or token == PROP_TOKEN


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["replace", "insert", "delete"]),
    st.integers(min_value=0, max_value=len(PROP_TOKEN)),
    st.one_of(st.sampled_from(B64URL_ALPHABET + "=."), st.characters()),
)
def test_mutated_token_never_verifies(op: str, index: int, char: str) -> None:
    i = min(index, len(PROP_TOKEN) - 1)
    if op == "replace":
        mutated = PROP_TOKEN[:i] + char + PROP_TOKEN[i + 1 :]
    elif op == "insert":
        mutated = PROP_TOKEN[:index] + char + PROP_TOKEN[index:]
    else:
        mutated = PROP_TOKEN[:i] + PROP_TOKEN[i + 1 :]
    claims = assert_refused_cleanly(mutated)
    if mutated == PROP_TOKEN:
        assert claims == PROP_CLAIMS
    else:
        assert claims is None, f"mutated token verified: {mutated!r}"


def test_property_fixture_token_is_valid() -> None:
    """Guards the property tests: they would pass vacuously if PROP_TOKEN never verified."""
    assert assert_refused_cleanly(PROP_TOKEN) == PROP_CLAIMS


def test_token_without_subjects_allows_no_subject(
    issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    token, _ = issue(issuer, subjects=[])
    with pytest.raises(TokenOutOfScope):
        check(verifier, token, subject=SUBJECT)


def test_caller_demanding_argument_binding_refuses_an_unbound_token(
    issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    token, _ = issue(issuer)
    with pytest.raises(TokenArgsMismatch):
        check(verifier, token, args_sha256=args_sha256({"entity_id": "lock.front_door"}))
