"""Signed checkpoints of the audit log in the C2SP signed-note format transparency logs use.

A checkpoint commits to the first ``size`` records through the hash of record ``size``
(the chain makes that hash cover every record before it)::

    mas-audit/MAS_AUDIT
    1200
    <base64 of record 1200's SHA-256>
    time 1764102749

    — mas-orchestrator <base64(4-byte key id || Ed25519 signature)>

The signature covers the text up to and including the newline before the blank line;
the key id is the first four bytes of SHA-256(key name || 0x0A || 0x01 || public key),
as in ``golang.org/x/mod/sumdb/note``, so standard note tooling can check it. The
orchestrator appends each checkpoint to the stream (a ``checkpoint`` record) and to a
file outside it (one JSON line per note): a stream cut off behind a checkpoint is
caught by ``mas audit verify`` against that file.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from security.keys import KeyRing, SigningKey, VerifyKey

ORIGIN = "mas-audit/MAS_AUDIT"
KEY_NAME = "mas-orchestrator"
DASH = "\u2014 "
ED25519 = b"\x01"
CHECKPOINTS_ENV = "MAS_AUDIT_CHECKPOINTS"
_SIZE = re.compile(r"^(0|[1-9][0-9]{0,18})$")
_TIME = re.compile(r"^time (0|[1-9][0-9]{0,18})$")


class CheckpointError(ValueError):
    """A note that does not parse or whose signature does not verify."""


@dataclass(frozen=True)
class Checkpoint:
    size: int
    head: str  # hex SHA-256 of record ``size`` (the genesis value for size 0)
    ts: int
    origin: str = ORIGIN

    def body(self) -> str:
        head = base64.b64encode(bytes.fromhex(self.head)).decode("ascii")
        return f"{self.origin}\n{self.size}\n{head}\ntime {self.ts}\n"


def note_key_id(name: str, key: VerifyKey) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + ED25519 + key.raw).digest()[:4]


def sign_note(checkpoint: Checkpoint, key: SigningKey, name: str = KEY_NAME) -> str:
    body = checkpoint.body()
    sig = key.sign(body.encode())
    line = base64.b64encode(note_key_id(name, key.public) + sig).decode("ascii")
    return f"{body}\n{DASH}{name} {line}\n"


def _parse_body(body: str) -> Checkpoint:
    lines = body.split("\n")[:-1]
    if len(lines) < 4:
        raise CheckpointError("checkpoint has fewer than four lines")
    origin, size, head_b64, stamp = lines[:4]
    if not _SIZE.match(size):
        raise CheckpointError(f"checkpoint size {size!r} is not a number")
    try:
        head = base64.b64decode(head_b64, validate=True)
    except binascii.Error:
        raise CheckpointError("checkpoint hash is not base64") from None
    if len(head) != 32:
        raise CheckpointError("checkpoint hash is not 32 bytes")
    match = _TIME.match(stamp)
    if match is None:
        raise CheckpointError("checkpoint has no `time` line")
    return Checkpoint(int(size), head.hex(), int(match.group(1)), origin)


def open_note(note: str, ring: KeyRing, *, name: str = KEY_NAME,
              origin: str = ORIGIN) -> Checkpoint:
    """The checkpoint in ``note`` once a signature by a key of ``ring`` under ``name``
    verifies; raises CheckpointError saying why not."""
    cut = note.rfind("\n\n")
    if cut < 0 or not note.endswith("\n"):
        raise CheckpointError("not a signed note (no blank line before the signatures)")
    body, signatures = note[:cut + 1], note[cut + 2:].split("\n")[:-1]
    if "\n\n" in body:
        raise CheckpointError("note text contains a blank line")
    wanted = {note_key_id(name, key): key for key in ring}
    for line in signatures:
        if not line.startswith(DASH):
            raise CheckpointError("signature line does not start with an em dash")
        signer, _, encoded = line[len(DASH):].partition(" ")
        if signer != name:
            continue
        try:
            raw = base64.b64decode(encoded, validate=True)
        except binascii.Error:
            raise CheckpointError("signature is not base64") from None
        key = wanted.get(raw[:4])
        if key is None:
            continue
        if not key.verify(body.encode(), raw[4:]):
            raise CheckpointError(f"signature by {name} does not verify")
        checkpoint = _parse_body(body)
        if checkpoint.origin != origin:
            raise CheckpointError(f"checkpoint is for {checkpoint.origin!r}, not {origin!r}")
        return checkpoint
    raise CheckpointError(f"no signature by a trusted {name} key")


def default_file() -> Path | None:
    """Where the orchestrator writes checkpoints outside the stream (``$MAS_AUDIT_CHECKPOINTS``)."""
    value = os.environ.get(CHECKPOINTS_ENV, "").strip()
    return Path(value) if value else None


def append_note(path: Path, note: str) -> None:
    """Append one note as a JSON line and make it durable before returning."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps({"note": note}) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_notes(path: Path) -> list[str]:
    """Every note in a checkpoint file; raises CheckpointError on a line that is not one."""
    notes = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            note = json.loads(line)["note"]
        except (ValueError, KeyError, TypeError):
            raise CheckpointError(f"{path}:{number}: not a checkpoint line") from None
        if not isinstance(note, str):
            raise CheckpointError(f"{path}:{number}: not a checkpoint line")
        notes.append(note)
    return notes
