"""Ed25519 keys with key ids, key files, and key rings of trusted public keys.

A key id (``kid``) is the first 16 hex digits of SHA-256 over the raw public key, so
verifiers can hold several trusted keys and the signer can rotate without a flag day.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

import nacl.exceptions
import nacl.signing

from security.encoding import b64url_decode, b64url_encode
from security.errors import KeyFileError, SecurityError

SEED_FILE_PREFIX = "mas-ed25519-seed:"
PUBLIC_KEY_PREFIX = "ed25519:"


def key_id(public_key: bytes) -> str:
    return hashlib.sha256(public_key).hexdigest()[:16]


class VerifyKey:
    """A trusted Ed25519 public key and its id."""

    __slots__ = ("_key", "kid", "raw")

    def __init__(self, raw: bytes) -> None:
        if len(raw) != 32:
            raise SecurityError("an Ed25519 public key is 32 bytes")
        self.raw = raw
        self.kid = key_id(raw)
        self._key = nacl.signing.VerifyKey(raw)

    @classmethod
    def from_text(cls, text: str) -> VerifyKey:
        """Parse the ``ed25519:<base64url>`` form used in trust files."""
        if not text.startswith(PUBLIC_KEY_PREFIX):
            raise SecurityError(f"public key must start with {PUBLIC_KEY_PREFIX!r}")
        try:
            return cls(b64url_decode(text[len(PUBLIC_KEY_PREFIX) :]))
        except ValueError as exc:
            raise SecurityError(f"public key is not valid base64url: {exc}") from exc

    def to_text(self) -> str:
        return PUBLIC_KEY_PREFIX + b64url_encode(self.raw)

    def verify(self, message: bytes, signature: bytes) -> bool:
        if len(signature) != 64:
            return False
        try:
            self._key.verify(message, signature)
        except nacl.exceptions.BadSignatureError:
            return False
        return True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VerifyKey) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"VerifyKey(kid={self.kid})"


class SigningKey:
    """An Ed25519 private key. Its seed never appears in repr, logs or exceptions."""

    __slots__ = ("_key", "public")

    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise SecurityError("an Ed25519 seed is 32 bytes")
        self._key = nacl.signing.SigningKey(seed)
        self.public = VerifyKey(bytes(self._key.verify_key))

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(os.urandom(32))

    @property
    def kid(self) -> str:
        return self.public.kid

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message).signature

    def seed_text(self) -> str:
        return SEED_FILE_PREFIX + b64url_encode(bytes(self._key))

    @classmethod
    def from_seed_text(cls, text: str) -> SigningKey:
        text = text.strip()
        if not text.startswith(SEED_FILE_PREFIX):
            raise KeyFileError(f"does not start with {SEED_FILE_PREFIX!r}")
        try:
            return cls(b64url_decode(text[len(SEED_FILE_PREFIX) :]))
        except (ValueError, SecurityError) as exc:
            raise KeyFileError(f"the seed is not 32 bytes of base64url ({exc})") from exc

    def __repr__(self) -> str:
        return f"SigningKey(kid={self.kid})"


def write_private_file(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 from the first byte on (no window where it is readable)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(path, 0o600)


def read_private_file(path: Path) -> bytes:
    """Read a secret, refusing files that group or others can read (like ssh does)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: missing") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"{path}: mode {stat.S_IMODE(st.st_mode):04o} lets others read it; run chmod 600 {path}"
        )
    try:
        return path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read ({exc.strerror})") from exc


def save_signing_key(path: Path, key: SigningKey) -> None:
    write_private_file(path, (key.seed_text() + "\n").encode("ascii"))


def load_signing_key(path: Path) -> SigningKey:
    raw = read_private_file(path)
    try:
        return SigningKey.from_seed_text(raw.decode("ascii"))
    except (UnicodeDecodeError, KeyFileError) as exc:
        raise KeyFileError(f"{path}: not an Ed25519 seed file: {exc}") from exc


class KeyRing:
    """The set of public keys trusted for one purpose, looked up by key id."""

    def __init__(self, keys: Iterable[VerifyKey] = ()) -> None:
        self._keys: dict[str, VerifyKey] = {}
        for key in keys:
            self.add(key)

    def add(self, key: VerifyKey) -> None:
        self._keys[key.kid] = key

    def remove(self, kid: str) -> None:
        self._keys.pop(kid, None)

    def get(self, kid: str) -> VerifyKey | None:
        return self._keys.get(kid)

    def __contains__(self, kid: object) -> bool:
        return kid in self._keys

    def __iter__(self) -> Iterator[VerifyKey]:
        return iter(self._keys.values())

    def __len__(self) -> int:
        return len(self._keys)
