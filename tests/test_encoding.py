"""Canonical JSON: the fast path must produce exactly the RFC 8785 reference bytes."""

from __future__ import annotations

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from security.encoding import (
    CanonicalizationError,
    b64url_decode,
    b64url_encode,
    canonical_json,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.text() | st.integers(min_value=-(2**60), max_value=2**60)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=25,
)


@settings(max_examples=500, deadline=None)
@given(json_values)
def test_canonical_json_matches_the_rfc8785_reference(value: object) -> None:
    try:
        expected = bytes(rfc8785.dumps(value))
    except (rfc8785.CanonicalizationError, UnicodeEncodeError, ValueError):
        return
    assert canonical_json(value) == expected


def test_known_canonical_forms() -> None:
    assert canonical_json({"b": 1, "a": [True, None, "x"]}) == b'{"a":[true,null,"x"],"b":1}'
    assert canonical_json({"e": "é\n\x1f"}) == '{"e":"é\\n\\u001f"}'.encode()
    assert canonical_json(1.0) == b"1"  # integral floats take the reference path
    assert canonical_json(1e16 + 2) == b"10000000000000002"
    with pytest.raises(CanonicalizationError):
        canonical_json(2**53)  # beyond exact IEEE-754 integers: refused, not rounded


@given(st.binary(max_size=64))
def test_b64url_round_trip(raw: bytes) -> None:
    assert b64url_decode(b64url_encode(raw)) == raw


@settings(max_examples=2000)
@given(st.floats(min_value=1e-5, max_value=1e17) | st.floats(min_value=1.5e9, max_value=2.5e9))
def test_floats_on_the_fast_path_match_the_reference(value: float) -> None:
    for signed in (value, -value):
        assert canonical_json({"ts": signed}) == bytes(rfc8785.dumps({"ts": signed}))
