"""Signed message envelopes: authenticity, freshness, replay protection, bounded memory."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from security.encoding import b64url_encode
from security.envelope import (
    H_KID,
    H_NONCE,
    H_SENDER,
    H_SIG,
    H_TOKEN,
    H_TS,
    EnvelopeHeaders,
    EnvelopeSigner,
    EnvelopeVerifier,
    NonceCache,
    read_headers,
)
from security.errors import (
    EnvelopeBadSignature,
    EnvelopeError,
    EnvelopeMalformed,
    EnvelopeReplayed,
    EnvelopeStale,
    EnvelopeUnknownSender,
)
from security.keys import KeyRing, SigningKey

SUBJECT = "mas.agent.files.cmd.read"
PAYLOAD = b'{"path": "/srv/data/report.txt"}'
TOKEN = "header.payload.signature"
REQUIRED = [H_SENDER, H_KID, H_TS, H_NONCE, H_SIG]
ALL_HEADERS = [*REQUIRED, H_TOKEN]

# Module-level identities so the hypothesis tests need no function-scoped fixtures.
ALICE = SigningKey(bytes(range(32)))
BOB = SigningKey(bytes(range(1, 33)))
SENDERS = {"alice": KeyRing([ALICE.public]), "bob": KeyRing([BOB.public])}


def now_ms() -> int:
    return int(time.time() * 1000)


@pytest.fixture
def alice() -> EnvelopeSigner:
    return EnvelopeSigner("alice", ALICE)


@pytest.fixture
def verifier() -> EnvelopeVerifier:
    return EnvelopeVerifier(SENDERS)


# --- round trip --------------------------------------------------------------------------


def test_seal_open_round_trip(alice: EnvelopeSigner, verifier: EnvelopeVerifier) -> None:
    headers = alice.seal(SUBJECT, PAYLOAD, token=TOKEN)
    assert set(headers) == set(ALL_HEADERS)
    env = verifier.open(SUBJECT, PAYLOAD, headers)
    assert env.sender == "alice"
    assert env.token == TOKEN
    assert env.nonce == headers[H_NONCE]
    assert env.ts_ms == int(headers[H_TS])
    assert abs(env.ts_ms - now_ms()) < 5_000


def test_seal_open_without_token(alice: EnvelopeSigner, verifier: EnvelopeVerifier) -> None:
    headers = alice.seal(SUBJECT, PAYLOAD)
    assert H_TOKEN not in headers
    env = verifier.open(SUBJECT, PAYLOAD, headers)
    assert (env.sender, env.token) == ("alice", None)


def test_nonces_are_unique(alice: EnvelopeSigner) -> None:
    nonces = {alice.seal(SUBJECT, PAYLOAD)[H_NONCE] for _ in range(200)}
    assert len(nonces) == 200


# --- tampering ---------------------------------------------------------------------------


def test_tampered_payload_is_bad_signature(
    alice: EnvelopeSigner, verifier: EnvelopeVerifier
) -> None:
    headers = alice.seal(SUBJECT, PAYLOAD, token=TOKEN)
    with pytest.raises(EnvelopeBadSignature):
        verifier.open(SUBJECT, PAYLOAD + b" ", headers)
    with pytest.raises(EnvelopeBadSignature):
        verifier.open(SUBJECT, b"", headers)


def test_different_subject_is_bad_signature(
    alice: EnvelopeSigner, verifier: EnvelopeVerifier
) -> None:
    headers = alice.seal(SUBJECT, PAYLOAD)
    with pytest.raises(EnvelopeBadSignature):
        verifier.open("mas.agent.files.cmd.delete", PAYLOAD, headers)


def test_swapped_token_is_bad_signature(alice: EnvelopeSigner, verifier: EnvelopeVerifier) -> None:
    headers = alice.seal(SUBJECT, PAYLOAD, token=TOKEN)
    with pytest.raises(EnvelopeBadSignature):
        verifier.open(SUBJECT, PAYLOAD, {**headers, H_TOKEN: "other.token.value"})
    stripped = {k: v for k, v in headers.items() if k != H_TOKEN}
    with pytest.raises(EnvelopeBadSignature):
        verifier.open(SUBJECT, PAYLOAD, stripped)
    untokened = alice.seal(SUBJECT, PAYLOAD)
    with pytest.raises(EnvelopeBadSignature):
        verifier.open(SUBJECT, PAYLOAD, {**untokened, H_TOKEN: TOKEN})


def test_tampered_ts_or_nonce_is_bad_signature(
    alice: EnvelopeSigner, verifier: EnvelopeVerifier
) -> None:
    headers = alice.seal(SUBJECT, PAYLOAD)
    with pytest.raises(EnvelopeBadSignature):
        verifier.open(SUBJECT, PAYLOAD, {**headers, H_TS: str(int(headers[H_TS]) + 1)})
    other_nonce = b64url_encode(b"\x00" * 16)
    assert other_nonce != headers[H_NONCE]
    with pytest.raises(EnvelopeBadSignature):
        verifier.open(SUBJECT, PAYLOAD, {**headers, H_NONCE: other_nonce})


def test_failed_open_does_not_burn_the_nonce(
    alice: EnvelopeSigner, verifier: EnvelopeVerifier
) -> None:
    """An attacker who sees headers in flight cannot get the real message refused."""
    headers = alice.seal(SUBJECT, PAYLOAD)
    with pytest.raises(EnvelopeBadSignature):
        verifier.open(SUBJECT, b"forged", headers)
    assert verifier.open(SUBJECT, PAYLOAD, headers).nonce == headers[H_NONCE]


# --- sender identity ---------------------------------------------------------------------


@pytest.mark.attack("publish to another agent's subjects",
                    threat="a message signed with the attacker's key but claiming another "
                           "identity and its key id")
def test_attacker_key_claiming_known_identity_and_kid_is_bad_signature(
    verifier: EnvelopeVerifier,
) -> None:
    attacker = SigningKey.generate()
    headers = EnvelopeSigner("alice", attacker).seal(SUBJECT, PAYLOAD)
    headers[H_KID] = ALICE.kid
    assert headers[H_SENDER] == "alice"
    with pytest.raises(EnvelopeBadSignature):
        verifier.open(SUBJECT, PAYLOAD, headers)


def test_attacker_key_with_own_kid_is_unknown_sender(verifier: EnvelopeVerifier) -> None:
    attacker = SigningKey.generate()
    headers = EnvelopeSigner("alice", attacker).seal(SUBJECT, PAYLOAD)
    assert headers[H_KID] == attacker.kid
    with pytest.raises(EnvelopeUnknownSender):
        verifier.open(SUBJECT, PAYLOAD, headers)


def test_key_of_another_sender_is_unknown_sender(verifier: EnvelopeVerifier) -> None:
    """Bob's real key signing as alice: bob's kid is not in alice's ring."""
    headers = EnvelopeSigner("alice", BOB).seal(SUBJECT, PAYLOAD)
    with pytest.raises(EnvelopeUnknownSender):
        verifier.open(SUBJECT, PAYLOAD, headers)


def test_unknown_sender_name(verifier: EnvelopeVerifier) -> None:
    headers = EnvelopeSigner("mallory", ALICE).seal(SUBJECT, PAYLOAD)
    with pytest.raises(EnvelopeUnknownSender):
        verifier.open(SUBJECT, PAYLOAD, headers)


# --- freshness and replay ----------------------------------------------------------------


@pytest.mark.parametrize("offset_ms", [-60_000, 60_000])
def test_stale_timestamp(alice: EnvelopeSigner, verifier: EnvelopeVerifier, offset_ms: int) -> None:
    headers = alice.seal(SUBJECT, PAYLOAD, ts_ms=now_ms() + offset_ms)
    with pytest.raises(EnvelopeStale):
        verifier.open(SUBJECT, PAYLOAD, headers)


@pytest.mark.parametrize("offset_ms", [-10_000, 1_500])
def test_timestamp_inside_window_is_accepted(
    alice: EnvelopeSigner, verifier: EnvelopeVerifier, offset_ms: int
) -> None:
    headers = alice.seal(SUBJECT, PAYLOAD, ts_ms=now_ms() + offset_ms)
    assert verifier.open(SUBJECT, PAYLOAD, headers).ts_ms == int(headers[H_TS])


def test_replayed_nonce(alice: EnvelopeSigner, verifier: EnvelopeVerifier) -> None:
    headers = alice.seal(SUBJECT, PAYLOAD, token=TOKEN)
    verifier.open(SUBJECT, PAYLOAD, headers)
    with pytest.raises(EnvelopeReplayed):
        verifier.open(SUBJECT, PAYLOAD, dict(headers))


def test_replay_through_another_verifier_sharing_the_cache(alice: EnvelopeSigner) -> None:
    cache = NonceCache()
    headers = alice.seal(SUBJECT, PAYLOAD)
    EnvelopeVerifier(SENDERS, nonces=cache).open(SUBJECT, PAYLOAD, headers)
    with pytest.raises(EnvelopeReplayed):
        EnvelopeVerifier(SENDERS, nonces=cache).open(SUBJECT, PAYLOAD, headers)


# --- malformed headers -------------------------------------------------------------------


@pytest.mark.parametrize("missing", REQUIRED)
def test_missing_header_is_malformed(
    alice: EnvelopeSigner, verifier: EnvelopeVerifier, missing: str
) -> None:
    headers = alice.seal(SUBJECT, PAYLOAD)
    del headers[missing]
    with pytest.raises(EnvelopeMalformed):
        verifier.open(SUBJECT, PAYLOAD, headers)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (H_TS, "12a45"),
        (H_TS, ""),
        (H_TS, "-1"),
        (H_TS, "1.5e12"),
        (H_TS, "9" * 16),
        (H_SIG, "AAAA"),
        (H_SIG, "A" * 85),
        (H_SIG, "!" * 86),
        (H_SIG, "A" * 86 + "="),
        (H_NONCE, "short"),
        (H_NONCE, "!" * 22),
        (H_KID, "not-a-kid"),
        (H_KID, "0123456789ABCDEF"),
        (H_SENDER, "Alice"),
        (H_SENDER, ""),
        (H_TOKEN, "t" * 4097),
    ],
)
def test_garbled_header_is_malformed(
    alice: EnvelopeSigner, verifier: EnvelopeVerifier, name: str, value: str
) -> None:
    headers = alice.seal(SUBJECT, PAYLOAD)
    headers[name] = value
    with pytest.raises(EnvelopeMalformed):
        verifier.open(SUBJECT, PAYLOAD, headers)


@pytest.mark.parametrize("headers", [None, {}])
def test_no_headers_is_malformed(
    verifier: EnvelopeVerifier, headers: dict[str, str] | None
) -> None:
    with pytest.raises(EnvelopeMalformed):
        verifier.open(SUBJECT, PAYLOAD, headers)


# --- bounded replay cache ----------------------------------------------------------------


def test_nonce_cache_is_bounded_and_eviction_never_reenables_replay(
    alice: EnvelopeSigner,
) -> None:
    cache = NonceCache(max_entries=100)
    verifier = EnvelopeVerifier(SENDERS, nonces=cache)
    # Strictly increasing timestamps inside the window, so every message is fresh and
    # none is refused because it shares a millisecond with an evicted one.
    base = now_ms() - 10_000
    sealed = [alice.seal(SUBJECT, PAYLOAD, ts_ms=base + i) for i in range(1000)]
    for headers in sealed:
        verifier.open(SUBJECT, PAYLOAD, headers)
        assert len(cache) <= 100
    assert len(cache) == 100
    assert cache.watermark(alice.identity) >= base
    # Every evicted message stays refused...
    for headers in sealed[:900]:
        with pytest.raises((EnvelopeStale, EnvelopeReplayed)):
            verifier.open(SUBJECT, PAYLOAD, headers)
    # ...and so does every one still in the cache.
    for headers in sealed[900:]:
        with pytest.raises(EnvelopeReplayed):
            verifier.open(SUBJECT, PAYLOAD, headers)
    assert len(cache) == 100


@settings(max_examples=300, deadline=None)
@given(
    max_entries=st.integers(min_value=1, max_value=5),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["alice", "bob"]),
            st.integers(min_value=0, max_value=12),
            st.integers(min_value=0, max_value=40),
            st.integers(min_value=0, max_value=3),
        ),
        max_size=60,
    ),
)
def test_nonce_cache_never_accepts_a_nonce_twice(
    max_entries: int, ops: list[tuple[str, int, int, int]]
) -> None:
    """Out-of-order timestamps, a moving window and eviction: no (sender, nonce) twice.

    A replay carries the original timestamp, so a nonce is always offered with the
    timestamp it was first accepted with. The window's lower edge only moves forward.
    """
    cache = NonceCache(max_entries=max_entries)
    ts_of: dict[tuple[str, int], int] = {}
    accepted: set[tuple[str, int]] = set()
    oldest_ok = 0
    for sender, nonce_i, ts, advance in ops:
        oldest_ok += advance
        key = (sender, nonce_i)
        ts = ts_of.setdefault(key, ts + oldest_ok)
        if ts < oldest_ok:
            continue  # EnvelopeVerifier.open refuses these as stale before the cache
        nonce = f"nonce{nonce_i:011d}"
        try:
            cache.check_and_add(sender, nonce, ts, oldest_ok)
        except (EnvelopeStale, EnvelopeReplayed):
            continue
        assert key not in accepted, f"{key} accepted twice"
        accepted.add(key)
        assert len(cache) <= 2 * max_entries  # bounded per sender, two senders here


# --- property: only EnvelopeErrors -------------------------------------------------------

header_names = st.one_of(st.sampled_from(ALL_HEADERS), st.text(max_size=12))
header_values = st.one_of(
    st.text(max_size=120),
    st.sampled_from(["alice", "bob", ALICE.kid, BOB.kid, "0", "9" * 15]),
    st.text(
        alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
        min_size=16,
        max_size=86,
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(header_names, header_values, max_size=8), st.binary(max_size=64))
def test_arbitrary_headers_only_raise_envelope_errors(
    headers: dict[str, str], payload: bytes
) -> None:
    verifier = EnvelopeVerifier(SENDERS)
    try:
        verifier.open(SUBJECT, payload, headers)
    except EnvelopeError:
        return
    pytest.fail(f"random headers were accepted: {headers!r}")


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(header_names, header_values, max_size=4), st.binary(max_size=64))
def test_mutated_real_headers_only_raise_envelope_errors(
    overrides: dict[str, str], payload: bytes
) -> None:
    """Start from a genuinely sealed message so the later checks are reached too."""
    verifier = EnvelopeVerifier(SENDERS)
    headers = {**EnvelopeSigner("alice", ALICE).seal(SUBJECT, PAYLOAD, token=TOKEN), **overrides}
    try:
        env = verifier.open(SUBJECT, payload, headers)
    except EnvelopeError:
        return
    # Only an unaltered message may pass.
    assert payload == PAYLOAD
    assert env.sender == "alice"
    assert env.token == headers[H_TOKEN]


# One or two real headers dropped or pushed just past their rule, the rest kept; at
# most one other value on top.
MUTATIONS: dict[str, Callable[[str], object]] = {
    "keep": lambda v: v, "drop": lambda v: None, "cut": lambda v: v[:-1],
    "grow": lambda v: v + v[-1], "newline": lambda v: v + "\n", "space": lambda v: " " + v,
    "upper": str.upper, "bytes": str.encode, "number": len, "zero": lambda v: "0" + v,
    "long": lambda v: v * 60, "surrogate": lambda v: v[:-1] + "\udc80",
    "accent": lambda v: v[:-1] + "\u00e9"}
edge_values = st.one_of(
    header_values,
    st.sampled_from(["", "0", "00", "01", "1" * 15, "1" * 16, "-1", "\u0661", "a" * 32,
                     "a" * 33, "A" * 86, "t" * 4096, "t" * 4097, "0123456789abcdef",
                     "\udc80", "\ud800" * 86, "t\udc80", "\u00e9" * 86]),
    st.binary(max_size=8), st.integers(), st.none())
field_names = st.sampled_from([*ALL_HEADERS, "sender", "kid", "ts", "nonce", "sig", "token"])


@settings(max_examples=1000, deadline=None)
@given(st.dictionaries(st.sampled_from(ALL_HEADERS), st.sampled_from(sorted(MUTATIONS)),
                      max_size=2),
       st.dictionaries(field_names, edge_values, max_size=1))
def test_fast_header_check_agrees_with_the_model(
    mutations: dict[str, str], overrides: dict[str, object]
) -> None:
    """read_headers skips building a model for ordinary headers; it must accept exactly
    what EnvelopeHeaders accepts, with the same values, and refuse the rest alike."""
    sealed = EnvelopeSigner("alice", ALICE).seal(SUBJECT, PAYLOAD, token=TOKEN)
    headers: dict[str, object] = {}
    for name, value in sealed.items():
        changed = MUTATIONS[mutations.get(name, "keep")](value)
        if changed is not None:
            headers[name] = changed
    headers.update(overrides)
    try:
        env = EnvelopeHeaders.model_validate(headers)
        expected: object = (env.sender, env.kid, env.ts, env.nonce, env.sig, env.token)
    except ValidationError:
        expected = "refused"
    try:
        got: object = read_headers(headers)  # type: ignore[arg-type]  # what a peer may send
    except ValidationError:
        got = "refused"
    assert got == expected, headers


def test_future_timestamps_beyond_two_seconds_are_stale(
    alice: EnvelopeSigner, verifier: EnvelopeVerifier
) -> None:
    with pytest.raises(EnvelopeStale):
        verifier.open(SUBJECT, PAYLOAD, alice.seal(SUBJECT, PAYLOAD, ts_ms=now_ms() + 5_000))


def test_one_sender_flooding_cannot_lock_out_another() -> None:
    """A compromised identity filling its cache moves only its own watermark."""
    cache = NonceCache(max_entries=50)
    rogue_ts = now_ms() + 1_500
    for i in range(500):
        with contextlib.suppress(EnvelopeStale):  # the rogue soon locks only itself out
            cache.check_and_add("rogue", f"n{i:015d}", rogue_ts, now_ms() - 30_000)
    assert cache.watermark("rogue") >= rogue_ts
    cache.check_and_add("operator", "operatornonce0001", now_ms(), now_ms() - 30_000)
    assert cache.watermark("operator") == 0


def test_clock_stepping_back_does_not_readmit_an_aged_out_nonce() -> None:
    cache = NonceCache()
    ts = 1_000_000
    cache.check_and_add("alice", "nonce00000000001", ts, ts - 30_000)
    cache.check_and_add("alice", "nonce00000000002", ts + 40_000, ts + 10_000)  # ages out #1
    with pytest.raises(EnvelopeStale):  # the clock steps back: #1 is "in window" again
        cache.check_and_add("alice", "nonce00000000001", ts, ts - 30_000)
