"""Canonical bytes and base64url: the only ways bytes to be signed are produced."""

import base64
import binascii
import hashlib
from typing import Any

import rfc8785


def canonical_json(value: Any) -> bytes:
    """RFC 8785 (JSON Canonicalization Scheme) bytes: the same value always signs the same."""
    return bytes(rfc8785.dumps(value))


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Strict base64url without padding; raises ValueError on anything else."""
    if not text.isascii() or "=" in text:
        raise ValueError("not unpadded base64url")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not base64url") from exc
    if b64url_encode(raw) != text:
        raise ValueError("non-canonical base64url")
    return raw


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def args_sha256(args: Any) -> str:
    """Hash of an action's arguments as canonical JSON: what approvals and tokens bind to."""
    return sha256_hex(canonical_json(args))
